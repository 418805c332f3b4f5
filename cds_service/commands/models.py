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


def run_models_train(args: argparse.Namespace) -> int:
    from cds_service.models.manifest import load_spec
    from cds_service.training.training import train

    result = train(load_spec(Path(args.spec)), Path(args.ndjson), Path(args.labels),
                   Path(args.out))
    m = result.model
    print(f"trained {m.id} {m.version} (sha256 {m.sha256})")  # noqa: T201
    print(json.dumps({"held_out": result.metrics}, indent=2))  # noqa: T201
    for path in result.files:
        print(f"  wrote {path}")  # noqa: T201
    return 0


def run_models_evaluate(args: argparse.Namespace) -> int:
    from cds_service.models.loaded import load_model
    from cds_service.training.training import evaluate

    report = evaluate(load_model(Path(args.model)), Path(args.ndjson), Path(args.labels))
    print(json.dumps(report, indent=2))  # noqa: T201
    return 0


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

