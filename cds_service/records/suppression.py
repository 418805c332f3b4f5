"""Alert-fatigue control: a card the same user overrode for the same patient is not shown again
within the site's window (`alert_fatigue.override_window_hours`, default 24 h).

Matching is by card topic (`source.topic.code`), which Epic also treats as the card's stable
identity for overrides (Epic CDS Hooks tutorial, "source.topic"). Feedback names only the card
uuid, so every card issued is recorded (store `issued_cards`) with its user, patient, topic and
indicator. A card more severe than the one overridden is shown again: an override of a warning
does not silence the critical card that follows. Every decision is written to the audit log.
Suppression fails open: if the store cannot answer, the card is shown.

Why a card is missing is visible to whoever made the call: the response carries the withheld
cards in an extension (`WITHHELD_EXTENSION`), which `cds-service invoke` and the sandbox show and
Epic ignores. It tells the caller nothing it does not know: the card it would have shown for
this patient from the data it sent, and the override its own feedback reported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cds_service.config import DEFAULT_OVERRIDE_WINDOW, Site
from cds_service.ops import metrics
from cds_service.protocol.cards import Card, severity
from cds_service.records.audit import safe_text

log = logging.getLogger(__name__)

# The override lookup runs on every call with cards, on the clinician's time: a store slower than
# this (PostgreSQL down or unreachable) shows the cards unsuppressed rather than hold the answer.
# An indexed lookup takes about a millisecond when the store is well.
LOOKUP_TIMEOUT_S = 0.25


# CDS Hooks 2.0 §Extensions: response-level, key in reverse-domain notation. Ours is the reverse
# of cds.example.org, the host of our topic system (hooks/_medications.TOPIC_SYSTEM): the two
# change together when the service gets its own domain.
WITHHELD_EXTENSION = "org.example.cds.withheld-cards"


def _utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Withheld:
    """A card not shown: the same user overrode a card of its topic for this patient."""

    card: Card
    overridden_card: str  # the uuid Epic's feedback named
    overridden_at: datetime
    window: timedelta

    @property
    def shown_again_after(self) -> datetime:
        """When the window ends (a more severe card of the topic is shown before that)."""
        return self.overridden_at + self.window

    def to_dict(self) -> dict:
        return {"summary": self.card.summary, "indicator": self.card.indicator,
                "topic": self.card.source.topic.to_dict(),
                "overriddenCard": self.overridden_card,
                "overriddenAt": _utc(self.overridden_at),
                "shownAgainAfter": _utc(self.shown_again_after)}


@dataclass(frozen=True)
class Decision:
    kept: tuple[Card, ...]
    notes: tuple[str, ...] = ()   # one per card withheld or shown again, for the audit log
    withheld: tuple[Withheld, ...] = ()

    @property
    def suppressed(self) -> int:
        return len(self.withheld)

    def extension(self) -> dict | None:
        """The response `extension` listing the withheld cards; None when nothing was."""
        if not self.withheld:
            return None
        return {WITHHELD_EXTENSION: [w.to_dict() for w in self.withheld]}


def _stored_id(context: Mapping, key: str) -> str | None:
    """A context id as the store records it (`audit.safe_text`: an id too long or token-like
    is replaced by a marker, the same one every time, so suppression still matches it)."""
    value = context.get(key)
    return safe_text(value) if isinstance(value, str) else None


def apply(cards: Sequence[Card], *, store, site: Site, service_id: str, context: Mapping,
          now: datetime) -> Decision:
    """Which of a call's cards are shown: those the same clinician overrode for the same patient
    within the site's window are withheld (a card more severe than the override is shown)."""
    window = site.override_window
    user_id, patient_id = _stored_id(context, "userId"), _stored_id(context, "patientId")
    topics = {c.source.topic.code for c in cards if c.source.topic is not None}
    if (not window or not topics or not isinstance(user_id, str) or not user_id
            or not isinstance(patient_id, str) or not patient_id):
        return Decision(tuple(cards))
    lookup = {"site": site.id, "service_id": service_id, "user_id": user_id,
              "patient_id": patient_id, "topics": topics, "since": now - window}
    try:
        if store.dialect == "sqlite":
            # A local file read in WAL mode never waits on a writer and has no network to hang
            # on: read it on this thread. The hand-off to a store thread cost more than the
            # query (60 of 150 µs, bench/results/service.md) and let other threads take the GIL.
            overrides = store.recent_overrides(**lookup)
        else:
            overrides = store.within(LOOKUP_TIMEOUT_S, store.recent_overrides, **lookup)
    except Exception as exc:  # noqa: BLE001 - never withhold guidance because the store is down
        metrics.suppression_failed_open(site.id, service_id)
        log.warning("override lookup failed (%s); cards shown unsuppressed", exc)
        return Decision(tuple(cards), ("suppression skipped: feedback store unavailable",))
    kept, notes, withheld = [], [], []
    hours = f"{window.total_seconds() / 3600:g}h"
    for card in cards:
        override = overrides.get(card.source.topic.code) if card.source.topic else None
        if override is None:
            kept.append(card)
            continue
        when = _utc(override.time)
        if severity(card.indicator) > severity(override.indicator):
            kept.append(card)
            notes.append(f"shown again {card.source.topic.code}: {card.indicator} after "
                         f"{override.indicator} overridden at {when}")
        else:
            withheld.append(Withheld(card, override.card_uuid, override.time, window))
            notes.append(f"suppressed {card.source.topic.code}: same user overrode card "
                         f"{override.card_uuid} at {when} (window {hours})")
    return Decision(tuple(kept), tuple(notes), tuple(withheld))


def active_overrides(store, windows: Mapping[str, timedelta], *, now: datetime,
                     **filters: str | None) -> list[dict]:
    """The stored overrides that suppress cards at `now` (`card_overrides` rows, oldest first,
    each with `expires`: when its site's window ends), matching `filters` (site, service_id,
    user_id, patient_id). `windows`: each site's window; a site not configured has the
    default."""
    longest = max([*windows.values(), DEFAULT_OVERRIDE_WINDOW])
    active = []
    for row in store.list_overrides(since=now - longest, **filters):
        window = windows.get(row["site"], DEFAULT_OVERRIDE_WINDOW)
        # As `apply`: an override counts while it is within the window back from now.
        if window and row["time"] >= now - window:
            active.append({**row, "expires": row["time"] + window})
    return active
