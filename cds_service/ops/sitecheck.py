"""Site readiness before go-live: `cds-service site check SITE`.

Epic implements a subset of FHIR R4 and says which in its CapabilityStatement
(`GET [base]/metadata`, served without a token). A search parameter the server does not support
need not be an error: with lenient handling (https://hl7.org/fhir/R4/search.html#errors) the
server ignores it, so a template relying on it silently gets other data. This check reads the
statement and, for each enabled service and prefetch template, reports whether the resource
type, the interaction (`search-type` or `read`), each search parameter, `_sort` and `_count` are
supported; then the orderables the services read, and each issuer's JWK Set (a `jwks_file` as
strictly as the token verifier loads it; each allow-listed `jku` fetched the way the verifier
fetches it).

What counts as required (FAIL, exit 1):
- for a prefetch key the service cannot do without (not in `optional_prefetch`): the resource
  type, its interaction, every search parameter, and `_sort` when the template also has `_count`
  (an ignored `_sort` leaves the server's own order, which `_count` then pages, so the newest
  results may never be read);
- a FHIR version other than 4.0.x (the services read R4 resources);
- an issuer's JWK Set that is unusable or unreachable (every token of that issuer is refused).
- a model the site names whose manifest is unreadable, whose `approved_use` does not list the
  use (`model`: active, `shadow_model`: shadow), or lacking an output the site's `thresholds`
  name (each of these also stops start-up; checked from the manifest alone).
Warnings: anything about an optional key; `_sort` unsupported without `_count` (harmless: the
services take the newest result by date themselves); `_count` without `_sort`, or unsupported;
modifiers and chained parameters (a CapabilityStatement cannot say); a missing orderable; a site
trusting no issuer.

FHIR base: `--fhir-base`, else the site's `fhir_server`, else each issuer's `iss` that is an
https URL (Epic's `iss` is its FHIR R4 base). http only to a loopback host when the site sets
`prefetch.allow_http_loopback`, as for fallback reads. No FHIR base, or a statement that cannot
be read, raises `SiteCheckError`: the check cannot run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cds_service.config import Site, SiteService
from cds_service.data.fhir import FhirRequestError, InsecureFhirServer, check_fhir_server_url
from cds_service.data.fhir_client import ReadOnlyFHIRClient
from cds_service.data.prefetch import is_search
from cds_service.trust.jwks_fetch import FetchFailed, JwksFetcher, check_jku_url
from cds_service.trust.keys import KeySet
from cds_service.trust.settings import AuthSettings

OK, WARN, FAIL = "ok", "warn", "FAIL"
DEFAULT_TIMEOUT_S = 10.0

FHIR, ORDERABLES, ISSUERS, MODELS = "fhir", "orderables", "issuers", "models"

# The services take the newest result by its date from whatever a search returns
# (cds_service/features/values.py), so the server's order matters only where `_count` cuts it.
IGNORED_SORT = ("not listed: ignored, results come in the server's order; harmless (the "
                "services take the newest by date), but drop it so the template says what the "
                "server does")
IGNORED_SORT_WITH_COUNT = ("not listed: ignored, so `_count` pages the server's order and the "
                           "newest results may lie past prefetch.max_pages pages; drop `_sort` "
                           "and `_count`")
COUNT_WITHOUT_SORT = ("pages come in the server's order, so the newest results may lie past "
                      "prefetch.max_pages pages; drop `_count`")
_COLUMNS = ("service", "key", "check", "status", "detail")


class SiteCheckError(Exception):
    """The check cannot run: no FHIR base, a refused base URL, or no usable CapabilityStatement."""


@dataclass(frozen=True)
class Check:
    """One row of the report; `server` is the FHIR base for rows of the `fhir` section."""

    section: str
    service: str
    key: str
    check: str
    status: str
    detail: str = ""
    server: str | None = None


@dataclass(frozen=True)
class Server:
    base: str
    software: str
    fhir_version: str | None


@dataclass(frozen=True)
class Report:
    site: str
    source: str
    servers: tuple[Server, ...]
    checks: tuple[Check, ...]

    @property
    def failures(self) -> int:
        return sum(c.status == FAIL for c in self.checks)

    @property
    def warnings(self) -> int:
        return sum(c.status == WARN for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "source": self.source,
            "servers": [{"base": s.base, "software": s.software, "fhirVersion": s.fhir_version}
                        for s in self.servers],
            "checks": [asdict(c) for c in self.checks],
            "failures": self.failures,
            "warnings": self.warnings,
        }


# -- CapabilityStatement ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Resource:
    interactions: frozenset[str]
    params: frozenset[str]


@dataclass(frozen=True)
class Capabilities:
    """What `rest[mode=server]` of a CapabilityStatement declares."""

    software: str
    fhir_version: str | None
    resources: Mapping[str, _Resource]
    # rest.searchParam: "supported for searching all resources" (R4 CapabilityStatement).
    common_params: frozenset[str]

    @classmethod
    def parse(cls, statement: Any, where: str) -> Capabilities:
        """Raises SiteCheckError when `statement` is not a server CapabilityStatement."""
        if statement is None:
            raise SiteCheckError(f"{where} answered an empty body, not a CapabilityStatement")
        if not isinstance(statement, Mapping):
            raise SiteCheckError(f"{where} answered JSON that is not a FHIR resource")
        kind = statement.get("resourceType")
        if kind != "CapabilityStatement":
            raise SiteCheckError(f"{where} answered resourceType {str(kind)[:40]!r}, not a "
                                 "CapabilityStatement")
        rest = next((r for r in _dicts(statement.get("rest")) if r.get("mode") == "server"), None)
        if rest is None:
            raise SiteCheckError(f"{where}: the CapabilityStatement has no rest entry with mode "
                                 "`server`")
        resources: dict[str, _Resource] = {}
        for entry in _dicts(rest.get("resource")):
            if isinstance(entry.get("type"), str):
                resources[entry["type"]] = _Resource(
                    interactions=_names(entry.get("interaction"), "code"),
                    params=_names(entry.get("searchParam"), "name"))
        software = statement.get("software")
        software = software if isinstance(software, Mapping) else {}
        label = " ".join(str(software[k]) for k in ("name", "version") if software.get(k))
        version = statement.get("fhirVersion")
        return cls(software=label or "unnamed server",
                   fhir_version=version if isinstance(version, str) else None,
                   resources=resources, common_params=_names(rest.get("searchParam"), "name"))

    def supports_param(self, resource: _Resource, name: str) -> bool:
        return name in resource.params or name in self.common_params


def _dicts(value: Any) -> Iterable[Mapping]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _names(value: Any, member: str) -> frozenset[str]:
    return frozenset(v[member] for v in _dicts(value) if isinstance(v.get(member), str))


def fhir_bases(site: Site, override: str | None = None) -> list[tuple[str, str]]:
    """(where it was configured, base URL) of every FHIR server to check."""
    if override:
        candidates = [("--fhir-base", override)]
    elif site.fhir_server:
        candidates = [(f"{site.source}: fhir_server", site.fhir_server)]
    else:
        # Epic's JWT `iss` is the organisation's FHIR R4 base (Epic CDS Hooks tutorial).
        candidates = [(f"{site.source}: issuers[{n}].iss", issuer.iss)
                      for n, issuer in enumerate(site.issuers)
                      if issuer.iss.lower().startswith("https://")]
    bases: dict[str, str] = {}
    for where, url in candidates:
        bases.setdefault(url.rstrip("/"), where)
    if not bases:
        raise SiteCheckError(
            f"site {site.id}: no FHIR server to check: pass --fhir-base URL or set `fhir_server` "
            f"in {site.source} (no issuer `iss` is an https FHIR base)")
    return [(where, url) for url, where in bases.items()]


def fetch_capability_statement(base: str, where: str, *, allow_http_loopback: bool,
                               timeout: float) -> Capabilities:
    """GET `{base}/metadata` without a token (Epic serves it unauthenticated)."""
    try:
        check_fhir_server_url(base, allow_http_loopback=allow_http_loopback)
    except InsecureFhirServer as exc:
        hint = ""
        if base.lower().startswith("http://"):
            hint = (" (plain http is used only for a loopback address, when the site sets "
                    "prefetch.allow_http_loopback)")
        raise SiteCheckError(f"{where}: {exc.reason}{hint}") from None
    metadata = f"{base}/metadata"
    with ReadOnlyFHIRClient(base, deadline=time.monotonic() + timeout,
                            allow_http_loopback=allow_http_loopback) as client:
        try:
            statement = client.get_json("metadata")
        except FhirRequestError as exc:
            raise SiteCheckError(f"cannot read {metadata}: {exc.reason}") from None
    return Capabilities.parse(statement, metadata)


# -- prefetch templates -----------------------------------------------------------------------


def check_template(service_id: str, key: str, template: str, caps: Capabilities, *,
                   required: bool, server: str | None = None) -> list[Check]:
    """The rows for one prefetch template against one server's capabilities."""
    missing = FAIL if required else WARN
    note = "" if required else " (optional key: not a failure)"

    def row(check: str, status: str, detail: str = "") -> Check:
        if status == WARN and not required and detail:
            detail += note
        return Check(FHIR, service_id, key, check, status, detail, server)

    path, _, query = template.partition("?")
    search = is_search(template)
    resource_type = path if search else path.split("/", 1)[0]
    interaction = "search-type" if search else "read"
    if not resource_type[:1].isupper():
        # `{{context.userId}}` reads whatever type the user is (Practitioner, PractitionerRole…).
        return [row("read", WARN, "the resource type depends on context.userId; not checked")]
    resource = caps.resources.get(resource_type)
    label = f"{resource_type} {interaction}"
    if resource is None:
        return [row(label, missing, f"{resource_type} is not in the CapabilityStatement")]
    if interaction not in resource.interactions:
        listed = ", ".join(sorted(resource.interactions)) or "none"
        return [row(label, missing, f"{resource_type} is listed without {interaction} "
                                    f"(interactions: {listed})")]
    rows = [row(label, OK)]
    parts = [part.partition("=")[::2] for part in query.split("&")] if search else []
    names = {name for name, _ in parts}
    for name, value in parts:
        base, _, modifier = name.partition(":")
        if base == "_sort":
            if caps.supports_param(resource, "_sort"):
                rows.append(row(f"_sort {value}", OK))
            elif "_count" in names:
                # Ignored (FHIR R4 search.html#errors: a server may ignore what it does not
                # support), so `_count` cuts the server's own order, not the newest results.
                rows.append(row(f"_sort {value}", missing, IGNORED_SORT_WITH_COUNT))
            else:
                rows.append(row(f"_sort {value}", WARN, IGNORED_SORT))
        elif base == "_count":
            if not caps.supports_param(resource, "_count"):
                rows.append(row(f"_count {value}", WARN,
                                "not listed: the server pages with its own size (prefetch "
                                "follows up to prefetch.max_pages next links)"))
            elif "_sort" not in names:
                rows.append(row(f"_count {value}", WARN, COUNT_WITHOUT_SORT))
            else:
                rows.append(row(f"_count {value}", OK))
        elif "." in base:
            rows.append(row(f"param {name}", WARN, "chained parameter: a CapabilityStatement "
                                                   "cannot say whether it works"))
        elif not caps.supports_param(resource, base):
            rows.append(row(f"param {base}", missing,
                            f"not listed for {resource_type}: ignored, so results come back "
                            "unfiltered"))
        elif modifier:
            rows.append(row(f"param {name}", WARN, f"`{base}` is listed; a CapabilityStatement "
                                                   f"cannot say whether :{modifier} works"))
        else:
            rows.append(row(f"param {base}", OK))
    return rows


def _fhir_version_row(caps: Capabilities, server: str) -> Check:
    version = caps.fhir_version
    if version is None:
        return Check(FHIR, "server", "-", "fhirVersion", WARN, "not stated; the services read "
                     "FHIR R4 (4.0.x)", server)
    if version.startswith("4.0."):
        return Check(FHIR, "server", "-", "fhirVersion", OK, version, server)
    return Check(FHIR, "server", "-", "fhirVersion", FAIL,
                 f"{version}: the services read FHIR R4 (4.0.x); is this the R4 base?", server)


def check_services(services: Mapping[str, SiteService], caps: Capabilities,
                   server: str) -> list[Check]:
    rows = [_fhir_version_row(caps, server)]
    for service_id, enabled in services.items():
        for key, template in enabled.prefetch.items():
            rows += check_template(service_id, key, template, caps, server=server,
                                   required=key not in enabled.service.optional_prefetch)
    return rows


# -- orderables -------------------------------------------------------------------------------


def check_orderables(site: Site) -> list[Check]:
    rows = []
    for service_id, enabled in site.services.items():
        for name, without in enabled.service.orderables.items():
            orderable = site.orderables.get(name)
            if orderable is None:
                rows.append(Check(ORDERABLES, service_id, name, "orderable", WARN,
                                  f"not in this site's `orderables`: {without}"))
            else:
                rows.append(Check(ORDERABLES, service_id, name, "orderable", OK,
                                  f"{orderable.code} {orderable.display}"))
    return rows


# -- models -----------------------------------------------------------------------------------


def check_models(site: Site, models_dir: str | Path) -> list[Check]:
    """Each model the site names, from its manifest alone (what start-up checks before loading
    the artifact): a use its `approved_use` does not list, or site thresholds on an output it
    lacks, FAIL, as they stop start-up."""
    from marshmallow import ValidationError

    from cds_service.models.errors import ModelError
    from cds_service.models.manifest import check_thresholds, load_manifest
    from cds_service.schema_errors import describe_errors

    rows = []
    for service_id, enabled in site.services.items():
        for key, use, model_id in (("model", "active", enabled.model),
                                   ("shadow_model", "shadow", enabled.shadow_model)):
            if not model_id:
                continue
            try:
                manifest = load_manifest(Path(models_dir) / model_id)
            except ModelError as exc:
                rows.append(Check(MODELS, service_id, key, "manifest", FAIL, str(exc)))
                continue
            uses = f"approved_use: [{', '.join(manifest.approved_use)}]"
            if manifest.approves(use):
                rows.append(Check(MODELS, service_id, key, "approved_use", OK,
                                  f"{model_id} {manifest.version}: {uses}"))
            else:
                rows.append(Check(MODELS, service_id, key, "approved_use", FAIL,
                                  f"{model_id} is not approved for {use} use "
                                  f"({manifest.source}: {uses})"))
            if use == "active" and enabled.thresholds:
                try:
                    check_thresholds(enabled.thresholds, manifest)
                except ValidationError as exc:
                    rows.append(Check(MODELS, service_id, "thresholds", "outputs", FAIL,
                                      describe_errors(exc, "thresholds")))
    return rows


# -- JWT issuers ------------------------------------------------------------------------------


def check_issuers(site: Site, *, timeout: float) -> list[Check]:
    if not site.issuers:
        return [Check(ISSUERS, "issuer", "-", "issuers", WARN,
                      "this site trusts no issuer: every call to it is refused with 401")]
    allow_http = site.allow_http_loopback_jku
    fetcher = JwksFetcher(AuthSettings(jwks_timeout_s=timeout,
                                       allow_http_loopback_jku=allow_http))
    rows = []
    try:
        for issuer in site.issuers:
            if issuer.jwks is not None:
                try:
                    # The verifier's own load of an out-of-band set: public signing keys only,
                    # each with a unique kid.
                    keys = KeySet.parse(issuer.jwks, strict=True, where="JWK Set")
                except ValueError as exc:
                    rows.append(Check(ISSUERS, "issuer", issuer.iss, "jwks_file", FAIL,
                                      f"{issuer.jwks_file}: {exc}"))
                else:
                    rows.append(Check(ISSUERS, "issuer", issuer.iss, "jwks_file", OK,
                                      f"{issuer.jwks_file}: {_keys(len(keys))}"))
            for n, url in enumerate(issuer.jku):
                rows.append(_jku_row(fetcher, issuer.iss, n, url, allow_http))
    finally:
        fetcher.close()
    return rows


def _jku_row(fetcher: JwksFetcher, iss: str, n: int, url: str, allow_http: bool) -> Check:
    problem = check_jku_url(url, allow_http_loopback=allow_http)
    if problem is not None:
        return Check(ISSUERS, "issuer", iss, f"jku[{n}]", FAIL, f"{url} {problem}")
    try:
        # The verifier's fetch: no redirects, size and time limits, unusable members skipped.
        keys = fetcher.fetch(url)
    except FetchFailed as exc:
        return Check(ISSUERS, "issuer", iss, f"jku[{n}]", FAIL, f"{url}: {exc}")
    if not len(keys):
        return Check(ISSUERS, "issuer", iss, f"jku[{n}]", FAIL,
                     f"{url}: no usable signature verification keys")
    return Check(ISSUERS, "issuer", iss, f"jku[{n}]", OK, f"{url}: {_keys(len(keys))}")


def _keys(n: int) -> str:
    return f"{n} signing key{'s' if n != 1 else ''}"


# -- the whole check --------------------------------------------------------------------------


def check_site(site: Site, *, fhir_base: str | None = None,
               timeout: float = DEFAULT_TIMEOUT_S,
               models_dir: str | Path | None = None) -> Report:
    """Every check for `site`; raises SiteCheckError when the FHIR side cannot be read.
    `models_dir`: default `CDS_MODELS_DIR`, else the shipped `models/`."""
    if models_dir is None:
        from cds_service.app import resolve_config
        from cds_service.config import SHIPPED_MODELS_DIR

        models_dir = resolve_config()["MODELS_DIR"] or SHIPPED_MODELS_DIR
    servers, rows = [], []
    allow_http = site.prefetch_settings.allow_http_loopback
    for where, base in fhir_bases(site, fhir_base):
        caps = fetch_capability_statement(base, where, allow_http_loopback=allow_http,
                                          timeout=timeout)
        servers.append(Server(base, caps.software, caps.fhir_version))
        rows += check_services(site.services, caps, base)
    rows += check_models(site, models_dir)
    rows += check_orderables(site)
    rows += check_issuers(site, timeout=timeout)
    return Report(site.id, site.source, tuple(servers), tuple(rows))


def render(report: Report, *, as_json: bool = False) -> str:
    """The report as a plain-text table grouped by section, or as JSON."""
    if as_json:
        return json.dumps(report.to_dict(), indent=2)
    servers = {s.base: s for s in report.servers}
    lines = [f"site {report.site} ({report.source})"]
    groups: dict[tuple[str, str | None], list[Check]] = {}
    for check in report.checks:
        groups.setdefault((check.section, check.server), []).append(check)
    for (section, server), checks in groups.items():
        if section == FHIR and server is not None:
            info = servers.get(server)
            title = f"FHIR server {server}" + (f" ({info.software})" if info else "")
        else:
            title = {MODELS: "Models", ORDERABLES: "Orderables",
                     ISSUERS: "JWT issuers"}.get(section, section)
        lines += ["", title, *_table(checks)]
    lines += ["", f"{report.failures} failure{'s' if report.failures != 1 else ''}, "
                  f"{report.warnings} warning{'s' if report.warnings != 1 else ''}"]
    return "\n".join(lines)


def _table(checks: list[Check]) -> list[str]:
    rows = [_COLUMNS] + [(c.service, c.key, c.check, c.status, c.detail) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS) - 1)]
    return [("  " + "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True))
             + "  " + r[-1]).rstrip() for r in rows]
