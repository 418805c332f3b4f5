"""Prefetch: the templates a service asks with, their settings, and the `Prefetch` it gets.

CDS Hooks 2.0 §Prefetch Template: the EHR MAY satisfy any subset of a service's prefetch templates;
"it is the service's responsibility to check prefetch data against its templates and
programmatically retrieve anything missing", and to answer 412 when it cannot. For each key:

- a resource (read) or a Bundle (search): used as given (the Bundle's resources; a read given a
  Bundle holding that one resource is unwrapped). Source "prefetch".
- `null`: the EHR has no data (rule 48). None, not refetched. Source "null".
- absent, not an object (the 2.0 spec's own example sends `"user": "123"`), an OperationOutcome,
  or a Bundle with an error/fatal OperationOutcome entry (rule 49): fetched from fhirServer with
  the bearer token; a read answered 404 is None. Source "fetched".
- template unsatisfiable from the context (e.g. no encounterId): None, nothing sent.
  Source "unsatisfiable".
- a key in `optional` that cannot be obtained: None. Source "optional-missing".
- keys the service did not ask for are ignored (rule 46).

Pagination (2.0 lets the EHR page prefetch results, rule 53). Decision: a `next` link is followed,
for prefetched and fetched searchsets alike, when the request carries a token and fhirServer and
the link is under fhirServer, up to `PrefetchSettings.max_pages` pages in total and within the
deadline; a failure while following it fails like any fetch (412). Without a token, or when the
link points elsewhere or the page cap is reached, the pages on hand are used, a warning is logged
and the key is listed in `Prefetch.truncated` so a service that needs completeness can refuse.

Where the rest lives: `cds_service.data.prefetch_resolve` (`resolve_prefetch`: the per-key
decision above, and where a 412 is decided), `cds_service.data.prefetch_values` (whether a value
can stand for a template's result; searchset entries and paging links) and
`cds_service.data.prefetch_fallback` (the reads from fhirServer for what is missing).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from cds_service.data.fhir import allowed_by
from cds_service.data.read_budget import DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_MAX_TOTAL_BYTES

USER_TOKENS: Mapping[str, str] = {
    "userPractitionerId": "Practitioner",
    "userPractitionerRoleId": "PractitionerRole",
    "userPatientId": "Patient",
    "userRelatedPersonId": "RelatedPerson",
}

# CDS Hooks 2.0 §Prefetch tokens (rules 40-41): `{{context.<root field>}}` or a user token.
TOKEN_RE = re.compile(r"\{\{(context\.[A-Za-z][A-Za-z0-9]*|" + "|".join(USER_TOKENS) + r")\}\}")
_ANY_TOKEN_RE = re.compile(r"\{\{(.*?)\}\}")
_RESOURCE_TYPE_RE = re.compile(r"[A-Z][A-Za-z]+")
_ID_RE = re.compile(r"[A-Za-z0-9\-.]+")
# context.userId is `[ResourceType]/[id]` (patient-view, order-select, order-sign).
_USER_REF_RE = re.compile(r"([A-Z][A-Za-z]+)/([^/?#\s]+)")
# Rule 43 (query subset): no _include/_revinclude/_has, no chaining, only the `:in` modifier.
_FORBIDDEN_PARAMS = ("_include", "_revinclude", "_has")


@dataclass(frozen=True)
class PrefetchSettings:
    """How hard to try for data the EHR did not prefetch, and where.

    `fhir_servers`: the FHIR bases calls may read from (a request's fhirServer must equal one or
    lie below it); empty reads from nowhere. The site configuration fills it in.
    `allow_http_loopback` lets tests use a plain-http FHIR server on 127.0.0.0/8, ::1 or
    localhost; it must stay False in production (rule 20: fhirServer MUST be https).
    Each call uses and closes its own connections: a `ReadBudget` can cut them off without
    touching another call's.
    """

    deadline_s: float = 2.5
    max_pages: int = 10
    allow_http_loopback: bool = False
    max_redirects: int = 3
    max_rate_limit_retries: int = 2
    fhir_servers: tuple[str, ...] = ()
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    max_parallel_reads: int = 8

    def allows(self, fhir_server: Any) -> bool:
        """Whether `fhir_server` may be read from (and receive the token). Pure: no DNS."""
        return allowed_by(fhir_server, self.fhir_servers)


class Prefetch(Mapping[str, Any]):
    """key -> resource dict (read), list of resource dicts (search) or None.

    `sources[key]` is "prefetch", "null", "fetched", "unsatisfiable" or "optional-missing";
    `fetched` lists the relative URLs requested from fhirServer (for the audit log);
    `truncated` holds search keys whose results are known to be incomplete (see module doc).
    """

    def __init__(
        self,
        values: Mapping[str, Any],
        sources: Mapping[str, str],
        fetched: list[str] | None = None,
        truncated: set[str] | frozenset[str] = frozenset(),
    ):
        self._values = dict(values)
        self.sources: dict[str, str] = dict(sources)
        self.fetched: list[str] = list(fetched or [])
        self.truncated: frozenset[str] = frozenset(truncated)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:  # no resource contents: they are PHI
        return f"Prefetch(sources={self.sources!r})"


def is_search(template: str) -> bool:
    """Templates containing `?` are searches; the others are reads."""
    return "?" in template


def lint_template(template: str) -> list[str]:
    """Problems with a discovery prefetch template (rules 39-43); [] when it is fine.

    Used at configuration load, so messages name the offending token or parameter.
    """
    if not isinstance(template, str) or not template.strip():
        return ["template must be a non-empty string"]
    problems: list[str] = []
    for match in _ANY_TOKEN_RE.finditer(template):
        if TOKEN_RE.fullmatch(match.group(0)):
            continue
        inner = match.group(1)
        if re.fullmatch(r"context\.[A-Za-z][A-Za-z0-9]*(\.[^{}]*)+", inner):
            problems.append(f"token {match.group(0)} is not a root-level context field (rule 41)")
        else:
            problems.append(
                f"token {match.group(0)} is not {{{{context.<field>}}}} or a user token"
                f" ({', '.join(USER_TOKENS)}) (rule 40)"
            )
    skeleton = _ANY_TOKEN_RE.sub("T", template)
    if "{" in skeleton or "}" in skeleton:
        problems.append("unbalanced '{{' or '}}'")
    if any(c.isspace() for c in template):
        problems.append("template contains whitespace")
    path, sep, query = template.partition("?")
    if ":" in path or path.startswith("/"):
        problems.append("template must be a relative URL, not an absolute URL or path")
        return problems
    if "#" in template:
        problems.append("template must not contain a fragment")
    if sep:
        if not _RESOURCE_TYPE_RE.fullmatch(path):
            problems.append(f"search must be 'Type?params', got path {path!r} (rule 39)")
        problems.extend(_lint_query(query))
    elif path != "{{context.userId}}":
        parts = path.split("/")
        ok = (
            len(parts) == 2
            and _RESOURCE_TYPE_RE.fullmatch(parts[0]) is not None
            and (TOKEN_RE.fullmatch(parts[1]) is not None or _ID_RE.fullmatch(parts[1]) is not None)
        )
        if not ok:
            problems.append(
                f"template {template!r} is neither a read 'Type/id' nor a search 'Type?params'"
                " (rule 39)"
            )
    return problems


def _lint_query(query: str) -> list[str]:
    if not query:
        return ["search has no parameters"]
    problems = []
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        if not part or not name:
            problems.append("search has an empty parameter")
            continue
        if "{{" in name:
            problems.append(f"parameter name {name!r} contains a token")
            continue
        if not eq or not value:
            problems.append(f"parameter {name!r} has no value")
        base, _, modifier = name.partition(":")
        if base in _FORBIDDEN_PARAMS or base.startswith("_has"):
            problems.append(f"parameter {base!r} is outside the prefetch query subset (rule 43)")
        elif "." in name:
            problems.append(f"chained parameter {name!r} is outside the query subset (rule 43)")
        elif modifier and modifier != "in":
            problems.append(
                f"modifier ':{modifier}' on {base!r} is outside the query subset;"
                " only ':in' is allowed (rule 43)"
            )
    return problems


def render_template(template: str, context: Mapping) -> str | None:
    """The relative URL for `template` in this hook context, or None when any token cannot be
    satisfied (absent, empty, non-primitive context value; user token of another type).

    Substituted values are percent-encoded; `{{context.userId}}` expands to `Type/id` (rule 42).
    User tokens derive from context.userId only: `PractitionerRole/123` gives
    userPractitionerRoleId=123, and userPractitionerId stays unsatisfiable (it would take a read).
    """
    if not isinstance(template, str):
        return None
    if not isinstance(context, Mapping):
        context = {}
    user = _user_reference(context.get("userId"))
    unsatisfied = False

    def substitute(match: re.Match) -> str:
        nonlocal unsatisfied
        value = _token_value(match.group(1), context, user)
        if value is None:
            unsatisfied = True
            return ""
        return value

    rendered = _ANY_TOKEN_RE.sub(substitute, template)
    if unsatisfied or "{{" in rendered or "}}" in rendered:
        return None
    return rendered


def _user_reference(user_id: Any) -> tuple[str, str] | None:
    if not isinstance(user_id, str):
        return None
    match = _USER_REF_RE.fullmatch(user_id)
    if not match or match.group(2) in (".", ".."):
        return None
    return match.group(1), match.group(2)


def _token_value(name: str, context: Mapping, user: tuple[str, str] | None) -> str | None:
    if name == "context.userId":
        return None if user is None else f"{quote(user[0], safe='')}/{quote(user[1], safe='')}"
    if name in USER_TOKENS:
        if user is None or user[0] != USER_TOKENS[name]:
            return None
        return quote(user[1], safe="")
    match = re.fullmatch(r"context\.([A-Za-z][A-Za-z0-9]*)", name)
    if not match:
        return None
    value = _primitive(context.get(match.group(1)))
    return None if value is None else quote(value, safe="")


def _primitive(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, str) and value.strip() and value not in (".", ".."):
        return value
    return None


def read_type_of(template: str, rendered: str | None) -> str | None:
    """The resource type a read template reads, when known."""
    path = (rendered or template).split("?", 1)[0]
    first = path.split("/", 1)[0]
    return first if _RESOURCE_TYPE_RE.fullmatch(first) else None
