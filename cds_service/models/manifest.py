"""`models/<id>/manifest.yaml`: what a model is, what it needs, and how to read its score.

A *spec* is a manifest before training (the `--spec` of `cds-service models train`): the same
document without `artifact`, `metrics`, `requirements`, `created` and `training_data`, and with
imputation values that training fits (`missing: {impute: median}`). Every key is documented in
`models/README.md`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from marshmallow import RAISE, Schema, ValidationError, fields, validate

from cds_service.features import FeatureSpec, FeatureSpecError, parse_features
from cds_service.models.drift import parse_reference
from cds_service.models.errors import ModelError
from cds_service.schema_errors import describe_errors

MANIFEST_FILE = "manifest.yaml"
# Card indicators in rising severity (CDS Hooks 2.0 §Card Attributes).
INDICATORS = ("info", "warning", "critical")
ESTIMATORS = ("kfre-4var", "logistic_regression", "gradient_boosting")
MODEL_ID = r"^[a-z0-9][a-z0-9._-]{0,63}$"


# What a site may make of a model (`approved_use`): score for cards (`active`), or be scored and
# recorded beside the active model without ever reaching a clinician (`shadow`).
USES = ("active", "shadow")


@dataclass(frozen=True)
class Threshold:
    """From which score of which output a card takes an indicator.

    `output` None is the primary output (the bare-number form `warning: 0.05`). `above` keeps a
    published strict bound strict: KDIGO 2024 writes "> 40 %", so 0.40 itself must not reach it
    (`above: 0.40`), while `at_least: 0.05` (and a bare number) is reached by 0.05.
    """

    value: float
    output: str | None = None
    above: bool = False

    def reached(self, score: float | None) -> bool:
        if score is None or not math.isfinite(score):
            return False
        return score > self.value if self.above else score >= self.value

    def describe(self, primary: str | None = None) -> str:
        return f"{self.output or primary or 'score'} {'>' if self.above else '≥'} {self.value:g}"

    def to_doc(self) -> float | dict[str, Any]:
        """As written in a manifest or site file: a bare number when that says it all."""
        if self.output is None and not self.above:
            return self.value
        doc: dict[str, Any] = {} if self.output is None else {"output": self.output}
        doc["above" if self.above else "at_least"] = self.value
        return doc


OUTPUT_NAME = r"^[a-z][a-z0-9_]*$"
_THRESHOLD_KEYS = ("output", "at_least", "above")


class _ThresholdValue(fields.Field):
    """A bare number (primary output, score ≥ it) or {output?, at_least | above}."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Threshold:
        if isinstance(value, Mapping):
            unknown = [str(k) for k in value if k not in _THRESHOLD_KEYS]
            if unknown:
                raise ValidationError(f"unknown key {', '.join(unknown)} (a threshold has "
                                      "output, and at_least or above)")
            bounds = [k for k in ("at_least", "above") if k in value]
            if len(bounds) != 1:
                raise ValidationError("give exactly one of at_least (score ≥ value) or above "
                                      "(score > value)")
            output = value.get("output")
            if output is not None and not (isinstance(output, str)
                                           and re.match(OUTPUT_NAME, output)):
                raise ValidationError(f"output: {output!r} is not an output name")
            return Threshold(_probability(value[bounds[0]]), output, bounds[0] == "above")
        return Threshold(_probability(value))


def _probability(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValidationError(f"{value!r} is not a probability between 0 and 1")
    return float(value)


def _order_key(threshold: Threshold) -> tuple[float, bool]:
    # On one output, `above: x` is stricter than `at_least: x`, and both than any lower value.
    return (threshold.value, threshold.above)


def check_rising(thresholds: Mapping[str, Threshold], primary: str | None = None) -> None:
    """Thresholds on the same output must get strictly stricter from info to warning to
    critical; thresholds on different outputs are not compared (a 2-year and a 5-year risk
    are different scales). With `primary`, an unnamed output is that one."""
    if not thresholds:
        raise ValidationError("at least one of info/warning/critical")
    by_output: dict[str | None, list[tuple[str, Threshold]]] = {}
    for indicator in INDICATORS:
        if indicator in thresholds:
            t = thresholds[indicator]
            by_output.setdefault(t.output or primary, []).append((indicator, t))
    for output, chain in by_output.items():
        for (low_name, low), (high_name, high) in zip(chain, chain[1:], strict=False):
            if _order_key(high) <= _order_key(low):
                where = f" on {output}" if output else ""
                raise ValidationError(
                    f"scores must rise strictly from info to warning to critical{where}: "
                    f"{high_name} ({high.describe(primary)}) is not stricter than {low_name} "
                    f"({low.describe(primary)})")


def thresholds_field(**kwargs: Any) -> fields.Dict:
    """Score from which a card is info/warning/critical (manifests, and sites overriding them):
    each a bare number (primary output, ≥) or {output, at_least | above}."""
    return fields.Dict(keys=fields.String(validate=validate.OneOf(INDICATORS)),
                       values=_ThresholdValue(), validate=check_rising, **kwargs)


def check_thresholds(thresholds: Mapping[str, Threshold], manifest: Manifest) -> None:
    """Every output named exists in `manifest`, and per output the thresholds rise;
    ValidationError says which."""
    outputs = manifest.output_names
    for indicator in INDICATORS:
        t = thresholds.get(indicator)
        if t is not None and t.output is not None and t.output not in outputs:
            raise ValidationError({indicator: {"output": [
                f"{manifest.id} has no output {t.output!r} (its outputs: {', '.join(outputs)})"]}})
    check_rising(thresholds, manifest.output.name)


def ordered_thresholds(thresholds: Mapping[str, Threshold]) -> Mapping[str, Threshold]:
    return MappingProxyType({i: thresholds[i] for i in INDICATORS if i in thresholds})


class _Output(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(required=True, validate=validate.Regexp(OUTPUT_NAME))
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
    # Required, so that no model is servable as active by omission (models/README.md).
    approved_use = fields.List(
        fields.String(validate=validate.OneOf(USES)), required=True,
        validate=validate.Length(min=1),
        error_messages={"required": "required: the uses this model is approved for, "
                                    "[active, shadow] or [shadow] (models/README.md)"})
    features = fields.Raw(required=True)
    training = fields.Nested(_Training, required=True)
    citations = fields.List(fields.String(), load_default=list)
    model_card = fields.String(required=True, validate=validate.Length(min=1))
    # Read by `models cohort` (cds_service/training/export_cohort.py), which validates it.
    cohort = fields.Dict(keys=fields.String())
    # Written by training; absent from a spec.
    artifact = fields.Nested(_Artifact)
    explanation = fields.Nested(_Explanation)
    metrics = fields.Dict(keys=fields.String())
    training_data = fields.Dict(keys=fields.String())
    # Written by training since issue 18 (cds_service/models/drift.py); older manifests lack it.
    monitoring_reference = fields.Dict(keys=fields.String())
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
    thresholds: Mapping[str, Threshold]
    features: tuple[FeatureSpec, ...]
    training: Mapping[str, Any]
    model_card: str
    citations: tuple[str, ...] = ()
    # `active` and/or `shadow`: what a site may make of this model (USES).
    approved_use: tuple[str, ...] = ()
    artifact_file: str | None = None
    artifact_sha256: str | None = None
    explanation: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    training_data: Mapping[str, Any] = field(default_factory=dict)
    monitoring_reference: Mapping[str, Any] = field(default_factory=dict)
    requirements: Mapping[str, str] = field(default_factory=dict)
    created: str | None = None
    source: str = ""

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The primary output first, then the secondary ones."""
        return (self.output.name, *(o.name for o in self.secondary_outputs))

    def approves(self, use: str) -> bool:
        return use in self.approved_use


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
    if len(set(loaded["approved_use"])) != len(loaded["approved_use"]):
        raise ModelError(f"{source}: approved_use: each use once")
    artifact = loaded.get("artifact") or {}
    manifest = Manifest(
        id=loaded["id"],
        version=loaded["version"],
        description=loaded["description"].strip(),
        intended_use=loaded["intended_use"].strip(),
        population=loaded["population"].strip(),
        output=Output(**loaded["output"]),
        secondary_outputs=tuple(Output(**o) for o in loaded["secondary_outputs"]),
        thresholds=ordered_thresholds(loaded["thresholds"]),
        features=features,
        training=MappingProxyType(loaded["training"]),
        model_card=loaded["model_card"].strip(),
        citations=tuple(loaded["citations"]),
        approved_use=tuple(u for u in USES if u in loaded["approved_use"]),
        artifact_file=artifact.get("file"),
        artifact_sha256=artifact.get("sha256"),
        explanation=MappingProxyType(loaded.get("explanation") or {}),
        metrics=MappingProxyType(loaded.get("metrics") or {}),
        training_data=MappingProxyType(loaded.get("training_data") or {}),
        monitoring_reference=MappingProxyType(loaded.get("monitoring_reference") or {}),
        requirements=MappingProxyType(loaded.get("requirements") or {}),
        created=loaded.get("created"),
        source=source,
    )
    parse_reference(manifest.monitoring_reference, source)
    try:
        check_thresholds(manifest.thresholds, manifest)
    except ValidationError as exc:
        raise ModelError(f"{source}: {describe_errors(exc, 'thresholds')}") from exc
    return manifest


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
        "thresholds": {i: t.to_doc() for i, t in manifest.thresholds.items()},
        "approved_use": list(manifest.approved_use),
        "features": [f.to_dict() for f in manifest.features],
        "training": dict(manifest.training),
        "training_data": dict(manifest.training_data),
        "metrics": dict(manifest.metrics),
        "monitoring_reference": dict(manifest.monitoring_reference),
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
