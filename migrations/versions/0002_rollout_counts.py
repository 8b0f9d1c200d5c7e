"""Rollout counters and the indexes of event-driven reconciliation: ``rollout_counts``
(targets per rollout, wave and state, backfilled from the existing targets) and the indexes a
tick asks through (pending targets of open waves, due deadlines and holds, a device's targets,
devices that said hello lately).
"""

import sqlalchemy as sa
from alembic import op

INDEXES = {
    "ix_rollout_targets_pending": ["rollout_id", "state", "wave", "device_id"],
    "ix_rollout_targets_deadline": ["rollout_id", "state", "state_deadline"],
    "ix_rollout_targets_hold": ["rollout_id", "state", "hold_until"],
    "ix_rollout_targets_device": ["device_id"],
}


def upgrade() -> None:
    op.create_table(
        "rollout_counts",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("wave", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name="fk_rollout_counts_rollout_id_rollouts"
        ),
        sa.PrimaryKeyConstraint("rollout_id", "wave", "state", name="pk_rollout_counts"),
    )
    for name, columns in INDEXES.items():
        op.create_index(name, "rollout_targets", columns)
    op.create_index("ix_devices_last_seen", "devices", ["last_seen"])  # who said hello lately
    op.execute(
        "INSERT INTO rollout_counts (rollout_id, wave, state, n) "
        "SELECT rollout_id, wave, state, COUNT(*) FROM rollout_targets "
        "GROUP BY rollout_id, wave, state"
    )


def downgrade() -> None:
    op.drop_index("ix_devices_last_seen", table_name="devices")
    for name in INDEXES:
        op.drop_index(name, table_name="rollout_targets")
    op.drop_table("rollout_counts")


# the chain alembic follows
revision = "0002"
down_revision = "0001"
