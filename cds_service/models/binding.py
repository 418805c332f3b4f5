"""A site's model for one service during one request: active prediction plus shadow scoring.

The shadow model sees the same resources and is recorded (score, version, hookInstance) with the
active one, but its result never reaches a card, and any failure in it is logged and swallowed:
trying a candidate model must not be able to break the service clinicians see.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cds_service.features import CodeMap, FeatureSpec, FeatureVector, extract, flatten
from cds_service.models.loaded import LoadedModel, Prediction
from cds_service.models.manifest import Threshold
from cds_service.ops import metrics

log = logging.getLogger(__name__)


@dataclass
class ModelBinding:
    active: LoadedModel
    shadow: LoadedModel | None = None
    thresholds: Mapping[str, Threshold] | None = None
    code_map: CodeMap = field(default_factory=dict)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    # (role, prediction) in the order made; the view records them after the response is built.
    recorded: list[tuple[str, Prediction]] = field(default_factory=list)

    @property
    def features(self) -> tuple[FeatureSpec, ...]:
        """The active model's features, for a caller that extracts them with its own inputs."""
        return self.active.manifest.features

    def predict(self, resources: Iterable[Any], *, now: datetime | None = None,
                vector: FeatureVector | None = None) -> Prediction:
        """Score the active model (and the shadow, silently) on the patient's FHIR resources;
        `vector`: the active model's `features` already extracted from those resources."""
        now = now or self.clock()
        if vector is None or self.shadow is not None:
            resources = list(flatten(resources))  # once, for the active and the shadow model
        prediction = self._score("active", self.active, resources, now, self.thresholds, vector)
        if self.shadow is not None:
            try:
                shadow = self._score("shadow", self.shadow, resources, now, None, None)
                metrics.observe_shadow(prediction, shadow)
            except Exception:  # noqa: BLE001 - a shadow model never affects the answer
                log.exception("shadow model %s %s failed", self.shadow.id, self.shadow.version)
        return prediction

    def _score(self, role: str, model: LoadedModel, resources: Iterable[Any], now: datetime,
               thresholds: Mapping[str, Threshold] | None,
               vector: FeatureVector | None) -> Prediction:
        if vector is None:
            with metrics.stage("features"):
                vector = extract(model.manifest.features, resources, now=now,
                                 code_map=self.code_map)
        started = time.perf_counter()
        with metrics.stage("model"):
            prediction = model.predict_vector(vector, thresholds)
        metrics.observe_prediction(role, prediction, time.perf_counter() - started)
        self.recorded.append((role, prediction))
        return prediction
