"""The database schema: the column types, the tables (all in one `metadata`) and the row an
audit record becomes.

The audit log is append-only (see `cds_service.records.store`); `issued_cards`,
`call_records` and `card_overrides` are purged with it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator

from cds_service.records.audit import TUPLE_FIELDS, AuditRecord


class UtcDateTime(TypeDecorator):
    """Timezone-aware datetime stored in UTC; always read back as an aware UTC datetime.

    SQLite has no time zone type: values are stored as naive UTC text (sortable), and UTC is
    re-attached on read. PostgreSQL uses `timestamptz`.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; store only timezone-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# What `json.dumps(value, ensure_ascii=True, separators=(",", ":"))` writes, without building an
# encoder for each of a call's eight JSON columns (`json.dumps` does when given any option).
_JSON = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


class JsonText(TypeDecorator):
    """A JSON value stored as text (same bytes on both backends; no JSONB-only queries)."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> str | None:
        if value is None:
            return None
        return _JSON.encode(value)

    def process_result_value(self, value: str | None, dialect: sa.Dialect) -> Any:
        return None if value is None else json.loads(value)


# All tables live in this one MetaData.
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

feedback_table = sa.Table(
    "feedback",
    metadata,
    # INTEGER PRIMARY KEY on SQLite is the rowid alias (autoincrementing); BIGINT would not be.
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("dedupe_key", sa.String(64), nullable=False, unique=True),
    sa.Column("site", sa.Text, nullable=False),
    sa.Column("service_id", sa.Text, nullable=False),
    sa.Column("card", sa.Text, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("outcome_timestamp", UtcDateTime, nullable=False),
    sa.Column("accepted_suggestions", JsonText, nullable=False),
    sa.Column("override_code", sa.Text),
    sa.Column("override_system", sa.Text),
    sa.Column("override_display", sa.Text),
    sa.Column("user_comment", sa.Text),
    sa.Column("override_extension", JsonText),
    sa.Column("raw", JsonText, nullable=False),
    sa.Column("warnings", JsonText, nullable=False),
    sa.Column("received_at", UtcDateTime, nullable=False),
    sa.Index(None, "site", "service_id", "card"),
)

audit_log_table = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("time", UtcDateTime, nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("site", sa.Text),
    sa.Column("iss", sa.Text),
    sa.Column("sub", sa.Text),
    sa.Column("user_id", sa.Text),
    sa.Column("patient_id", sa.Text),
    sa.Column("encounter_id", sa.Text),
    sa.Column("hook", sa.Text),
    sa.Column("hook_instance", sa.Text),
    sa.Column("service_id", sa.Text),
    sa.Column("prefetch_keys_used", JsonText, nullable=False),
    sa.Column("fhir_urls_fetched", JsonText, nullable=False),
    sa.Column("card_uuids", JsonText, nullable=False),
    sa.Column("suggestion_uuids", JsonText, nullable=False),
    sa.Column("feedback_cards", JsonText, nullable=False),
    sa.Column("outcome", sa.Text),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("detail", sa.Text),
    sa.Column("fhir_server_refused", sa.Text),
    # Accounting of disclosures: "every access to this patient's data in a period".
    sa.Index(None, "patient_id", "time"),
)
# Every model score, active and shadow, keyed by hookInstance (join to audit_log for the patient).
# Shadow rows are how a candidate model is compared with the live one before it is switched on.
# Feature values are not stored here (they are clinical data); names of missing and imputed
# inputs and the contribution ranking are.
predictions_table = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("time", UtcDateTime, nullable=False, index=True),
    sa.Column("site", sa.Text, nullable=False),
    sa.Column("service_id", sa.Text, nullable=False),
    sa.Column("hook_instance", sa.Text, nullable=False, index=True),
    sa.Column("role", sa.String(8), nullable=False),
    sa.Column("model_id", sa.Text, nullable=False),
    sa.Column("model_version", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("output", sa.Text, nullable=False),
    sa.Column("score", sa.Float),
    sa.Column("indicator", sa.String(16)),
    sa.Column("unavailable", sa.Text),
    sa.Column("missing", JsonText, nullable=False),
    sa.Column("imputed", JsonText, nullable=False),
    sa.Column("contributions", JsonText, nullable=False),
    sa.Index(None, "model_id", "model_version", "time"),
)
# One row per card we issued. Feedback names only the card uuid (not the user, patient or topic
# it was about): storing an override looks the card up here. Purged with the audit log.
issued_cards_table = sa.Table(
    "issued_cards",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("time", UtcDateTime, nullable=False, index=True),  # retention purge
    sa.Column("site", sa.Text, nullable=False),
    sa.Column("service_id", sa.Text, nullable=False),
    sa.Column("hook_instance", sa.Text),
    sa.Column("card_uuid", sa.Text, nullable=False, index=True),
    sa.Column("user_id", sa.Text),
    sa.Column("patient_id", sa.Text),
    sa.Column("topic_system", sa.Text),
    sa.Column("topic_code", sa.Text),
    sa.Column("indicator", sa.String(16)),
    sa.Index(None, "site", "patient_id", "user_id", "topic_code"),
)

# The id of every call whose records (audit, issued cards, predictions) are stored, written in the
# same transaction: a call replayed from the spool after a crash or an outage is stored once.
# Purged with the audit log.
call_records_table = sa.Table(
    "call_records",
    metadata,
    sa.Column("record_id", sa.String(32), primary_key=True),
    sa.Column("time", UtcDateTime, nullable=False, index=True),
)

# One row per override of a card we issued, with the card's user, patient, topic and indicator
# copied from `issued_cards` when the feedback is stored. Alert-fatigue suppression looks here on
# every call that has cards: a few rows found by index, where joining feedback to every card ever
# issued to this clinician for this patient grew with each chart opening. Purged with the audit
# log.
overrides_table = sa.Table(
    "card_overrides",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("time", UtcDateTime, nullable=False, index=True),  # see overrides.record_overrides
    sa.Column("site", sa.Text, nullable=False),
    sa.Column("service_id", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text),
    sa.Column("patient_id", sa.Text),
    sa.Column("topic_code", sa.Text),
    sa.Column("indicator", sa.String(16)),
    sa.Column("card_uuid", sa.Text, nullable=False),
    sa.Index(None, "site", "service_id", "user_id", "patient_id", "topic_code", "time"),
)


def audit_row(record: AuditRecord) -> dict[str, Any]:
    """The `audit_log` row of `record` (all columns but `id`; tuple fields as lists)."""
    row = {name: getattr(record, name) for name in audit_log_table.c.keys() if name != "id"}
    for name in TUPLE_FIELDS:
        row[name] = list(row[name])
    return row

