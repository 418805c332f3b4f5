"""`cds-service models ...`: write the synthetic cohort, and train, evaluate, validate and
explain model directories; a model error is the user's input, said plainly (exit 2)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def models_command(func):
    """Model errors are the user's input: print them plainly, exit 2, no traceback."""

    def run(args: argparse.Namespace) -> int:
        from cds_service.models.errors import ModelError

        try:
            return func(args)
        except ModelError as exc:
            print(f"models: {exc}", file=sys.stderr)  # noqa: T201
            return 2

    return run


def run_models_generate_cohort(args: argparse.Namespace) -> int:
    from cds_service.training.cohort import generate_cohort, write_cohort

    cohort = generate_cohort(n_patients=args.patients, seed=args.seed)
    paths = write_cohort(cohort, Path(args.out))
    labels = cohort.labels
    print(f"wrote {len(labels)} synthetic patients (seed {args.seed}, "  # noqa: T201
          f"{sum(y for _, y in labels)} events) to {args.out}:")
    for name, path in paths.items():
        print(f"  {name}: {path}")  # noqa: T201
    return 0


def _one_source(args: argparse.Namespace) -> None:
    """--cohort, or --ndjson with --labels: exactly one of the two inputs."""
    from cds_service.models.errors import ModelError

    if args.cohort and (args.ndjson or args.labels):
        raise ModelError("give --cohort, or --ndjson with --labels, not both")
    if not args.cohort and not (args.ndjson and args.labels):
        raise ModelError("give --cohort COHORT_DIR (from `models cohort`), or --ndjson DIR "
                         "with --labels CSV")


def run_models_train(args: argparse.Namespace) -> int:
    from cds_service.models.errors import ModelError
    from cds_service.models.manifest import load_spec

    _one_source(args)
    spec = load_spec(Path(args.spec))
    if args.cohort:
        from cds_service.training.cohort_training import DEFAULT_TRAIN_FRACTION, train_from_cohort

        result = train_from_cohort(
            spec, Path(args.cohort), Path(args.out), replace=args.replace,
            train_fraction=DEFAULT_TRAIN_FRACTION if args.train_fraction is None
            else args.train_fraction)
    else:
        from cds_service.training.training import train

        if args.train_fraction is not None:
            raise ModelError("--train-fraction is for --cohort (a split in time); --ndjson "
                             "splits by the spec's training.test_fraction")
        result = train(spec, Path(args.ndjson), Path(args.labels), Path(args.out),
                       replace=args.replace)
    m = result.model
    print(f"trained {m.id} {m.version} (sha256 {m.sha256})")  # noqa: T201
    split = "test_after_boundary" if args.cohort else "held_out"
    print(json.dumps({split: result.metrics}, indent=2))  # noqa: T201
    for path in result.files:
        print(f"  wrote {path}")  # noqa: T201
    return 0


def run_models_evaluate(args: argparse.Namespace) -> int:
    from cds_service.models.errors import ModelError
    from cds_service.models.loaded import load_model

    _one_source(args)
    model = load_model(Path(args.model))
    if not args.cohort:
        from cds_service.training.training import evaluate

        if args.compare or args.report:
            raise ModelError("--compare and --report need --cohort COHORT_DIR (`models cohort`)")
        report = evaluate(model, Path(args.ndjson), Path(args.labels))
        print(json.dumps(report, indent=2))  # noqa: T201
        return 0
    from cds_service.training.cohort_evaluation import evaluate_cohort

    if not args.report:
        raise ModelError("--cohort needs --report OUT_DIR (where report.md goes)")
    comparator = _comparator(args.compare) if args.compare else None
    paths = evaluate_cohort(model, Path(args.cohort), Path(args.report), comparator=comparator,
                            split=args.split, n_bootstrap=args.bootstrap, seed=args.seed,
                            site=args.site)
    print(paths[0])  # noqa: T201
    return 0


def _comparator(name: str):
    """A model directory (holding manifest.yaml), else a model id in CDS_MODELS_DIR or the
    shipped models/."""
    from cds_service.app import resolve_config
    from cds_service.config import SHIPPED_MODELS_DIR
    from cds_service.models.loaded import load_model, load_model_by_id

    if (Path(name) / "manifest.yaml").is_file():
        return load_model(Path(name))
    return load_model_by_id(resolve_config()["MODELS_DIR"] or SHIPPED_MODELS_DIR, name)


def run_models_validate(args: argparse.Namespace) -> int:
    from cds_service.models.loaded import load_model

    for directory in args.models:
        model = load_model(Path(directory))
        names = ", ".join(model.manifest.feature_names)
        print(f"ok {model.id} {model.version} sha256 {model.sha256} features [{names}]")  # noqa: T201
    return 0


def run_models_explain(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from cds_service.models.errors import ModelError
    from cds_service.models.loaded import load_model
    from cds_service.tools.invoke import InvokeError, load_bundle

    model = load_model(Path(args.model))
    try:
        bundle = load_bundle(args.bundle)
    except InvokeError as exc:
        raise ModelError(str(exc)) from exc
    now = datetime.fromisoformat(args.now) if args.now else datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    prediction = model.predict([bundle], now=now)
    print(json.dumps(prediction.to_dict(), indent=2))  # noqa: T201
    return 0


def run_models_cohort(args: argparse.Namespace) -> int:
    from cds_service.training.export_cohort import run

    return run(args)

