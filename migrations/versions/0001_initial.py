"""Initial schema: devices, groups, models, versions, variants, artifacts, deltas, rollouts,
rollout targets and the audit log.
"""

import sqlalchemy as sa
from alembic import op


def _ts(name: str, *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _sha(name: str, *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(64), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("hardware_id", sa.String(128), nullable=True),
        sa.Column("arch", sa.String(32), nullable=True),
        sa.Column("os", sa.String(64), nullable=True),
        sa.Column("cpu", sa.String(128), nullable=True),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("accelerator", sa.String(64), nullable=True),
        sa.Column("runtimes", sa.JSON(), nullable=False),
        sa.Column("disk_free_bytes", sa.BigInteger(), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("agent_version", sa.String(32), nullable=True),
        sa.Column("online", sa.Boolean(), nullable=False),
        _ts("last_seen", nullable=True),
        sa.Column("manifest_serial", sa.BigInteger(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
    )
    op.create_table(
        "device_models",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("variant", sa.String(64), nullable=True),
        _sha("sha256"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"],
            name="fk_device_models_device_id_devices", ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "model_name", name="pk_device_models"),
    )
    op.create_table(
        "groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_groups"),
        sa.UniqueConstraint("name", name="uq_groups_name"),
    )
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("name", name="uq_models_name"),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name="fk_model_versions_model_id_models"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.UniqueConstraint("model_id", "version", name="uq_model_versions_model_id"),
    )
    op.create_table(
        "artifacts",
        _sha("sha256"),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("sha256", name="pk_artifacts"),
    )
    op.create_table(
        "variants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("precision", sa.String(8), nullable=False),
        _sha("artifact_sha256"),
        sa.Column("info", sa.JSON(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["version_id"], ["model_versions.id"], name="fk_variants_version_id_model_versions"
        ),
        sa.ForeignKeyConstraint(
            ["artifact_sha256"], ["artifacts.sha256"],
            name="fk_variants_artifact_sha256_artifacts",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_variants"),
        sa.UniqueConstraint("version_id", "name", name="uq_variants_version_id"),
    )
    op.create_table(
        "deltas",
        sa.Column("id", sa.Integer(), nullable=False),
        _sha("base_sha256"),
        _sha("target_sha256"),
        sa.Column("codec", sa.String(16), nullable=False),
        _sha("artifact_sha256"),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("build_seconds", sa.Float(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["artifact_sha256"], ["artifacts.sha256"], name="fk_deltas_artifact_sha256_artifacts"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_deltas"),
        sa.UniqueConstraint(
            "base_sha256", "target_sha256", "codec", name="uq_deltas_base_sha256"
        ),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("failures_acknowledged", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        _ts("lease_until", nullable=True),
        sa.Column("created_by", sa.String(64), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("finished_at", nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_rollouts_model_id_models"),
        sa.ForeignKeyConstraint(
            ["version_id"], ["model_versions.id"], name="fk_rollouts_version_id_model_versions"
        ),
        sa.ForeignKeyConstraint(["group_id"], ["groups.id"], name="fk_rollouts_group_id_groups"),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
    )
    op.create_table(
        "rollout_targets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("variant_id", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        _sha("base_sha256", nullable=True),
        _sha("target_sha256", nullable=True),
        _sha("artifact_sha256", nullable=True),
        sa.Column("artifact_kind", sa.String(8), nullable=True),
        sa.Column("bytes_to_send", sa.BigInteger(), nullable=True),
        sa.Column("full_bytes", sa.BigInteger(), nullable=True),
        sa.Column("manifest_id", sa.String(32), nullable=True),
        sa.Column("serial", sa.BigInteger(), nullable=True),
        sa.Column("manifest", sa.Text(), nullable=True),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("hold_until", nullable=True),
        _ts("state_deadline", nullable=True),
        _sha("previous_sha256", nullable=True),
        sa.Column("previous_version", sa.String(64), nullable=True),
        sa.Column("health", sa.JSON(), nullable=False),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name="fk_rollout_targets_rollout_id_rollouts"
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name="fk_rollout_targets_device_id_devices"
        ),
        sa.ForeignKeyConstraint(
            ["variant_id"], ["variants.id"], name="fk_rollout_targets_variant_id_variants"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_rollout_targets"),
        sa.UniqueConstraint("rollout_id", "device_id", name="uq_rollout_targets_rollout_id"),
    )
    op.create_table(
        "device_events",
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        _ts("at"),
        sa.PrimaryKeyConstraint("event_id", name="pk_device_events"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        _ts("at"),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(256), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )


def downgrade() -> None:
    for table in (
        "audit_log",
        "device_events",
        "rollout_targets",
        "rollouts",
        "deltas",
        "variants",
        "artifacts",
        "model_versions",
        "models",
        "groups",
        "device_models",
        "devices",
    ):
        op.drop_table(table)


# the chain alembic follows
revision = "0001"
down_revision = None
