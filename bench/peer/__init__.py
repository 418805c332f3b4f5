"""The peer of the HTTP benchmark: a HealthChain CDS Hooks service in its own virtualenv.

`venv` builds that virtualenv once (stdlib only: `bench.service_bench` imports it);
`healthchain_app` is the service, imported only by the virtualenv's interpreter.
"""
