"""Device model trial state: ``device_models.state`` is "trial" while the device's last
report for that model was a trial (the model runs but is not proven yet), NULL once it
committed, rolled back or reported the model as settled. A rollout never takes a device in
trial for "already runs it" (see rollout.engine).
"""

import sqlalchemy as sa
from alembic import op


def upgrade() -> None:
    with op.batch_alter_table("device_models") as batch:
        batch.add_column(sa.Column("state", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device_models") as batch:
        batch.drop_column("state")


# the chain alembic follows
revision = "0007"
down_revision = "0006"
