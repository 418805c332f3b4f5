"""Read-only access to the EHR's FHIR server, for prefetch fallback.

The service never writes to the EHR: `ReadOnlyFHIRClient` sends GET and nothing else. The
bearer token handed to us in `fhirAuthorization` is sent only over https (or, when a setting
allows it, plain http to a loopback host for tests), only to the origin of `fhirServer`, and
never logged. CDS Hooks 2.0 §FHIR Resource Access; best practices §FHIR Access ("never store,
share, or log the access token").

Errors are typed (`FhirRequestError` subclasses) with a `reason` that is safe to show to the
caller: it names the failure class and status, never the token, the query string or resource
contents. `cds_service.prefetch` turns them into `FhirAccessError` naming the prefetch key.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import math
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import requests
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import BaseFHIRError
from fhirpy.base.utils import AttrDict, encode_params, remove_prefix

from cds_service import jsonlimit, metrics

logger = logging.getLogger("cds_service.fhir")

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_TIMEOUT_S = 10.0
_DEFAULT_PORTS = {"http": 80, "https": 443}


class FhirRequestError(BaseFHIRError):
    """A read from the FHIR server produced no usable answer; `reason` is safe to show."""

    issue_code = "exception"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class InsecureFhirServer(FhirRequestError):
    """fhirServer is not https (nor an allowed loopback http URL); no request is sent."""

    issue_code = "security"


class OffServerUrl(FhirRequestError):
    """A URL (e.g. a Bundle `next` link) points outside fhirServer; it is not requested."""

    issue_code = "security"


class FhirRedirectRefused(FhirRequestError):
    """The server redirected to another origin (or too often); the token is not sent there."""

    issue_code = "security"


class FhirTimeout(FhirRequestError):
    """No answer within the per-request deadline."""

    issue_code = "timeout"


class FhirConnectionError(FhirRequestError):
    """The server could not be reached (DNS, TCP, TLS)."""

    issue_code = "transient"


class FhirInvalidResponse(FhirRequestError):
    """A 2xx answer that is not the FHIR JSON the request calls for."""

    issue_code = "processing"


class FhirStatusError(FhirRequestError):
    """A non-2xx answer; carries `status` and `retry_after` (seconds, when the server sent one)."""

    def __init__(self, status: int, *, retry_after: float | None = None):
        super().__init__(f"FHIR server answered {status}")
        self.status = status
        self.retry_after = retry_after

    @property
    def issue_code(self) -> str:  # type: ignore[override]
        if self.status in (401, 403):
            return "forbidden"
        if self.status in (404, 410):
            return "not-found"
        if self.status == 429 or self.status >= 500:
            return "transient"
        return "exception"


class FhirNotFound(FhirStatusError):
    """404 or 410: for a read, the resource does not exist."""


class WriteRefused(BaseFHIRError):
    """A non-GET request was attempted; this service never writes to the EHR (our bug)."""


def is_loopback_host(host: str | None) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_fhir_server_url(url: str, *, allow_http_loopback: bool = False) -> None:
    """Raise `InsecureFhirServer` unless `url` may receive the bearer token.

    CDS Hooks 2.0: fhirServer "MUST be https when production data is exchanged". Plain http is
    accepted only when `allow_http_loopback` is set and the host is a loopback address.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except (TypeError, ValueError, AttributeError):
        raise InsecureFhirServer("fhirServer is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not host:
        raise InsecureFhirServer("fhirServer is not an absolute http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise InsecureFhirServer("fhirServer must not carry credentials")
    if parts.query or parts.fragment:
        raise InsecureFhirServer("fhirServer must not carry a query or fragment")
    if scheme == "https":
        return
    if allow_http_loopback and is_loopback_host(host):
        return
    raise InsecureFhirServer("fhirServer is not https; the access token is not sent")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP-date, RFC 9110 §10.2.3).

    None when absent or unparseable; a date in the past gives 0.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class _BearerAuth(requests.auth.AuthBase):
    """Sets `Authorization: Bearer …`; passing an auth object also stops requests' .netrc lookup
    from replacing the header. The repr never shows the token."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        # CDS Hooks 2.0: token_type is "fixed value: Bearer"; whatever case the EHR sent, we send
        # the canonical scheme name.
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:
        return "<_BearerAuth ***>"


class ReadOnlyFHIRClient(SyncFHIRClient):
    """fhirpy client that only ever sends GET, to one origin, within a deadline.

    - Any other method raises `WriteRefused` before anything is sent.
    - `session` is shared (connection reuse); when omitted the client owns one (`close()`).
    - Redirects are not followed by requests; a redirect to the same scheme+host+port is followed
      up to `max_redirects` hops, any other redirect raises `FhirRedirectRefused`.
    - `deadline` is a `time.monotonic()` instant; each attempt's timeout is the time remaining.
    - 429 is retried after `Retry-After` when the wait fits before the deadline.
    - Absolute URLs (Bundle `next` links) must be under `url` (same origin and base path).
    """

    def __init__(
        self,
        url: str,
        *,
        access_token: str | None = None,
        session: requests.Session | None = None,
        deadline: float | None = None,
        allow_http_loopback: bool = False,
        max_redirects: int = 3,
        max_rate_limit_retries: int = 2,
    ):
        check_fhir_server_url(url, allow_http_loopback=allow_http_loopback)
        super().__init__(url.rstrip("/"))
        parts = urlsplit(self.url)
        self._origin = _origin(self.url)
        self._base_path = parts.path.rstrip("/")
        self._auth = _BearerAuth(access_token) if access_token else None
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()
        self.deadline = deadline
        self.max_redirects = max_redirects
        self.max_rate_limit_retries = max_rate_limit_retries

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> ReadOnlyFHIRClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- URLs -------------------------------------------------------------------------------

    def absolute_url(self, url: str) -> str:
        """Resolve a (possibly relative) URL against the base; relative links are server-relative
        when they start with `/`, base-relative otherwise."""
        return urljoin(self.url + "/", url)

    def is_on_server(self, url: str) -> bool:
        """Same scheme, host and port as the base, and a path under the base path."""
        try:
            parts = urlsplit(url)
            if parts.username is not None or parts.password is not None:
                return False
            origin = _origin(url)
        except ValueError:
            return False
        if origin != self._origin:
            return False
        return parts.path == self._base_path or parts.path.startswith(self._base_path + "/")

    def relative_url(self, url: str) -> str:
        """`url` relative to the base (for audit logs), e.g. `Condition?patient=1&_page=2`."""
        parts = urlsplit(self.absolute_url(url))
        path = remove_prefix(parts.path, self._base_path + "/").lstrip("/")
        return f"{path}?{parts.query}" if parts.query else path

    def loggable_url(self, url: str) -> str:
        """`url` for logs: the base, resource types, operations and parameter names, with ids
        and parameter values elided (they identify patients; only the audit log holds those),
        e.g. `https://fhir.example.org/R4/Observation?patient=…&code=…`."""
        return f"{self.url}/{loggable_path(self.relative_url(url))}"

    def _build_request_url(self, path: str, params: dict | None) -> str:
        # fhirpy's version accepts any absolute URL that merely *contains* the base URL and adds a
        # trailing "?" when params are empty; this one checks origin + base path and keeps a query
        # already present in `path` byte-for-byte (prefetch renders and encodes it once).
        if _is_absolute(path):
            if not self.is_on_server(path):
                raise OffServerUrl("URL is outside fhirServer; not requested")
            url = path
        else:
            relative = remove_prefix(path.lstrip("/"), self._base_path.lstrip("/") + "/")
            url = f"{self.url}/{relative.lstrip('/')}"
        query = encode_params(params) if params else ""
        if query:
            url = f"{url}{'&' if '?' in url else '?'}{query}"
        return url

    # -- requests ---------------------------------------------------------------------------

    def get_json(self, path: str, params: dict | None = None) -> Any:
        """GET `path` (relative to the base, or an absolute URL on this server) as plain JSON.

        Unlike fhirpy's own calls (which get `AttrDict`s, whose keys shadow dict methods), the
        result is plain dicts, so a resource with an odd key such as "get" stays harmless.
        """
        return self._get(path, params, {}, plain=True)[0]

    def _remaining(self) -> float:
        if self.deadline is None:
            return DEFAULT_TIMEOUT_S
        return self.deadline - time.monotonic()

    def _do_request(  # fhirpy's signature
        self,
        method: str,
        path: str,
        data: dict | None = None,
        params: dict | None = None,
        extra_headers: dict | None = None,
        *,
        returning_status: bool = False,
    ) -> Any:
        if str(method).upper() != "GET" or data is not None:
            raise WriteRefused(
                f"refused {str(method).upper()}: this service never writes to the EHR"
            )
        body, status = self._get(path, params, extra_headers or {}, plain=False)
        return (body, status) if returning_status else body

    def _get(
        self, path: str, params: dict | None, extra_headers: dict, *, plain: bool
    ) -> tuple[Any, int]:
        headers = {"Accept": "application/fhir+json"}
        for name, value in extra_headers.items():
            if name.lower() != "authorization":
                headers[name] = value
        url = self._build_request_url(path, params)
        redirects = rate_limited = 0
        while True:
            response = self._send(url, headers)
            try:
                status = response.status_code
                if 200 <= status < 300:
                    return _decode_json(response.content, plain=plain), status
                location = response.headers.get("Location")
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            finally:
                response.close()

            if status in REDIRECT_STATUSES:
                redirects += 1
                url = self._redirect_target(url, location, redirects)
                continue
            if (
                status == 429
                and retry_after is not None
                and rate_limited < self.max_rate_limit_retries
                and retry_after < self._remaining()
            ):
                rate_limited += 1
                logger.info("FHIR GET %s rate limited; retrying in %.1f s", self.loggable_url(url),
                            retry_after)
                time.sleep(retry_after)
                continue
            if status in (404, 410):
                raise FhirNotFound(status)
            raise FhirStatusError(status, retry_after=retry_after)

    def _send(self, url: str, headers: dict) -> requests.Response:
        shown = self.loggable_url(url)
        remaining = self._remaining()
        if remaining <= 0:
            logger.warning("FHIR GET %s not sent: deadline passed", shown)
            raise FhirTimeout("FHIR server did not answer within the deadline")
        started = time.monotonic()
        try:
            response = self._session.get(
                url,
                headers=headers,
                auth=self._auth,
                timeout=(remaining, remaining),
                allow_redirects=False,
            )
        except requests.Timeout as exc:
            metrics.observe_fhir("timeout", time.monotonic() - started)
            logger.warning("FHIR GET %s timed out after %d ms", shown, _elapsed_ms(started))
            raise FhirTimeout("FHIR server did not answer within the deadline") from exc
        except requests.RequestException as exc:
            metrics.observe_fhir("error", time.monotonic() - started)
            logger.warning("FHIR GET %s failed after %d ms: %s", shown, _elapsed_ms(started),
                           type(exc).__name__)
            raise FhirConnectionError("FHIR server could not be reached") from exc
        metrics.observe_fhir(metrics.status_class(response.status_code),
                             time.monotonic() - started)
        level = logging.INFO if response.status_code < 400 else logging.WARNING
        logger.log(level, "FHIR GET %s -> %d in %d ms", shown, response.status_code,
                   _elapsed_ms(started))
        return response

    def _redirect_target(self, url: str, location: str | None, hops: int) -> str:
        if not location:
            raise FhirRedirectRefused("FHIR server sent a redirect without a Location")
        target = urljoin(url, location)
        try:
            same_origin = _origin(target) == self._origin
        except ValueError:
            same_origin = False
        if not same_origin:
            raise FhirRedirectRefused(
                "FHIR server redirected to another origin; not followed with the access token"
            )
        if hops > self.max_redirects:
            raise FhirRedirectRefused("FHIR server redirected too many times")
        return target


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme, 0)


def _is_absolute(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.scheme or parts.netloc)


def loggable_path(relative_url: str) -> str:
    """A relative URL without what identifies a patient: path segments other than resource
    types, `metadata`, `$operations` and `_history`/`_search` become `…`, and so does every
    parameter value (`Patient/123` → `Patient/…`, `Observation?patient=123` →
    `Observation?patient=…`)."""
    path, _, query = relative_url.partition("?")
    segments = [s if _is_type(s) or s == "metadata" or s[:1] in ("$", "_") else "…"
                for s in path.split("/")] if path else []
    names = [part.partition("=")[0] for part in query.split("&") if part]
    shown = "/".join(segments)
    if names:
        shown += "?" + "&".join(f"{unquote(name)}=…" for name in names)
    return shown


def _is_type(segment: str) -> bool:
    return segment[:1].isupper() and segment.isalpha()


def _decode_json(content: bytes, *, plain: bool) -> Any:
    if not content:
        return None
    try:
        return (jsonlimit.loads(content) if plain
                else jsonlimit.loads(content, object_hook=AttrDict))
    except (ValueError, UnicodeDecodeError):
        raise FhirInvalidResponse("FHIR server answered with a body that is not JSON") from None
    except jsonlimit.JsonTooDeep as exc:
        raise FhirInvalidResponse(f"FHIR server answered with {exc}") from None


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
