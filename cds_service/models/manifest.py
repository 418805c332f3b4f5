"""`models/<id>/manifest.yaml`: what a model is, what it needs, and how to read its score.

A *spec* is a manifest before training (the `--spec` of `cds-service models train`): the same
document without `artifact`, `metrics`, `requirements`, `created` and `training_data`, and with
imputation values that training fits (`missing: {impute: median}`). Every key is documented in
`models/README.md`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from marshmallow import RAISE, Schema, ValidationError, fields, validate

from cds_service.features import FeatureSpec, FeatureSpecError, parse_features
from cds_service.models.errors import ModelError
from cds_service.schemas import describe_errors

MANIFEST_FILE = "manifest.yaml"
# Card indicators in rising severity (CDS Hooks 2.0 §Card Attributes).
INDICATORS = ("info", "warning", "critical")
ESTIMATORS = ("kfre-4var", "logistic_regression", "gradient_boosting")
MODEL_ID = r"^[a-z0-9][a-z0-9._-]{0,63}$"


def _rising(thresholds: Mapping[str, float]) -> None:
    ordered = [thresholds[i] for i in INDICATORS if i in thresholds]
    if not ordered:
        raise ValidationError("at least one of info/warning/critical")
    if ordered != sorted(set(ordered)):
        raise ValidationError("scores must rise strictly from info to warning to critical")


def thresholds_field(**kwargs: Any) -> fields.Dict:
    """Score from which a card is info/warning/critical (manifests, and sites overriding them)."""
    return fields.Dict(keys=fields.String(validate=validate.OneOf(INDICATORS)),
                       values=fields.Float(validate=validate.Range(0, 1)), validate=_rising,
                       **kwargs)


class _Output(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(required=True, validate=validate.Regexp(r"^[a-z][a-z0-9_]*$"))
    meaning = fields.String(required=True, validate=validate.Length(min=1))
    horizon_years = fields.Integer(load_default=None, validate=validate.Range(min=1))


class _Artifact(Schema):
    class Meta:
        unknown = RAISE

    file = fields.String(required=True, validate=validate.Regexp(r"^[A-Za-z0-9._-]+$"))
    format = fields.String(required=True, validate=validate.OneOf(["skops"]))
    sha256 = fields.String(required=True, validate=validate.Regexp(r"^[0-9a-f]{64}$"))


class _Training(Schema):
    class Meta:
        unknown = RAISE

    estimator = fields.String(required=True, validate=validate.OneOf(ESTIMATORS))
    params = fields.Dict(keys=fields.String(), load_default=dict)
    test_fraction = fields.Float(load_default=0.25, validate=validate.Range(0.05, 0.5))
    seed = fields.Integer(load_default=0)


class _Explanation(Schema):
    class Meta:
        unknown = RAISE

    method = fields.String(required=True, validate=validate.OneOf(["additive", "occlusion"]))
    units = fields.String(required=True)
    reference = fields.Dict(keys=fields.String(), values=fields.Float(), load_default=dict)


class _SpecSchema(Schema):
    class Meta:
        unknown = RAISE

    id = fields.String(required=True, validate=validate.Regexp(MODEL_ID))
    version = fields.String(required=True, validate=validate.Length(min=1, max=64))
    description = fields.String(required=True, validate=validate.Length(min=1))
    intended_use = fields.String(required=True, validate=validate.Length(min=1))
    population = fields.String(required=True, validate=validate.Length(min=1))
    output = fields.Nested(_Output, required=True)
    secondary_outputs = fields.List(fields.Nested(_Output), load_default=list)
    thresholds = thresholds_field(required=True)
    features = fields.Raw(required=True)
    training = fields.Nested(_Training, required=True)
    citations = fields.List(fields.String(), load_default=list)
    model_card = fields.String(required=True, validate=validate.Length(min=1))
    # Written by training; absent from a spec.
    artifact = fields.Nested(_Artifact)
    explanation = fields.Nested(_Explanation)
    metrics = fields.Dict(keys=fields.String())
    training_data = fields.Dict(keys=fields.String())
    requirements = fields.Dict(keys=fields.String(), values=fields.String())
    created = fields.String()


@dataclass(frozen=True)
class Output:
    name: str
    meaning: str
    horizon_years: int | None = None


@dataclass(frozen=True)
class Manifest:
    id: str
    version: str
    description: str
    intended_use: str
    population: str
    output: Output
    secondary_outputs: tuple[Output, ...]
    thresholds: Mapping[str, float]
    features: tuple[FeatureSpec, ...]
    training: Mapping[str, Any]
    model_card: str
    citations: tuple[str, ...] = ()
    artifact_file: str | None = None
    artifact_sha256: str | None = None
    explanation: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    training_data: Mapping[str, Any] = field(default_factory=dict)
    requirements: Mapping[str, str] = field(default_factory=dict)
    created: str | None = None
    source: str = ""

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)


def parse_manifest(data: Any, source: str, *, spec: bool = False) -> Manifest:
    """Validate a manifest (or, with `spec=True`, a training spec); ModelError names the key."""
    if not isinstance(data, Mapping):
        raise ModelError(f"{source}: expected a YAML mapping at the top level")
    try:
        loaded = _SpecSchema().load(data)
    except ValidationError as exc:
        raise ModelError(f"{source}: {describe_errors(exc)}") from exc
    if not spec:
        missing = [key for key in ("artifact", "explanation", "requirements") if key not in loaded]
        if missing:
            raise ModelError(f"{source}: missing {', '.join(missing)} (a spec is not a manifest:"
                             " run `cds-service models train` to produce one)")
    try:
        features = parse_features(loaded["features"], allow_unfitted=spec)
    except FeatureSpecError as exc:
        raise ModelError(f"{source}: {exc}") from exc
    if not features:
        raise ModelError(f"{source}: features: at least one feature is required")
    artifact = loaded.get("artifact") or {}
    return Manifest(
        id=loaded["id"],
        version=loaded["version"],
        description=loaded["description"].strip(),
        intended_use=loaded["intended_use"].strip(),
        population=loaded["population"].strip(),
        output=Output(**loaded["output"]),
        secondary_outputs=tuple(Output(**o) for o in loaded["secondary_outputs"]),
        thresholds=MappingProxyType({i: loaded["thresholds"][i] for i in INDICATORS
                                     if i in loaded["thresholds"]}),
        features=features,
        training=MappingProxyType(loaded["training"]),
        model_card=loaded["model_card"].strip(),
        citations=tuple(loaded["citations"]),
        artifact_file=artifact.get("file"),
        artifact_sha256=artifact.get("sha256"),
        explanation=MappingProxyType(loaded.get("explanation") or {}),
        metrics=MappingProxyType(loaded.get("metrics") or {}),
        training_data=MappingProxyType(loaded.get("training_data") or {}),
        requirements=MappingProxyType(loaded.get("requirements") or {}),
        created=loaded.get("created"),
        source=source,
    )


def read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ModelError(f"{path}: invalid YAML: {exc}") from exc


def load_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    manifest = parse_manifest(read_yaml(path), str(path))
    if manifest.id != directory.name:
        raise ModelError(f"{path}: id {manifest.id!r} must equal the directory name "
                         f"{directory.name!r}")
    return manifest


def load_spec(path: Path) -> Manifest:
    return parse_manifest(read_yaml(path), str(path), spec=True)


def manifest_document(manifest: Manifest) -> dict[str, Any]:
    """The manifest as the plain mapping written to manifest.yaml (keys in reading order)."""
    doc: dict[str, Any] = {
        "id": manifest.id,
        "version": manifest.version,
        "created": manifest.created,
        "description": manifest.description,
        "intended_use": manifest.intended_use,
        "population": manifest.population,
        "output": _output_doc(manifest.output),
        "secondary_outputs": [_output_doc(o) for o in manifest.secondary_outputs],
        "thresholds": dict(manifest.thresholds),
        "features": [f.to_dict() for f in manifest.features],
        "training": dict(manifest.training),
        "training_data": dict(manifest.training_data),
        "metrics": dict(manifest.metrics),
        "explanation": dict(manifest.explanation),
        "requirements": dict(manifest.requirements),
        "artifact": {"file": manifest.artifact_file, "format": "skops",
                     "sha256": manifest.artifact_sha256},
        "citations": list(manifest.citations),
        "model_card": manifest.model_card,
    }
    return {k: v for k, v in doc.items() if v not in (None, [], {})}


def _output_doc(output: Output) -> dict[str, Any]:
    doc = {"name": output.name, "meaning": output.meaning}
    if output.horizon_years is not None:
        doc["horizon_years"] = output.horizon_years
    return doc


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def write_manifest(manifest: Manifest, directory: Path) -> Path:
    path = directory / MANIFEST_FILE
    header = (f"# Model manifest for {manifest.id} {manifest.version}, written by "
              "`cds-service models train`.\n# Keys: models/README.md. Edit the spec and "
              "retrain rather than editing this file: the artifact sha256 is checked at load.\n")
    body = yaml.dump(manifest_document(manifest), Dumper=_Dumper, sort_keys=False,
                     allow_unicode=True, width=100)
    path.write_text(header + body, encoding="utf-8")
    return path
