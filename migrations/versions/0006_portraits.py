"""Device portraits, on-device benchmarks and benchmark requests (docs/portraits.md).
"""

import sqlalchemy as sa
from alembic import op


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "device_portraits",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("device_type", sa.String(64), nullable=False),
        sa.Column("portrait", sa.JSON(), nullable=False),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"],
                                name="fk_device_portraits_device_id_devices"),
        sa.PrimaryKeyConstraint("device_id", name="pk_device_portraits"),
    )
    op.create_index("ix_device_portraits_device_type", "device_portraits", ["device_type"])
    op.create_table(
        "device_benchmarks",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("device_type", sa.String(64), nullable=False),
        sa.Column("variant", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("runtime", sa.String(64), nullable=False),
        sa.Column("runtime_version", sa.String(64), nullable=False),
        *(sa.Column(c, sa.BigInteger(), nullable=True) for c in (
            "load_ms", "p50_us", "p95_us", "peak_rss_bytes", "model_rss_bytes", "energy_uj")),
        sa.Column("runs", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _ts("measured_at"),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"],
                                name="fk_device_benchmarks_device_id_devices"),
        sa.PrimaryKeyConstraint("device_id", "sha256", name="pk_device_benchmarks"),
    )
    op.create_index("ix_device_benchmarks_device_type", "device_benchmarks", ["device_type"])
    op.create_table(
        "bench_requests",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("variants", sa.JSON(), nullable=False),
        _ts("created_at"),
        _ts("published_at", True),
        _ts("done_at", True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"],
                                name="fk_bench_requests_device_id_devices"),
        sa.PrimaryKeyConstraint("id", name="pk_bench_requests"),
    )
    op.create_index("ix_bench_requests_device_id", "bench_requests", ["device_id"])


def downgrade() -> None:
    op.drop_index("ix_bench_requests_device_id", table_name="bench_requests")
    op.drop_table("bench_requests")
    op.drop_index("ix_device_benchmarks_device_type", table_name="device_benchmarks")
    op.drop_table("device_benchmarks")
    op.drop_index("ix_device_portraits_device_type", table_name="device_portraits")
    op.drop_table("device_portraits")


# the chain alembic follows
revision = "0006"
down_revision = "0005"
