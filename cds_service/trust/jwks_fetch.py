"""Fetching a JWK Set from a `jku` URL: which URLs may be fetched at all (`check_jku_url`) and
the one bounded GET that reads a set (`JwksFetcher`); caching is `trust.jwks`."""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import requests

from cds_service.data.fhir import is_loopback_host
from cds_service.trust.keys import KeySet
from cds_service.trust.settings import AuthSettings

# One logger for all of token verification: refusals, skipped keys and JWK Set fetches alike.
logger = logging.getLogger("cds_service.trust.auth")

MAX_JWKS_BYTES = 256 * 1024


def check_jku_url(url: Any, *, allow_http_loopback: bool) -> str | None:
    """Why `url` may not be fetched as a JWK Set, or None: https only (or http to a loopback host
    when allowed), no credentials, no fragment."""
    if not isinstance(url, str) or not url:
        return "is not a URL"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "is not a valid URL"
    if not host:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    if parts.fragment:
        return "must not carry a fragment"
    scheme = parts.scheme.lower()
    if scheme == "https":
        return None
    if scheme == "http" and allow_http_loopback and is_loopback_host(host):
        return None
    return "is not https"


class FetchFailed(Exception):
    """The JWK Set at a jku could not be fetched or parsed; message names the class of failure."""


class JwksFetcher:
    """One GET per call, nothing cached: https only (checked by the caller), no redirects, the
    body limited to MAX_JWKS_BYTES and the whole fetch to `jwks_timeout_s`; unusable members of
    the set are skipped and logged."""

    def __init__(self, settings: AuthSettings, session: requests.Session | None = None):
        self.settings = settings
        self._session = session if session is not None else requests.Session()
        self._owns_session = session is None

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def fetch(self, jku: str) -> KeySet:
        timeout = self.settings.jwks_timeout_s
        started = time.monotonic()
        try:
            response = self._session.get(
                jku,
                timeout=(timeout, timeout),
                allow_redirects=False,
                stream=True,
                headers={"Accept": "application/jwk-set+json, application/json"},
            )
        except requests.RequestException as exc:
            raise FetchFailed(type(exc).__name__) from None
        try:
            if response.status_code != 200:
                raise FetchFailed(f"HTTP {response.status_code}")
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_JWKS_BYTES:
                raise FetchFailed("response too large")
            body = bytearray()
            try:
                for chunk in response.iter_content(chunk_size=16 * 1024):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise FetchFailed("response too large")
                    if time.monotonic() - started > timeout:
                        raise FetchFailed("timed out")
            except requests.RequestException as exc:
                raise FetchFailed(type(exc).__name__) from None
        finally:
            response.close()
        try:
            document = json.loads(bytes(body))
        except (ValueError, RecursionError):
            raise FetchFailed("body is not JSON") from None
        try:
            keys = KeySet.parse(document, strict=False, where=jku)
        except ValueError as exc:
            raise FetchFailed(str(exc)) from None
        logger.info("JWK Set fetched from %s: %d signing keys", jku, len(keys))
        return keys
