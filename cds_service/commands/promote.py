"""`cds-service models promote MODEL_DIR --site SITE --evaluation EVAL_DIR`: make a model a
site's shadow (the default) or active model, only on the site's own evidence.

Refused, exit 2, with every reason printed, unless
- the manifest's `approved_use` lists the role;
- the model directory is the one the service loads (MODELS_DIR/<id>, same version and sha256):
  the site file names models by id only, so promoting a copy elsewhere would put another build
  in front of patients. Nothing is ever written into a model directory;
- EVAL_DIR's provenance.json names this model (id, version, sha256) and this site
  (cds_service/training/evidence.py), and metrics.json meets the site's `model_acceptance`;
- for `--role active`, the model is already the site's shadow for that service: shadow first
  is the path, so its live scores have been seen beside the active model's before it drives
  cards. The previous active model becomes the shadow, so the switch can be watched (and
  undone by promoting it back).

On success the site file is edited in place (cds_service/site_edit.py: only the one or two
lines, comments kept) and a JSON line is appended to `<site file>.promotions.jsonl` beside it.
The running service picks the change up on `cds-service reload`, which validates it again.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROLES = ("shadow", "active")
LOG_SUFFIX = ".promotions.jsonl"


class Refused(Exception):
    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = reasons


def promotion_log(site_file: Path) -> Path:
    return site_file.with_name(site_file.name + LOG_SUFFIX)


def _installed(model: Any, models_dir: Path) -> None:
    from cds_service.models.manifest import load_manifest

    directory = models_dir / model.id
    try:
        installed = load_manifest(directory)
    except Exception as exc:  # noqa: BLE001 - any unreadable manifest is the same refusal
        raise Refused([f"{directory}: the service loads {model.id} from here, and it is not "
                       f"readable ({exc}); install the model there first"]) from None
    if (installed.version, installed.artifact_sha256) != (model.version, model.sha256):
        raise Refused([f"{directory}: the service would load {model.id} "
                       f"{installed.version} sha256 {str(installed.artifact_sha256)[:12]}, not "
                       f"{model.version} sha256 {model.sha256[:12]}; install this build there "
                       "first"])


def plan(args: argparse.Namespace, config: dict) -> dict[str, Any]:
    """Every check; returns what to write. Raises Refused (all failed criteria at once) or
    ModelError/ConfigError for unusable input."""
    from cds_service.config import SHIPPED_MODELS_DIR, load_sites
    from cds_service.models.acceptance import check_metrics
    from cds_service.models.errors import ModelError
    from cds_service.models.loaded import check_use, load_model, load_model_by_id
    from cds_service.service import index_services
    from cds_service.site_edit import edit_service_models
    from cds_service.training.evidence import check_site, label_of, read_evidence
    from hooks import SERVICES

    registry = index_services(SERVICES)
    sites = load_sites(config["SITE_CONFIG"], registry)
    if args.site not in sites:
        raise Refused([f"site {args.site!r} is not configured ({', '.join(sorted(sites))})"])
    site = sites[args.site]
    entry = site.services.get(args.service)
    if entry is None or entry.model is None:
        raise Refused([f"{site.source}: services.{args.service}: not a model-driven service "
                       "enabled at this site"])
    models_dir = Path(config["MODELS_DIR"] or SHIPPED_MODELS_DIR)
    model = load_model(Path(args.model_dir))
    key = "model" if args.role == "active" else "shadow_model"
    where = f"{site.source}: services.{args.service}.{key}"
    try:
        check_use(model, args.role, where)
    except ModelError as exc:
        raise Refused([str(exc)]) from None
    _installed(model, models_dir)

    evidence = read_evidence(Path(args.evaluation))
    reasons = []
    try:
        label = label_of(evidence, model)
        check_site(evidence, site)
    except ModelError as exc:
        raise Refused([str(exc)]) from None
    failures = check_metrics(site.acceptance, evidence.metrics, label)
    reasons += [f"criterion {f}" for f in failures]

    if args.role == "active":
        if entry.model == model.id:
            reasons.append(f"{where}: {model.id} is already the active model")
        elif entry.shadow_model != model.id:
            reasons.append(f"{where}: {model.id} must be the site's shadow_model first (now "
                           f"{entry.shadow_model or 'none'}): promote it with --role shadow, "
                           "watch it (models monitor), then promote it to active")
        else:
            try:
                check_use(load_model_by_id(models_dir, entry.model), "shadow",
                          f"{site.source}: services.{args.service}.shadow_model")
            except ModelError as exc:
                reasons.append(f"{exc} (the active model becomes the shadow)")
        values = {"model": model.id, "shadow_model": entry.model}
    else:
        if entry.model == model.id:
            reasons.append(f"{where}: {model.id} is the active model; the shadow must differ")
        values = {"shadow_model": model.id}
    if reasons:
        raise Refused(reasons)

    site_file = Path(site.source)
    before = site_file.read_text(encoding="utf-8")
    after = edit_service_models(before, args.service, values, site.source)
    # The edited file must load like the rest. Checked beside the original, since paths in it
    # (`jwks_file`, `private_key_file`) are relative to it; the name is hidden and not *.yaml,
    # so a service loading the directory meanwhile never reads it.
    fd, name = tempfile.mkstemp(prefix=f".{site_file.name}.", suffix=".check",
                                dir=site_file.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(after)
        load_sites(Path(name), registry)
    finally:
        Path(name).unlink(missing_ok=True)
    current = {"model": entry.model, "shadow_model": entry.shadow_model}
    return {
        "site_file": site_file, "before": before, "after": after,
        "record": {
            "time": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "by": args.by or getpass.getuser(),
            "site": site.id, "service": args.service, "role": args.role,
            "model": model.describe(),
            "changed": {k: {"from": current[k], "to": v} for k, v in values.items()},
            "site_file": str(site_file),
            "site_file_sha256": {
                "before": hashlib.sha256(before.encode()).hexdigest(),
                "after": hashlib.sha256(after.encode()).hexdigest()},
            "evidence": {"directory": str(evidence.directory), "sha256": evidence.digest,
                         "files": evidence.files, "label": label},
            "acceptance": asdict(site.acceptance),
        },
    }


def run_models_promote(args: argparse.Namespace) -> int:
    from cds_service.app import resolve_config
    from cds_service.config import ConfigError
    from cds_service.models.errors import ModelError
    from cds_service.site_edit import write_atomically

    try:
        planned = plan(args, resolve_config())
    except Refused as exc:
        print(f"models promote: refused to make {args.model_dir} the {args.role} model of "  # noqa: T201
              f"{args.site}/{args.service}:", file=sys.stderr)
        for reason in exc.reasons:
            print(f"  - {reason}", file=sys.stderr)  # noqa: T201
        return 2
    except (ModelError, ConfigError) as exc:
        print(f"models promote: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    record = planned["record"]
    if planned["after"] != planned["before"]:
        write_atomically(planned["site_file"], planned["after"])
    log = promotion_log(planned["site_file"])
    with log.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
    m = record["model"]
    changes = ", ".join(f"{k}: {c['from']} -> {c['to']}" for k, c in record["changed"].items())
    print(f"promoted {m['id']} {m['version']} to {args.role} for {args.site}/{args.service} "  # noqa: T201
          f"({changes}); recorded in {log}")
    print("next: cds-service check-config, review the diff, then cds-service reload")  # noqa: T201
    return 0


def run_models_provenance(args: argparse.Namespace) -> int:
    """Stamp an evaluation directory with provenance.json: which builds its metrics.json labels
    are, and whose patients were scored."""
    from cds_service.app import resolve_config
    from cds_service.config import ConfigError, load_sites
    from cds_service.models.errors import ModelError
    from cds_service.models.loaded import load_model
    from cds_service.service import index_services
    from cds_service.training.evidence import METRICS_FILE, read_json, write_provenance
    from hooks import SERVICES

    try:
        sites = load_sites(resolve_config()["SITE_CONFIG"], index_services(SERVICES))
        if args.site not in sites:
            raise ModelError(f"site {args.site!r} is not configured ({', '.join(sorted(sites))})")
        out = Path(args.evaluation)
        labels = read_json(out / METRICS_FILE).get("models") or []
        models = {}
        for given in args.models:
            label, _, directory = given.rpartition("=")
            model = load_model(Path(directory))
            label = label or model.id
            if label not in labels:
                raise ModelError(f"{given}: {label!r} is not among {out / METRICS_FILE}'s models "
                                 f"({', '.join(labels)}); write LABEL=MODEL_DIR")
            models[label] = model
        path = write_provenance(out, site=args.site, models=models,
                                cohort_dir=Path(args.cohort) if args.cohort else None)
    except (ModelError, ConfigError) as exc:
        print(f"models provenance: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    print(f"wrote {path}")  # noqa: T201
    return 0


def add_parser(models_sub: argparse._SubParsersAction) -> None:
    pv = models_sub.add_parser(
        "provenance", help="record in an evaluation directory which model builds were "
                           "evaluated, on which site's patients (provenance.json)")
    pv.add_argument("evaluation", metavar="EVAL_DIR", help="directory with metrics.json")
    pv.add_argument("models", nargs="+", metavar="[LABEL=]MODEL_DIR",
                    help="each evaluated model; LABEL (default: its id) as in metrics.json")
    pv.add_argument("--site", required=True, help="the site whose patients were scored")
    pv.add_argument("--cohort", metavar="DIR", help="the `models cohort` output the labels "
                    "came from (its digest and export server are recorded)")
    pv.add_argument("--site-config", metavar="PATH",
                    help="site YAML file or directory (default: $CDS_SITE_CONFIG)")
    pv.set_defaults(func=run_models_provenance)
    pr = models_sub.add_parser(
        "promote", help="make a model a site's shadow (default) or active model, if its "
                        "evaluation on the site's data meets the site's model_acceptance")
    pr.add_argument("model_dir", metavar="MODEL_DIR", help="the model directory (as installed "
                    "under MODELS_DIR)")
    pr.add_argument("--site", required=True, help="site id")
    pr.add_argument("--evaluation", required=True, metavar="EVAL_DIR",
                    help="validation report directory: metrics.json + provenance.json")
    pr.add_argument("--service", default="kidney-risk", help="service id (default: kidney-risk)")
    pr.add_argument("--role", choices=ROLES, default="shadow",
                    help="shadow (default: shadow first is the path) or active")
    pr.add_argument("--by", help="who promotes, for the record (default: the login name)")
    pr.add_argument("--site-config", metavar="PATH",
                    help="site YAML file or directory (default: $CDS_SITE_CONFIG)")
    pr.set_defaults(func=run_models_promote)
