"""A site's acceptance criteria for promoting a model (`model_acceptance:` in the site file), and
the check of a validation report's metrics.json against them.

Every criterion is read from the overall population of the evaluation (the site's own labelled
patients) and compares a point estimate or a bound with a limit; a failed criterion is reported
with the measured value and the limit, so the data scientist sees how far off it is. Sources:

- discrimination, `auroc_not_below: comparator_lower_bound`: the candidate's AUROC point estimate
  must reach the lower end of the comparator's 95 % bootstrap interval on the same patients
  (non-inferiority to the model in use, typically the published KFRE, judged with the
  comparator's own sampling uncertainty; Efron & Tibshirani 1993, ch. 13 for the interval);
- calibration, `calibration_slope` and `calibration_intercept`: "weak calibration" in Van Calster
  et al., J Clin Epidemiol 2016;74:167 and BMC Med 2019;17:230 means slope 1 and intercept 0.
  The default bands, slope 0.8-1.2 and intercept ±0.2 (logit scale), are a rule of thumb of
  ours, not a published cut-off: a slope below 0.8 is the overfitting Steyerberg (Clinical
  Prediction Models, 2nd ed. 2019, ch. 15) treats as needing recalibration;
- `min_events`: at least 100 outcome events in the validation cohort (Vergouwe et al., J Clin
  Epidemiol 2005;58:475; Collins, Ogundimu & Altman, Stat Med 2016;35:214: fewer than 100 events
  gives unreliable estimates of calibration and discrimination).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from cds_service.site_section import SiteSection

COMPARATOR_LOWER_BOUND = "comparator_lower_bound"
COMPARATOR_POINT = "comparator"
DEFAULT_COMPARATOR = "kfre-4var"


@dataclass(frozen=True)
class Acceptance:
    """What an evaluation must show before `models promote` changes a site's model. `None`
    turns a criterion off (written `null` in the site file)."""

    comparator: str = DEFAULT_COMPARATOR
    # COMPARATOR_LOWER_BOUND, COMPARATOR_POINT, or a number the AUROC must reach.
    auroc_not_below: str | float | None = COMPARATOR_LOWER_BOUND
    calibration_slope: tuple[float, float] | None = (0.8, 1.2)
    calibration_intercept: tuple[float, float] | None = (-0.2, 0.2)
    min_events: int | None = 100


@dataclass(frozen=True)
class Failure:
    criterion: str
    measured: str
    limit: str

    def __str__(self) -> str:
        return f"{self.criterion}: measured {self.measured}, limit {self.limit}"


class _AurocRule(fields.Field):
    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str | float:
        if value in (COMPARATOR_LOWER_BOUND, COMPARATOR_POINT):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool) and 0.5 <= value <= 1:
            return float(value)
        raise ValidationError(f"must be {COMPARATOR_LOWER_BOUND}, {COMPARATOR_POINT}, or an "
                              "AUROC between 0.5 and 1")


def _band(**kwargs: Any) -> fields.List:
    return fields.List(fields.Float(allow_nan=False), allow_none=True,
                       validate=validate.Length(equal=2, error="must be [low, high]"), **kwargs)


class AcceptanceSchema(SiteSection):
    comparator = fields.String(validate=validate.Regexp(r"^[a-z0-9][a-z0-9-]{0,63}$"))
    auroc_not_below = _AurocRule(allow_none=True)
    calibration_slope = _band()
    calibration_intercept = _band()
    min_events = fields.Integer(allow_none=True, validate=validate.Range(min=1))

    @validates_schema
    def _ordered(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        for key in ("calibration_slope", "calibration_intercept"):
            band = data.get(key)
            if band and not band[0] < band[1]:
                raise ValidationError({key: ["low must be below high"]})


def parse_acceptance(raw: Mapping[str, Any] | None) -> Acceptance:
    """`model_acceptance` as loaded by AcceptanceSchema (absent keys keep their defaults)."""
    values = dict(raw or {})
    for key in ("calibration_slope", "calibration_intercept"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return Acceptance(**values)


def _fmt(value: float | None) -> str:
    return "not estimable" if value is None else f"{value:.3f}"


def _model(population: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    return next((m for m in population.get("models") or () if m.get("model") == name), None)


def check_metrics(acceptance: Acceptance, metrics: Mapping[str, Any], name: str
                  ) -> list[Failure]:
    """Every criterion `metrics` (a metrics.json, `EvaluationResult.to_json()`) fails for the
    model named `name` in it; empty when all hold."""
    overall = metrics.get("overall") or {}
    failures: list[Failure] = []
    events = overall.get("events")
    if acceptance.min_events is not None and (events is None or events < acceptance.min_events):
        failures.append(Failure("min_events", f"{events} events",
                                f"at least {acceptance.min_events}"))
    model = _model(overall, name)
    if model is None:
        return [*failures, Failure("model", f"{name!r} not in the evaluation",
                                   "the evaluation must score the model")]
    auroc = (model.get("auroc") or {}).get("value")
    rule = acceptance.auroc_not_below
    if rule is not None:
        if isinstance(rule, float):
            limit, label = rule, f"{rule:.3f}"
        else:
            comparator = _model(overall, acceptance.comparator)
            if comparator is None:
                limit, label = None, (f"comparator {acceptance.comparator} must be evaluated on "
                                      "the same patients")
            else:
                key = "lower" if rule == COMPARATOR_LOWER_BOUND else "value"
                limit = (comparator.get("auroc") or {}).get(key)
                what = ("lower 95% bound" if rule == COMPARATOR_LOWER_BOUND else "point estimate")
                label = f"{_fmt(limit)} ({acceptance.comparator} AUROC {what})"
        if auroc is None or limit is None or auroc < limit:
            failures.append(Failure("auroc_not_below", f"AUROC {_fmt(auroc)}",
                                    f"at least {label}"))
    for key in ("calibration_slope", "calibration_intercept"):
        band = getattr(acceptance, key)
        value = (model.get(key) or {}).get("value")
        if band is not None and (value is None or not band[0] <= value <= band[1]):
            failures.append(Failure(key, _fmt(value), f"[{band[0]:g}, {band[1]:g}]"))
    return failures
