"""Read-only access to the EHR's FHIR server, for prefetch fallback.

The service never writes to the EHR: `ReadOnlyFHIRClient` sends GET and nothing else. The
bearer token handed to us in `fhirAuthorization` is sent only over https (or, when a setting
allows it, plain http to a loopback host for tests), only to the origin of `fhirServer`, and
never logged. CDS Hooks 2.0 §FHIR Resource Access; best practices §FHIR Access ("never store,
share, or log the access token").

Which servers: a request names its own `fhirServer`, so a validly signed call could point the
service (and the EHR's token) at any host, internal ones included. A site lists the FHIR bases
its calls may use (`FhirBase`, `allowed_by`); `cds_service.data.prefetch` never contacts any other.

How much: one hook call's reads share a `ReadBudget`: one deadline covering connect, TLS, every
page and every byte, a byte cap per response and per call, both enforced while the body streams
in, and the sockets in flight, shut down when the caller stops waiting, so a slow or dripping
server frees its thread at the deadline instead of holding it for as long as it keeps talking.

Errors are typed (`FhirRequestError` subclasses) with a `reason` that is safe to show to the
caller: it names the failure class and status, never the token, the query string or resource
contents. `cds_service.data.prefetch` turns them into `FhirAccessError` naming the prefetch key.
"""

from __future__ import annotations

import contextlib
import contextvars
import email.utils
import ipaddress
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import unquote, urljoin, urlsplit

import requests
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import BaseFHIRError
from fhirpy.base.utils import AttrDict, encode_params, remove_prefix
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from cds_service.data import jsonlimit
from cds_service.ops import metrics

logger = logging.getLogger("cds_service.data.fhir")

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_TIMEOUT_S = 10.0
MIB = 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 16 * MIB
DEFAULT_MAX_TOTAL_BYTES = 32 * MIB
_CHUNK_BYTES = 64 * 1024
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


class FhirResponseTooLarge(FhirRequestError):
    """An answer, or the call's answers together, exceeded the byte cap; reading stopped."""

    issue_code = "too-costly"


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


# DNS labels (RFC 1035 §2.3.4: at most 63 octets); anything else is kept out of the audit log.
_HOST_NAME = re.compile(r"[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*\.?")


@dataclass(frozen=True)
class FhirBase:
    """A FHIR base URL reduced to what decides where a request goes: scheme, host (lower case),
    port (the scheme's default filled in) and path (no trailing `/`)."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: Any) -> FhirBase:
        """Raise ValueError (with a reason, never echoing the URL) unless `url` is an absolute
        http(s) URL without credentials, query, fragment, backslash, control character or a
        `.`/`..` path segment (plain or percent-encoded)."""
        if not isinstance(url, str) or not url:
            raise ValueError("not a URL")
        if any(c.isspace() or ord(c) < 32 or c == "\\" for c in url):
            raise ValueError("contains whitespace, a control character or a backslash")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        port = parts.port  # ValueError on a malformed port
        if scheme not in _DEFAULT_PORTS or not host:
            raise ValueError("not an absolute http(s) URL")
        if "@" in parts.netloc:
            raise ValueError("carries credentials")
        if parts.query or parts.fragment or url.endswith(("?", "#")):
            raise ValueError("carries a query or fragment")
        path = parts.path.rstrip("/")
        # A server resolving `/fhir/%2e%2e/admin` would leave the allowed base.
        if any(unquote(segment) in (".", "..") or "/" in unquote(segment)
               for segment in path.split("/")):
            raise ValueError("has a '.' or '..' path segment")
        return cls(scheme, host.lower(), port or _DEFAULT_PORTS[scheme], path)

    def contains(self, other: FhirBase) -> bool:
        """`other` is this base or lies below it (at a `/` boundary)."""
        return ((other.scheme, other.host, other.port) == (self.scheme, self.host, self.port)
                and (other.path == self.path or other.path.startswith(self.path + "/")))

    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def allowed_by(url: Any, allowed: Iterable[str]) -> bool:
    """True when `url` equals or lies below one of the `allowed` FHIR bases. Pure: no DNS."""
    try:
        wanted = FhirBase.parse(url)
    except ValueError:
        return False
    for entry in allowed:
        try:
            if FhirBase.parse(entry).contains(wanted):
                return True
        except ValueError:
            continue
    return False


def origin_for_audit(url: Any) -> str:
    """`scheme://host:port` of a refused fhirServer, for the audit log; a stand-in when the URL
    does not parse or its host is not a plausible name or address (the audit record refuses
    strings that look like tokens, and an unbuilt record would lose the whole call)."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        host = (parts.hostname or "") if parts else ""
        scheme = parts.scheme.lower() if parts else ""
        port = parts.port if parts else None
    except ValueError:
        return "(not a URL)"
    if not host or scheme not in _DEFAULT_PORTS:
        return "(not an http(s) URL)"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if len(host) > 253 or not _HOST_NAME.fullmatch(host):
            return f"{scheme}://(not a host name)"
    return FhirBase(scheme, host, port or _DEFAULT_PORTS[scheme], "").origin()


# -- bounded reads -----------------------------------------------------------------------------

_BUDGET: contextvars.ContextVar[ReadBudget | None] = contextvars.ContextVar(
    "cds_fhir_read_budget", default=None)


class ReadBudget:
    """What one hook call's FHIR reads may spend, shared by the threads reading for it.

    - `deadline`: a `time.monotonic()` instant covering connect, TLS, every page and every byte.
    - `max_response_bytes` per answer and `max_total_bytes` across the call's answers, counted
      after content decoding (urllib3 ≥ 2.6 decompresses at most one chunk per read).
    - `expire()` shuts down the sockets still in use, which ends a blocked read at once: a socket
      timeout bounds each `recv`, not a read that a server keeps alive one byte at a time (in the
      body, or in a header line that http.client reads up to 64 KiB of). Connections are tracked
      from the pool (`bounded_session`) while the reading thread runs inside `active()`.
    """

    def __init__(self, deadline: float, *, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
                 max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES):
        self.deadline = deadline
        self.max_response_bytes = max_response_bytes
        self.max_total_bytes = max_total_bytes
        self._lock = threading.Lock()
        self._total = 0
        self._expired = False
        self._connections: set[Any] = set()

    def remaining(self) -> float:
        return 0.0 if self._expired else self.deadline - time.monotonic()

    @property
    def expired(self) -> bool:
        return self._expired or time.monotonic() >= self.deadline

    def spend(self, n: int) -> None:
        """Count `n` more bytes read; `FhirResponseTooLarge` once the call's total is passed."""
        with self._lock:
            self._total += n
            over = self._total > self.max_total_bytes
        if over:
            raise FhirResponseTooLarge(
                f"FHIR server answers exceeded {_mib(self.max_total_bytes)} in total")

    def expire(self) -> None:
        """Stop: no further request starts, and reads in progress fail now."""
        with self._lock:
            self._expired = True
            connections = list(self._connections)
        for conn in connections:
            sock = getattr(conn, "sock", None)
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                # The plain socket's shutdown, also for TLS: SSLSocket.shutdown would unwrap TLS
                # under a thread that is inside SSL_read. A blocked recv returns at once.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    @contextlib.contextmanager
    def active(self) -> Iterator[ReadBudget]:
        """Connections this thread takes from a `bounded_session` pool are watched meanwhile."""
        token = _BUDGET.set(self)
        try:
            yield self
        finally:
            _BUDGET.reset(token)

    def _watch(self, conn: Any) -> None:
        with self._lock:
            self._connections.add(conn)
            expired = self._expired
        if expired:
            self.expire()

    def _unwatch(self, conn: Any) -> None:
        with self._lock:
            self._connections.discard(conn)


class _WatchedPool:
    """Mixin for urllib3 pools: a connection in use by a thread inside `ReadBudget.active()` is
    watched by that budget until it goes back to the pool."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        budget = _BUDGET.get()
        if budget is not None:
            budget._watch(conn)
        return conn

    def _put_conn(self, conn: Any) -> None:
        budget = _BUDGET.get()
        if budget is not None and conn is not None:
            budget._unwatch(conn)
        super()._put_conn(conn)  # type: ignore[misc]


class _WatchedHTTPPool(_WatchedPool, HTTPConnectionPool):
    pass


class _WatchedHTTPSPool(_WatchedPool, HTTPSConnectionPool):
    pass


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


def bounded_session(pool_size: int = 10) -> requests.Session:
    """A session whose connections a `ReadBudget` can shut down (see `ReadBudget.expire`)."""
    session = requests.Session()
    adapter = _WatchedAdapter(pool_maxsize=max(10, pool_size))
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _mib(n: int) -> str:
    return f"{n / MIB:g} MiB"


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


class BearerAuth(requests.auth.AuthBase):
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
        return "<BearerAuth ***>"


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
        self._origin = _origin(self.url)
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
            raise FhirResponseTooLarge(f"FHIR server answer exceeded {_mib(cap)}")
        started = time.monotonic()
        body = bytearray()
        try:
            for chunk in response.iter_content(_CHUNK_BYTES):
                body += chunk
                if len(body) > cap:
                    raise FhirResponseTooLarge(f"FHIR server answer exceeded {_mib(cap)}")
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
