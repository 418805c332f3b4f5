"""The HTTP side of a Bulk Data export: where the access token may go, a new token on 401, and
waiting as `Retry-After` says on 429 and 5xx (and while the export runs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from cds_service.data.fhir import InsecureFhirServer, check_fhir_server_url, parse_retry_after
from cds_service.training.errors import ServerError, UnsafeUrl
from cds_service.training.smart_auth import BackendServicesToken

TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
_TIMEOUT = (10.0, 300.0)  # connect, read: a large file may pause between chunks


@dataclass(frozen=True)
class Waits:
    """How long to wait when the server says "later" (a 202 while the export runs, or 429 and
    5xx), and for how many such answers in a row before giving up. Tests pass `minimum=0`."""

    default: float = 10.0  # no Retry-After
    minimum: float = 1.0  # never poll faster, whatever Retry-After says
    maximum: float = 3600.0  # a Retry-After beyond this is taken as this
    retries: int = 8

    def after(self, response: requests.Response) -> float:
        asked = parse_retry_after(response.headers.get("Retry-After"))
        return min(max(self.default if asked is None else asked, self.minimum), self.maximum)


class FhirSession:
    """The HTTP side of one export: the token only to the FHIR server's origin, over https (or
    loopback http when the site allows it); 401 → a new token, once; 429 and 5xx → wait as
    `Retry-After` says, up to `waits.retries` times in a row."""

    def __init__(self, fhir_url: str, session: requests.Session, *, waits: Waits,
                 allow_http_loopback: bool, report: Callable[[str], None],
                 sleep: Callable[[float], None]):
        self.fhir_url = fhir_url.rstrip("/")
        self.session = session
        self.waits = waits
        self.allow_http_loopback = allow_http_loopback
        self.report = report
        self.sleep = sleep
        self.token: BackendServicesToken | None = None
        parts = urlsplit(self.fhir_url)
        self._origin = (parts.scheme.lower(), parts.hostname, parts.port)

    def check(self, url: str, *, what: str, same_origin: bool = True) -> None:
        try:
            check_fhir_server_url(url.split("?", 1)[0],
                                  allow_http_loopback=self.allow_http_loopback)
        except InsecureFhirServer as exc:
            raise UnsafeUrl(f"{what} {url!r} is not https; nothing is sent there") from exc
        parts = urlsplit(url)
        if same_origin and (parts.scheme.lower(), parts.hostname, parts.port) != self._origin:
            raise UnsafeUrl(f"{what} {url!r} is not on the FHIR server {self.fhir_url}; the "
                            "access token is not sent there")

    def wait_retry(self, response: requests.Response, what: str, attempt: int) -> None:
        if attempt > self.waits.retries:
            raise ServerError(f"{what}: {response.status_code}{outcome_text(response)}, "
                              f"{attempt} times in a row; rerun later to resume")
        delay = self.waits.after(response)
        self.report(f"  {what}: server answered {response.status_code}; retrying in "
                    f"{delay:g} s")
        self.sleep(delay)

    def request(self, method: str, url: str, *, what: str, with_token: bool = True,
                headers: dict[str, str] | None = None, stream: bool = False
                ) -> requests.Response:
        """The response to `method url` once it is neither a 401 nor transient; other statuses
        are the caller's to judge."""
        self.check(url, what=what, same_origin=with_token)
        refreshed = False
        attempt = 0
        while True:
            auth = self.token.auth() if with_token and self.token else None
            try:
                response = self.session.request(method, url, headers=headers, auth=auth,
                                                stream=stream, timeout=_TIMEOUT)
            except requests.RequestException as exc:
                attempt += 1
                if attempt > self.waits.retries:
                    raise ServerError(f"{what}: {url} unreachable ({type(exc).__name__}); "
                                      "rerun to resume") from exc
                self.report(f"  {what}: {type(exc).__name__}; retrying")
                self.sleep(self.waits.default)
                continue
            if response.status_code == 401 and auth and not refreshed and self.token:
                # The token lapsed between our check and the server's (clock skew, a token
                # revoked early): one new token, one more try.
                response.close()
                self.token.invalidate()
                refreshed = True
                continue
            if response.status_code in TRANSIENT_STATUSES:
                attempt += 1
                try:
                    self.wait_retry(response, what, attempt)
                finally:
                    response.close()
                continue
            return response


def outcome_text(response: requests.Response) -> str:
    """The first OperationOutcome issue's diagnostics or details text, if the body is one."""
    try:
        body = response.json()
        issue = body["issue"][0]
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    return f" ({text})" if isinstance(text, str) and text else ""
