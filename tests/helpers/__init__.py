"""Shared test helpers: builders, local servers and assertions the test modules import.

Fixtures among them (`fhir_server`, `jwks_server`, `serve`, `browser`, `store_url`, `store`,
`redis_prefix`, ...) reach the tests through `pytest_plugins` in tests/conftest.py; a test module
never imports a fixture, nor another test module (tests/test_suite_layout.py checks).
"""
