"""CDS Hooks 2.0 decision-support service for Epic.

`create_app(config=None)` is the only entry point: gunicorn serves it (`cds-service serve`), the
tests call it with an explicit mapping.

A call goes `protocol` (views, request schema) → `trust` (the JWT) → `data` (prefetch, FHIR
fallback) → a service in `hooks/` (`features` → `models` → its rules) → `protocol.cards` →
`records`. `ops` is serving and observability, `tools` the sandbox and `invoke`, `training`
the offline work that never runs in a worker. Each package's docstring says what lives there.
"""


def create_app(config=None, *, deployment=None):
    from cds_service.app import create_app as _create_app

    return _create_app(config, deployment=deployment)


__all__ = ["create_app"]
