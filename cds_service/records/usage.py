"""What the store says about each model version in a time window, for `cds-service models
monitor`: its predictions (score, missing and imputed inputs) and the fate of the cards it drove.

A card is driven by the model whose `active` prediction was made in the same call: issued_cards
and predictions share the site, service and hookInstance (one call per service per hook
firing). Feedback names the card by uuid only. So a version's cards are

    issued_cards ⋈ predictions (role 'active', same site, service_id, hook_instance)
                 ⟕ feedback (same site, service_id, card = card_uuid)

counted by distinct card. A card no one gave feedback on is counted as issued, neither accepted
nor overridden (Epic sends feedback on accept and on override, not on a card left alone).
Shadow versions drive no card. Plain SQLAlchemy Core: the same queries on SQLite and
PostgreSQL. Read-only; nothing here touches a patient or user column.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa

from cds_service.records.store import Store
from cds_service.records.tables import feedback_table, issued_cards_table, predictions_table

VersionKey = tuple[str, str, str, str, str, str]  # site, service, model id, version, sha256, role


@dataclass
class VersionUsage:
    """One model version in one role at one site and service over the window."""

    key: VersionKey
    scores: list[float] = field(default_factory=list)
    predictions: int = 0  # scored or not
    missing: dict[str, int] = field(default_factory=dict)  # input -> predictions missing it
    cards: int = 0
    accepted: int = 0
    overridden: int = 0

    @property
    def cards_with_feedback(self) -> int:
        return self.accepted + self.overridden


def _window(query: sa.Select, column: sa.Column, since: datetime, site: str | None,
            site_column: sa.Column) -> sa.Select:
    query = query.where(column >= since)
    return query.where(site_column == site) if site is not None else query


def _predictions(store: Store, since: datetime, site: str | None) -> Iterator[sa.Row]:
    p = predictions_table.c
    query = _window(sa.select(p.site, p.service_id, p.model_id, p.model_version, p.sha256,
                              p.role, p.score, p.missing, p.imputed),
                    p.time, since, site, p.site).order_by(p.id)
    with store._unavailable_on_error(), store._engine.connect() as conn:
        yield from conn.execution_options(yield_per=5000).execute(query)


def _card_outcomes(store: Store, since: datetime, site: str | None) -> list[sa.Row]:
    i, p, f = issued_cards_table.c, predictions_table.c, feedback_table.c
    card = sa.func.count(sa.distinct(i.card_uuid))
    accepted = sa.func.count(sa.distinct(sa.case((f.outcome == "accepted", f.card))))
    overridden = sa.func.count(sa.distinct(sa.case((f.outcome == "overridden", f.card))))
    joined = issued_cards_table.join(
        predictions_table, sa.and_(p.site == i.site, p.service_id == i.service_id,
                                   p.hook_instance == i.hook_instance, p.role == "active")
    ).outerjoin(feedback_table, sa.and_(f.site == i.site, f.service_id == i.service_id,
                                        f.card == i.card_uuid))
    query = _window(sa.select(i.site, i.service_id, p.model_id, p.model_version, p.sha256,
                              card, accepted, overridden).select_from(joined),
                    i.time, since, site, i.site)
    query = query.group_by(i.site, i.service_id, p.model_id, p.model_version, p.sha256)
    with store._unavailable_on_error(), store._engine.connect() as conn:
        return list(conn.execute(query))


def usage_since(store: Store, since: datetime, site: str | None = None
                ) -> dict[VersionKey, VersionUsage]:
    """Per (site, service, model id, version, sha256, role): predictions made since `since`
    and, for active versions, the cards they drove and what clinicians did with them."""
    if since.utcoffset() is None:
        raise ValueError("usage_since: since must be a timezone-aware datetime")
    store._ensure_schema()
    store.recorder.flush()
    usage: dict[VersionKey, VersionUsage] = {}
    for row in _predictions(store, since, site):
        key: VersionKey = (row.site, row.service_id, row.model_id, row.model_version,
                           row.sha256, row.role)
        entry = usage.get(key) or usage.setdefault(key, VersionUsage(key))
        entry.predictions += 1
        if row.score is not None:
            entry.scores.append(float(row.score))
        # An input not observed is either imputed (scored anyway) or missing (a required one:
        # no score); both count as missing, as a NaN counts in the training reference.
        for name in {*(row.missing or ()), *(row.imputed or ())}:
            entry.missing[name] = entry.missing.get(name, 0) + 1
    for row in _card_outcomes(store, since, site):
        key = (row.site, row.service_id, row.model_id, row.model_version, row.sha256, "active")
        entry = usage.get(key) or usage.setdefault(key, VersionUsage(key))
        entry.cards, entry.accepted, entry.overridden = row[5], row[6], row[7]
    return usage
