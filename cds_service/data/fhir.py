"""Rules for reading the EHR's FHIR server: which servers, where the token may go, typed errors.

The bearer token handed to us in `fhirAuthorization` is sent only over https (or, when a setting
allows it, plain http to a loopback host for tests), only to the origin of `fhirServer`, and
never logged. CDS Hooks 2.0 §FHIR Resource Access; best practices §FHIR Access ("never store,
share, or log the access token").

Which servers: a request names its own `fhirServer`, so a validly signed call could point the
service (and the EHR's token) at any host, internal ones included. A site lists the FHIR bases
its calls may use (`FhirBase`, `allowed_by`); `cds_service.data.prefetch_resolve` never contacts
any other.

Errors are typed (`FhirRequestError` subclasses) with a `reason` that is safe to show to the
caller: it names the failure class and status, never the token, the query string or resource
contents. `cds_service.data.prefetch_resolve` turns them into `FhirAccessError` naming the
prefetch key.

The reads themselves: `cds_service.data.fhir_client` (GET only), under a
`cds_service.data.read_budget.ReadBudget`.
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
from fhirpy.base.exceptions import BaseFHIRError

MIB = 1024 * 1024
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


@functools.lru_cache(maxsize=256)
def _parsed(url: str) -> FhirBase:
    # Every call checks its fhirServer against the site's bases: one parse per distinct URL.
    return FhirBase.parse(url)


def allowed_by(url: Any, allowed: Iterable[str]) -> bool:
    """True when `url` equals or lies below one of the `allowed` FHIR bases. Pure: no DNS."""
    try:
        wanted = _parsed(url) if isinstance(url, str) else FhirBase.parse(url)
    except ValueError:
        return False
    for entry in allowed:
        try:
            if (_parsed(entry) if isinstance(entry, str) else FhirBase.parse(entry)).contains(
                    wanted):
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


def url_origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of `url`, lower case, the scheme's default port filled in: what
    "same origin" compares. ValueError on a malformed port."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme, 0)


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
