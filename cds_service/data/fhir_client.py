"""The read-only FHIR client: GET only, to one origin, streamed under a `ReadBudget`.

The service never writes to the EHR: `ReadOnlyFHIRClient` sends GET and nothing else, with the
token only to the origin of `fhirServer` (the rules are in `cds_service.data.fhir`). Bodies are
read in chunks against the deadline and the byte caps of its `ReadBudget`
(`cds_service.data.read_budget`); failures come back as the typed errors of
`cds_service.data.fhir`. Logs name URLs without ids or parameter values (`loggable_path`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, NoReturn
from urllib.parse import unquote, urljoin, urlsplit

import requests
from fhirpy import SyncFHIRClient
from fhirpy.base.utils import AttrDict, encode_params, remove_prefix

from cds_service.data import jsonlimit
from cds_service.data.fhir import (
    BearerAuth,
    FhirConnectionError,
    FhirInvalidResponse,
    FhirNotFound,
    FhirRedirectRefused,
    FhirResponseTooLarge,
    FhirStatusError,
    FhirTimeout,
    OffServerUrl,
    WriteRefused,
    check_fhir_server_url,
    parse_retry_after,
    url_origin,
)
from cds_service.data.read_budget import ReadBudget, bounded_session, format_mib
from cds_service.ops import metrics

# The name log filters match: records keep it though the client now lives here.
logger = logging.getLogger("cds_service.data.fhir")

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_TIMEOUT_S = 10.0
_CHUNK_BYTES = 64 * 1024


class ReadOnlyFHIRClient(SyncFHIRClient):
    """fhirpy client that only ever sends GET, to one origin, within a deadline.

    - Any other method raises `WriteRefused` before anything is sent.
    - `session` is shared (connection reuse); when omitted the client owns one (`close()`).
    - Redirects are not followed by requests; a redirect to the same scheme+host+port is followed
      up to `max_redirects` hops, any other redirect raises `FhirRedirectRefused`.
    - `budget` (a `ReadBudget`, shared by one hook call's clients) bounds time and bytes; without
      one the client makes its own from `deadline` (a `time.monotonic()` instant). Each attempt's
      socket timeouts are the time remaining, and bodies stream in under the byte caps.
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
        budget: ReadBudget | None = None,
        allow_http_loopback: bool = False,
        max_redirects: int = 3,
        max_rate_limit_retries: int = 2,
    ):
        check_fhir_server_url(url, allow_http_loopback=allow_http_loopback)
        super().__init__(url.rstrip("/"))
        parts = urlsplit(self.url)
        self._origin = url_origin(self.url)
        self._base_path = parts.path.rstrip("/")
        self._auth = BearerAuth(access_token) if access_token else None
        self._owns_session = session is None
        self._session = session if session is not None else bounded_session()
        if budget is None:
            budget = ReadBudget(time.monotonic() + DEFAULT_TIMEOUT_S if deadline is None
                                else deadline)
        self.budget = budget
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
            origin = url_origin(url)
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
        return self.budget.remaining()

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
        with self.budget.active():
            return self._get_following(url, headers, plain=plain)

    def _get_following(self, url: str, headers: dict, *, plain: bool) -> tuple[Any, int]:
        redirects = rate_limited = 0
        while True:
            response = self._send(url, headers)
            try:
                status = response.status_code
                if 200 <= status < 300:
                    return _decode_json(self._read_body(response, url), plain=plain), status
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
                stream=True,
            )
        except requests.RequestException as exc:
            self._raise_for(exc, shown, started)
        metrics.observe_fhir(metrics.status_class(response.status_code),
                             time.monotonic() - started)
        level = logging.INFO if response.status_code < 400 else logging.WARNING
        logger.log(level, "FHIR GET %s -> %d in %d ms", shown, response.status_code,
                   _elapsed_ms(started))
        return response

    def _read_body(self, response: requests.Response, url: str) -> bytearray:
        """The (decoded) body, read in chunks against the deadline and the byte caps."""
        cap = self.budget.max_response_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > cap:
            # Refused unread: compression makes FHIR JSON shorter, so it would decode longer still.
            raise FhirResponseTooLarge(f"FHIR server answer exceeded {format_mib(cap)}")
        started = time.monotonic()
        body = bytearray()
        try:
            for chunk in response.iter_content(_CHUNK_BYTES):
                body += chunk
                if len(body) > cap:
                    raise FhirResponseTooLarge(f"FHIR server answer exceeded {format_mib(cap)}")
                self.budget.spend(len(chunk))
                remaining = self._remaining()
                if remaining <= 0:
                    raise requests.Timeout("deadline passed while reading the body")
                _set_read_timeout(response, remaining)
        except FhirResponseTooLarge:
            logger.warning("FHIR GET %s body refused after %d bytes: over the byte cap",
                           self.loggable_url(url), len(body))
            raise
        except requests.RequestException as exc:
            self._raise_for(exc, self.loggable_url(url), started)
        return body

    def _raise_for(self, exc: requests.RequestException, shown: str, started: float) -> NoReturn:
        # After `ReadBudget.expire()` a read fails as a broken connection; it is the deadline.
        if isinstance(exc, requests.Timeout) or self.budget.expired:
            metrics.observe_fhir("timeout", time.monotonic() - started)
            logger.warning("FHIR GET %s timed out after %d ms", shown, _elapsed_ms(started))
            raise FhirTimeout("FHIR server did not answer within the deadline") from exc
        metrics.observe_fhir("error", time.monotonic() - started)
        logger.warning("FHIR GET %s failed after %d ms: %s", shown, _elapsed_ms(started),
                       type(exc).__name__)
        raise FhirConnectionError("FHIR server could not be reached") from exc

    def _redirect_target(self, url: str, location: str | None, hops: int) -> str:
        if not location:
            raise FhirRedirectRefused("FHIR server sent a redirect without a Location")
        target = urljoin(url, location)
        try:
            same_origin = url_origin(target) == self._origin
        except ValueError:
            same_origin = False
        if not same_origin:
            raise FhirRedirectRefused(
                "FHIR server redirected to another origin; not followed with the access token"
            )
        if hops > self.max_redirects:
            raise FhirRedirectRefused("FHIR server redirected too many times")
        return target


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


def _set_read_timeout(response: requests.Response, seconds: float) -> None:
    """Make the next `recv` on this response's socket wait at most `seconds` (the time left)."""
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(max(seconds, 0.001))


def _decode_json(content: bytes | bytearray, *, plain: bool) -> Any:
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
