"""Alert-fatigue control: a card the same user overrode for the same patient is not shown again
within the site's window (`alert_fatigue.override_window_hours`, default 24 h).

Matching is by card topic (`source.topic.code`), which Epic also treats as the card's stable
identity for overrides (Epic CDS Hooks tutorial, "source.topic"). Feedback names only the card
uuid, so every card issued is recorded (store `issued_cards`) with its user, patient, topic and
indicator. A card more severe than the one overridden is shown again: an override of a warning
does not silence the critical card that follows. Every decision is written to the audit log.
Suppression fails open: if the store cannot answer, the card is shown.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cds_service.cards import Card, severity
from cds_service.config import Site

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    kept: tuple[Card, ...]
    notes: tuple[str, ...] = ()   # one per card withheld or shown again, for the audit log
    suppressed: int = 0


def apply(cards: Sequence[Card], *, store, site: Site, service_id: str, user_id: object,
          patient_id: object, now: datetime) -> Decision:
    window = site.override_window
    topics = {c.source.topic.code for c in cards if c.source.topic is not None}
    if (not window or not topics or not isinstance(user_id, str) or not user_id
            or not isinstance(patient_id, str) or not patient_id):
        return Decision(tuple(cards))
    try:
        overrides = store.recent_overrides(site=site.id, service_id=service_id,
                                           user_id=user_id, patient_id=patient_id,
                                           topics=topics, since=now - window)
    except Exception:  # noqa: BLE001 - never withhold guidance because the store is down
        log.exception("override lookup failed; cards shown unsuppressed")
        return Decision(tuple(cards), ("suppression skipped: feedback store unavailable",))
    kept, notes, suppressed = [], [], 0
    hours = f"{window.total_seconds() / 3600:g}h"
    for card in cards:
        override = overrides.get(card.source.topic.code) if card.source.topic else None
        if override is None:
            kept.append(card)
            continue
        when = override.time.strftime("%Y-%m-%dT%H:%M:%SZ")
        if severity(card.indicator) > severity(override.indicator):
            kept.append(card)
            notes.append(f"shown again {card.source.topic.code}: {card.indicator} after "
                         f"{override.indicator} overridden at {when}")
        else:
            suppressed += 1
            notes.append(f"suppressed {card.source.topic.code}: same user overrode card "
                         f"{override.card_uuid} at {when} (window {hours})")
    return Decision(tuple(kept), tuple(notes), suppressed)
