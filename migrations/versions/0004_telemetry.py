"""Device telemetry: the latest summary per device (``device_telemetry``) and inference totals
per device, model and version (``device_telemetry_models``), for the fleet metrics.
"""

import sqlalchemy as sa
from alembic import op

COUNTERS = ("requests", "errors", "fallbacks", "swaps", "trials_passed", "trials_failed",
            "agreement_ppm_sum", "agreement_trials", "latency_sum_us", *(f"lat_{i}" for i in range(13)))


def upgrade() -> None:
    op.create_table(
        "device_telemetry",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("boot_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("device_type", sa.String(64), nullable=False),
        sa.Column("rss_bytes", sa.BigInteger(), nullable=False),
        sa.Column("uptime_s", sa.BigInteger(), nullable=False),
        sa.Column("sent_at", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE",
                                name="fk_device_telemetry_device_id_devices"),
        sa.PrimaryKeyConstraint("device_id", name="pk_device_telemetry"),
    )
    op.create_table(
        "device_telemetry_models",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("variant", sa.String(64), nullable=False),
        sa.Column("device_type", sa.String(64), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in COUNTERS),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE",
                                name="fk_device_telemetry_models_device_id_devices"),
        sa.PrimaryKeyConstraint("device_id", "model_name", "version",
                                name="pk_device_telemetry_models"),
    )


def downgrade() -> None:
    op.drop_table("device_telemetry_models")
    op.drop_table("device_telemetry")


# the chain alembic follows
revision = "0004"
down_revision = "0003"
