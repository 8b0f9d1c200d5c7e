"""Device model trial state: ``device_models.state`` is "trial" while the device's last
report for that model was a trial (the model runs but is not proven yet), NULL once it
committed, rolled back or reported the model as settled. A rollout never takes a device in
trial for "already runs it" (see rollout.engine).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 16:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("device_models") as batch:
        batch.add_column(sa.Column("state", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device_models") as batch:
        batch.drop_column("state")
