"""One CDS call's record, built as the call goes: who called (site, caller), what was asked
(hook, hookInstance, context ids), what was read (prefetch keys, FHIR URLs), what was answered
(cards, suppression) and which models scored; at the end, `to_call` turns it into what the store
keeps (`Call`: the audit record, the issued-card rows and the prediction rows).

No Flask here: the views keep one `CallRecord` per request and note into it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cds_service.ids import uuid4_hex
from cds_service.records.audit import (
    FEEDBACK,
    INVOKE,
    MAX_TEXT,
    AuditRecord,
    lenient_record,
    prefetch_key_sources,
    safe_text,
)

if TYPE_CHECKING:
    from cds_service.config import Site
    from cds_service.data.prefetch import Prefetch
    from cds_service.models.binding import ModelBinding
    from cds_service.records.suppression import Decision
    from cds_service.trust.auth import VerifiedCaller

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Call:
    """What one CDS call leaves in the store besides feedback: its audit record, the cards it
    issued (`tables.issued_cards_table` rows) and the predictions made
    (`tables.predictions_table` rows). `id` makes storing it idempotent
    (`tables.call_records_table`)."""

    audit: AuditRecord | None
    issued_cards: Sequence[dict[str, Any]] = ()
    predictions: Sequence[dict[str, Any]] = ()
    id: str = field(default_factory=uuid4_hex)

    @property
    def time(self) -> datetime:
        if self.audit is not None:
            return self.audit.time
        rows = [*self.issued_cards, *self.predictions]
        return rows[0]["time"] if rows else datetime.now(UTC)


@dataclass
class CallRecord:
    """What one invocation or feedback call has done so far. `audit` holds the audit record's
    fields (plain values, made safe only when the record is built: `audit.lenient_record`)."""

    kind: str  # audit.INVOKE or audit.FEEDBACK
    started: float  # time.perf_counter() when the request arrived
    target: str  # "METHOD /path", for our own log lines
    audit: dict[str, Any] = field(default_factory=dict)
    site: Site | None = None
    caller: VerifiedCaller | None = None
    issued_cards: list[dict[str, Any]] | None = None
    model_binding: ModelBinding | None = None

    def note(self, **fields: Any) -> None:
        self.audit.update(fields)

    def note_caller(self, site: Site, caller: VerifiedCaller | None) -> None:
        self.site, self.caller = site, caller
        self.audit.update(site=site.id)
        if caller is not None:
            self.audit.update(iss=caller.iss, sub=caller.sub)

    def note_request(self, body: dict) -> None:
        context = body["context"]
        self.audit.update(hook=body["hook"], hook_instance=body["hookInstance"],
                          user_id=context.get("userId"), patient_id=context.get("patientId"),
                          encounter_id=context.get("encounterId"))

    def note_prefetch(self, prefetch: Prefetch) -> None:
        self.audit.update(prefetch_keys_used=prefetch_key_sources(prefetch.sources),
                          fhir_urls_fetched=tuple(prefetch.fetched))

    def note_cards(self, decision: Decision, rendered: dict) -> None:
        """The cards shown (`decision.kept`, as `rendered` for the EHR) and those held back."""
        self.issued_cards = [
            {"card_uuid": card.uuid, "indicator": card.indicator,
             "topic_system": card.source.topic.system if card.source.topic else None,
             "topic_code": card.source.topic.code if card.source.topic else None}
            for card in decision.kept]
        self.audit.update(
            card_uuids=tuple(c["uuid"] for c in rendered["cards"] if "uuid" in c),
            suggestion_uuids=tuple(s["uuid"] for c in rendered["cards"]
                                   for s in c.get("suggestions", ()) if "uuid" in s),
            outcome=f"cards={len(rendered['cards'])}"
                    + (f" suppressed={decision.suppressed}" if decision.suppressed else ""),
            detail="; ".join(decision.notes)[:MAX_TEXT] or None,
        )

    def submit(self, record: Callable[[Call], None], now: datetime, status: int) -> None:
        """Hand the finished call to the store's writer (`Store.record`: spooled, never
        awaited)."""
        record(self.to_call(now, status))

    def to_call(self, now: datetime, status: int) -> Call:
        """What the store keeps of this call, answered with `status`; cards count as issued only
        on a 200."""
        self.audit.setdefault("outcome", str(status))
        record = self._audit_record(now, status)
        # The call's ids as its audit record holds them, so the three tables join.
        ids = {"hook_instance": record.hook_instance, "user_id": record.user_id,
               "patient_id": record.patient_id}
        issued = self.issued_cards if status == 200 else None
        return Call(
            audit=record,
            issued_cards=[{**card, "time": now, "site": self.audit["site"],
                           "service_id": self.audit["service_id"], **ids}
                          for card in issued or ()],
            predictions=self._prediction_rows(ids, now) if self.model_binding else (),
        )

    def _audit_record(self, now: datetime, status: int) -> AuditRecord:
        """The call's audit record, whatever the caller sent (`audit.lenient_record`); if even
        that fails (our bug), a record of the access with what is certainly safe, saying so."""
        try:
            return lenient_record(kind=self.kind, time=now, status=status, **self.audit)
        except Exception as exc:  # noqa: BLE001 - an access is never left off the record
            log.exception("audit record for %s: fields withheld", self.target)
            return AuditRecord(kind=self.kind, time=now, status=status,
                               site=safe_text(self.audit.get("site")),
                               service_id=safe_text(self.audit.get("service_id")),
                               detail=f"audit fields withheld: {type(exc).__name__}")

    def _prediction_rows(self, ids: dict, now: datetime) -> list[dict]:
        return [{
            "time": now, "site": self.audit["site"], "service_id": self.audit["service_id"],
            "hook_instance": ids["hook_instance"], "role": role,
            "model_id": p.model_id, "model_version": p.model_version, "sha256": p.sha256,
            "output": p.output, "score": p.score, "indicator": p.indicator,
            "unavailable": p.unavailable, "missing": list(p.missing),
            "imputed": list(p.imputed),
            "contributions": [{"name": c.name, "contribution": round(c.contribution, 6)}
                              for c in p.contributions],
        } for role, p in self.model_binding.recorded]


def kind_of(path: str) -> str:
    """The audit kind of a CDS endpoint's path."""
    return FEEDBACK if path.endswith("/feedback") else INVOKE
