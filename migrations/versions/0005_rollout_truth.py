"""Rollout truth: per target, the bytes the device reported fetching for the update and for a
rollback (kept apart, so a rollback does not erase the rollout's delta figure), the rollback
artifact's size, and why the update was sent as a delta or in full (the planner's reason).
"""

import sqlalchemy as sa
from alembic import op


def upgrade() -> None:
    with op.batch_alter_table("rollout_targets") as batch:
        batch.add_column(sa.Column("bytes_sent", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("delivery", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("rollback_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("rollback_bytes_sent", sa.BigInteger(), nullable=True))
    # targets sent before this revision: what was planned is the best figure there is
    op.execute("UPDATE rollout_targets SET bytes_sent = bytes_to_send "
               "WHERE bytes_to_send IS NOT NULL AND state = 'healthy'")


def downgrade() -> None:
    with op.batch_alter_table("rollout_targets") as batch:
        batch.drop_column("rollback_bytes_sent")
        batch.drop_column("rollback_bytes")
        batch.drop_column("delivery")
        batch.drop_column("bytes_sent")


# the chain alembic follows
revision = "0005"
down_revision = "0004"
