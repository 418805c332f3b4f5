"""Audit log of PHI access: one append-only `AuditRecord` per service invocation and feedback call.

HIPAA Security Rule, audit controls (45 CFR 164.312(b)), and the accounting a covered entity owes
a patient: record *who* (iss, sub, user_id) accessed *which patient's* data (patient_id,
encounter_id) *when* (time), *through what* (site, hook, service_id, the prefetch keys used and
the FHIR URLs fetched) and *with what result* (cards returned, outcome, status). Never the data
itself and never a credential: the log is kept for years and read by people who may not see PHI
contents or reuse a token.

`AuditRecord` enforces that when it is built (`ValueError`, naming the field but never echoing the
value): strings only (a dict or list is resource contents), bounded lengths, and no string that
looks like a JWT, a long opaque token, a `...token=` / `password=` pair or serialized FHIR JSON.
URLs go through `strip_url_secrets` first, so a fetched URL that carried `access_token=...` is
stored without it. These checks are heuristics backing the structural guarantee (no field takes a
token or a resource): callers still pass identifiers only.

A call's record is never dropped for what the caller sent: `lenient_record` first makes every
value one the record can hold (`safe_text`: a token- or resource-like value is replaced by a
marker naming a short sha256 of it, a long one truncated, control characters escaped, a
non-string named by its type), so the strict checks above pass and the access is on record.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, fields
from datetime import UTC, datetime
from urllib.parse import unquote_plus, urlsplit, urlunsplit

INVOKE = "invoke"
FEEDBACK = "feedback"
KINDS = (INVOKE, FEEDBACK)

MAX_TEXT = 500  # any string field, and each card / suggestion id or prefetch key
MAX_URL = 2048  # each fetched URL
MAX_ITEMS = 1000  # each tuple field

# Three base64url segments, the first a JSON header (base64url of '{"' is "eyJ"): JWS, and the
# first three segments of a JWE. Matched anywhere in a string ("Bearer eyJ...", "?x=eyJ...").
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
# An unbroken run longer than any identifier we store: FHIR ids are at most 64 characters of
# [A-Za-z0-9-.] (https://hl7.org/fhir/R4/datatypes.html#id), UUIDs 36. Opaque bearer tokens
# (base64url, often 100+ characters) are longer. "/" and "." are excluded so paths and hosts split.
_OPAQUE_TOKEN = re.compile(r"[A-Za-z0-9_~+=-]{65,}")
_CREDENTIAL_PAIR = re.compile(r"(?i)(?:token|secret|password|passwd)=[^&\s]")
_RESOURCE_JSON = re.compile(r'"resourceType"\s*:')

# Query parameter names (lower-cased, without "_", "-", ".") that carry credentials.
_SECRET_NAME_PARTS = (
    "token",  # access_token, id_token, refresh_token, x-amz-security-token
    "secret",  # client_secret
    "passw",
    "pwd",
    "apikey",
    "accesskey",
    "credential",
    "assertion",  # client_assertion (RFC 7523)
    "signature",
    "session",
    "jwt",
    "bearer",
    "authorization",
)
# Not `code`: in a FHIR search it is the `system|code` token that says which data was read
# (audit-worthy); the OAuth authorization code never appears in a FHIR read URL.
_SECRET_NAMES = frozenset({"key", "sig", "auth", "pass", "otp"})

TEXT_FIELDS = (
    "site",
    "iss",
    "sub",
    "user_id",
    "patient_id",
    "encounter_id",
    "hook",
    "hook_instance",
    "service_id",
    "outcome",
    "detail",
    "fhir_server_refused",
)
TUPLE_FIELDS = (
    "prefetch_keys_used",
    "fhir_urls_fetched",
    "card_uuids",
    "suggestion_uuids",
    "feedback_cards",
)
_URL_FIELDS = ("iss", "fhir_urls_fetched")
_PREFETCH_KEY_USED = re.compile(r"[^:\s]+:[^:\s]+")


def _is_secret_name(name: str) -> bool:
    normalized = re.sub(r"[-_.\s]", "", unquote_plus(name).lower())
    return normalized in _SECRET_NAMES or any(p in normalized for p in _SECRET_NAME_PARTS)


def strip_url_secrets(url: str) -> str:
    """`url` without userinfo, fragment, or query parameters whose name looks like a credential.

    Relative or absolute. The parameters kept are left byte for byte as given (no re-encoding), so
    the stored URL still reads like the request that was made.
    """
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    kept = [
        pair
        for pair in re.split(r"[&;]", parts.query)
        if pair and not _is_secret_name(pair.partition("=")[0])
    ]
    return urlunsplit((parts.scheme, netloc, parts.path, "&".join(kept), ""))


def prefetch_key_sources(sources: Mapping[str, str]) -> tuple[str, ...]:
    """`Prefetch.sources` ({"egfr": "fetched"}) as sorted "key:source" strings."""
    return tuple(f"{key}:{source}" for key, source in sorted(sources.items()))


# An identifier-like string every check below passes unchanged, told by one match instead of
# five searches (most fields of a call are such: ids, uuids, hook and service names): no control
# character, no `=` (credential pair), no `"` (resource JSON), too short for an opaque token
# (65+) and, without "eyJ", no JWT. tests/test_audit.py `test_plain_passes_every_check` holds it
# to that.
_PLAIN = re.compile(r"[A-Za-z0-9._:/@|-]{0,64}")


def _plain(value: str) -> bool:
    return _PLAIN.fullmatch(value) is not None and "eyJ" not in value


def _check_text(name: str, value: object, limit: int = MAX_TEXT) -> None:
    if not isinstance(value, str):
        raise ValueError(f"AuditRecord.{name}: expected a string, got {type(value).__name__}")
    if len(value) <= limit and _plain(value):
        return
    if len(value) > limit:
        raise ValueError(f"AuditRecord.{name}: longer than {limit} characters")
    if "\x00" in value:
        raise ValueError(f"AuditRecord.{name}: contains a NUL character")
    if _JWT.search(value):
        raise ValueError(f"AuditRecord.{name}: looks like a JWT; never store tokens")
    if _OPAQUE_TOKEN.search(value) or _CREDENTIAL_PAIR.search(value):
        raise ValueError(f"AuditRecord.{name}: looks like a credential; never store tokens")
    if _RESOURCE_JSON.search(value):
        raise ValueError(f"AuditRecord.{name}: looks like FHIR resource contents")


# C0 and C1 controls (tab and newline too: one record, one line in `audit show`), and lone
# UTF-16 surrogates, which no database text column holds.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _digest(value: str) -> str:
    # 12 hex digits: enough to match a withheld value against one a reviewer holds, far too few
    # to be the value. surrogatepass: a lone surrogate must hash, not raise.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def safe_text(value: object, limit: int = MAX_TEXT) -> str:
    """`value` as an audit field can hold it (`_check_text` passes), keeping what is safe to keep.

    A string that looks like a token or a credential becomes `[token-like value withheld
    sha256:…]`, one that looks like FHIR resource contents `[resource-like value withheld …]`;
    control characters and lone surrogates are escaped (`\\x00`); a value over `limit` keeps
    its start and says how long it was. Anything but a string is named by its type only.
    Deterministic: the same value always gives the same text, so it still correlates.
    """
    if not isinstance(value, str):
        return f"[{type(value).__name__} value withheld]"
    if len(value) <= limit and _plain(value):
        return value
    text = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                            else f"\\u{ord(m.group()):04x}", value)
    if _JWT.search(text) or _OPAQUE_TOKEN.search(text) or _CREDENTIAL_PAIR.search(text):
        return f"[token-like value withheld sha256:{_digest(value)}]"
    if _RESOURCE_JSON.search(text):
        return f"[resource-like value withheld sha256:{_digest(value)}]"
    if len(text) > limit:
        marker = f"…[truncated, {len(value)} characters, sha256:{_digest(value)}]"
        text = text[:limit - len(marker)] + marker
    return text


@dataclass(frozen=True, kw_only=True)
class AuditRecord:
    """Who accessed which patient's data, when, through which service; validated on creation.

    `time` must be timezone-aware and is normalized to UTC. Tuple fields also accept a list of
    strings (stored as a tuple); `iss` and `fhir_urls_fetched` pass through `strip_url_secrets`.
    """

    kind: str
    time: datetime
    status: int
    site: str | None = None
    iss: str | None = None
    sub: str | None = None
    user_id: str | None = None
    patient_id: str | None = None
    encounter_id: str | None = None
    hook: str | None = None
    hook_instance: str | None = None
    service_id: str | None = None
    prefetch_keys_used: tuple[str, ...] = ()  # "key:source", e.g. "egfr:fetched"
    fhir_urls_fetched: tuple[str, ...] = ()  # relative URLs, credentials stripped
    card_uuids: tuple[str, ...] = ()
    suggestion_uuids: tuple[str, ...] = ()
    feedback_cards: tuple[str, ...] = ()  # card ids of a feedback batch
    outcome: str | None = None  # "200 cards=2", "412", "401"
    detail: str | None = None  # short, e.g. a suppression decision
    # `scheme://host:port` of a fhirServer the site does not allow (never contacted).
    fhir_server_refused: str | None = None
    # Set by `lenient_record` only: its values come out of `safe_text` / `_safe_items`, which
    # pass every check below by construction (tests/test_audit.py holds them to that), and
    # checking them twice was a tenth of the audit hand-off of a 3 KB call (issue 20).
    _safe: InitVar[bool] = False

    def __post_init__(self, _safe: bool) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"AuditRecord.kind: must be one of {', '.join(KINDS)}")
        if not isinstance(self.time, datetime) or self.time.utcoffset() is None:
            raise ValueError("AuditRecord.time: must be a timezone-aware datetime")
        object.__setattr__(self, "time", self.time.astimezone(UTC))
        if type(self.status) is not int or not 100 <= self.status <= 599:
            raise ValueError("AuditRecord.status: must be an HTTP status code (int)")
        if _safe:
            return
        for name in TEXT_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if name in _URL_FIELDS and isinstance(value, str):
                value = strip_url_secrets(value)
                object.__setattr__(self, name, value)
            _check_text(name, value)
        for name in TUPLE_FIELDS:
            object.__setattr__(self, name, self._checked_items(name, getattr(self, name)))

    @staticmethod
    def _checked_items(name: str, values: object) -> tuple[str, ...]:
        if not isinstance(values, tuple | list):
            raise ValueError(
                f"AuditRecord.{name}: expected a tuple of strings, got {type(values).__name__}"
            )
        if len(values) > MAX_ITEMS:
            raise ValueError(f"AuditRecord.{name}: more than {MAX_ITEMS} items")
        items = []
        for value in values:
            if name in _URL_FIELDS and isinstance(value, str):
                value = strip_url_secrets(value)
            _check_text(name, value, MAX_URL if name in _URL_FIELDS else MAX_TEXT)
            if name == "prefetch_keys_used" and not _PREFETCH_KEY_USED.fullmatch(value):
                raise ValueError(f"AuditRecord.{name}: items must be 'key:source'")
            items.append(value)
        return tuple(items)


AUDIT_FIELDS = tuple(f.name for f in fields(AuditRecord))


def _safe_items(name: str, values: object) -> tuple[str, ...]:
    if not isinstance(values, tuple | list):
        return (safe_text(values),)
    items = []
    for value in values[:MAX_ITEMS]:
        if name in _URL_FIELDS and isinstance(value, str):
            value = strip_url_secrets(value)
        item = safe_text(value, MAX_URL if name in _URL_FIELDS else MAX_TEXT)
        if name == "prefetch_keys_used" and not _PREFETCH_KEY_USED.fullmatch(item):
            item = f"withheld:sha256-{_digest(item)}"
        items.append(item)
    return tuple(items)


def lenient_record(*, kind: str, time: datetime, status: int, **values: object) -> AuditRecord:
    """An `AuditRecord` of a call whatever the caller sent: each field through `safe_text`
    (tuple fields item by item, at most MAX_ITEMS), `None` values left out. `kind`, `time` and
    `status` are ours and stay strict."""
    safe: dict[str, object] = {}
    for name, value in values.items():
        if value is None:
            continue
        if name in TUPLE_FIELDS:
            safe[name] = _safe_items(name, value)
        elif name in _URL_FIELDS and isinstance(value, str):
            safe[name] = safe_text(strip_url_secrets(value))
        else:
            safe[name] = safe_text(value)
    return AuditRecord(kind=kind, time=time, status=status, **safe, _safe=True)


# What an access review reads first, in this order (`cds-service audit show --format table`).
REVIEW_COLUMNS = ("time", "kind", "status", "site", "user_id", "patient_id", "hook",
                  "hook_instance", "service_id", "outcome")

