"""Store queries only tests need: reading back stored feedback and predictions, and appending
an audit record by itself, returning its id (the service stores audit records with their call's
records, `Store.record` / `Store.add_calls`). Each takes the `Store` to use and behaves as its
methods do: a read waits for the store's recorder first, so it sees this process's own calls,
and `StoreUnavailable` is raised when the database cannot be used.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from cds_service.records.audit import AuditRecord
from cds_service.records.store import Store
from cds_service.records.tables import (
    audit_log_table,
    audit_row,
    feedback_table,
    predictions_table,
)


def list_feedback(store: Store, site: str | None = None, service_id: str | None = None,
                  card: str | None = None) -> list[dict[str, Any]]:
    """Stored feedback, oldest first, as plain dicts with JSON fields decoded."""
    store._ensure_schema()
    store.recorder.flush()
    query = sa.select(feedback_table).order_by(feedback_table.c.id)
    for column, value in (("site", site), ("service_id", service_id), ("card", card)):
        if value is not None:
            query = query.where(feedback_table.c[column] == value)
    with store._unavailable_on_error(), store._engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def add_audit(store: Store, record: AuditRecord) -> int:
    """Append `record`, committed before returning; return its id."""
    row = audit_row(record)
    store._ensure_schema()
    stmt = sa.insert(audit_log_table).returning(audit_log_table.c.id)
    with store._unavailable_on_error(), store._write() as conn:
        return conn.execute(stmt, row).scalar_one()


def list_predictions(store: Store, *, hook_instance: str | None = None,
                     role: str | None = None) -> list[dict[str, Any]]:
    """Stored predictions, oldest first, as plain dicts."""
    store.recorder.flush()
    query = sa.select(predictions_table).order_by(predictions_table.c.id)
    if hook_instance is not None:
        query = query.where(predictions_table.c.hook_instance == hook_instance)
    if role is not None:
        query = query.where(predictions_table.c.role == role)
    store._ensure_schema()
    with store._unavailable_on_error(), store._engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]

