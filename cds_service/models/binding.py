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

from cds_service.features import ChartPass, CodeMap
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
    # False for a preview outside a hook call (the sandbox's explanation): the same scoring, but
    # not counted in the model metrics, which describe the scores the service served.
    observed: bool = True

    def feature_groups(self) -> list[tuple]:
        """The spec lists a hook's `ChartPass` should read for this binding in its one pass: the
        active model's (the shadow model's stays out of it, see `ChartPass`)."""
        return [tuple(self.active.manifest.features)]

    def score(self, resources: Iterable[Any] | ChartPass, *,
              now: datetime | None = None) -> Prediction:
        """The active model's prediction on the patient's FHIR resources (features extracted here,
        with the site's code mappings and thresholds), and the shadow model's, scored silently.
        `resources` may be the hook's own `ChartPass` over the chart, read at `now` with this
        binding's code map: its vectors are used instead of another pass."""
        now = now or self.clock()
        chart = resources if isinstance(resources, ChartPass) else None
        if chart is None or not chart.serves(now, self.code_map):
            chart = ChartPass(self.feature_groups(), resources if chart is None
                              else chart.resources, now=now, code_map=self.code_map)
        prediction = self._score("active", self.active, chart, self.thresholds)
        if self.shadow is not None:
            try:
                shadow = self._score("shadow", self.shadow, chart, None)
                if self.observed:
                    metrics.observe_shadow(prediction, shadow)
            except Exception:  # noqa: BLE001 - a shadow model never affects the answer
                log.exception("shadow model %s %s failed", self.shadow.id, self.shadow.version)
        return prediction

    def _score(self, role: str, model: LoadedModel, chart: ChartPass,
               thresholds: Mapping[str, Threshold] | None) -> Prediction:
        with metrics.stage("features"):
            vector = chart.vector(model.manifest.features)
        started = time.perf_counter()
        with metrics.stage("model"):
            prediction = model.predict_vector(vector, thresholds)
        if self.observed:
            metrics.observe_prediction(role, prediction, time.perf_counter() - started)
        self.recorded.append((role, prediction))
        return prediction
