"""The audit log: who did what to which subject, appended in the caller's transaction.

Entries are only ever added, never changed; fields are clipped to the column sizes. An entry
written inside a transaction that rolls back is gone with it, so the log records what happened.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .store.models import AuditEntry

__all__ = ["audit", "list_audit"]


def audit(
    session: Session,
    actor: str,
    action: str,
    subject: str,
    details: Mapping[str, Any] | None = None,
    *,
    at: datetime | None = None,
) -> AuditEntry:
    """Append one entry to the audit log (in the caller's transaction)."""
    entry = AuditEntry(
        at=at or datetime.now(UTC),
        actor=actor[:64],
        action=action[:64],
        subject=subject[:256],
        details=dict(details or {}),
    )
    session.add(entry)
    session.flush()
    return entry


def list_audit(session: Session, since: datetime | None = None) -> list[AuditEntry]:
    """Audit entries at or after ``since`` (all if None), oldest first."""
    q = select(AuditEntry).order_by(AuditEntry.at, AuditEntry.id)
    if since is not None:
        q = q.where(AuditEntry.at >= since)
    return list(session.scalars(q))
