"""partner policy, instance quarantine, identity vault

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 10:00:00

- partner.policy: the partner's de-identification policy as JSON (NULL: the operator's default);
- instance.quarantine: why an instance is held back from view (NULL: visible), with a partial
  index over the quarantined rows only;
- identity: one row per original a partner sent (patient ID, accession, study UID) with its
  allocated pseudonym, the keyed-hash lookup and the sealed originals.

On SQLite the two new columns are plain ALTER TABLE ADD COLUMN (batch mode does not copy the
table for that), so upgrading a large index is quick. Existing rows keep policy NULL and
quarantine NULL: every instance already stored stays visible. The downgrade drops the vault
(re-identification is lost) and refuses while any instance is quarantined.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

QUARANTINED = sa.text("quarantine IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("partner", schema=None) as batch_op:
        batch_op.add_column(sa.Column("policy", sa.Text(), nullable=True))

    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("quarantine", sa.String(length=200), nullable=True))
    op.create_index(
        "ix_instance_quarantine",
        "instance",
        ["quarantine"],
        unique=False,
        sqlite_where=QUARANTINED,
        postgresql_where=QUARANTINED,
    )

    op.create_table(
        "identity",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("partner_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("lookup", sa.String(length=64), nullable=False),
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["partner_id"], ["partner.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("partner_id", "kind", "lookup", name="uq_identity_lookup"),
        sa.UniqueConstraint("kind", "pseudonym", name="uq_identity_pseudonym"),
    )


def downgrade() -> None:
    # without the column every held-back instance would silently become visible: refuse instead
    held = op.get_bind().scalar(
        sa.text("SELECT count(*) FROM instance WHERE quarantine IS NOT NULL")
    )
    if held:
        raise RuntimeError(
            f"{held} instances are quarantined; downgrading below 0002 would make them visible. "
            "Release or remove them first."
        )
    # plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+), not batch mode: batch mode would copy and
    # drop the partner table, which SQLite refuses while patient/study/instance rows refer to it
    op.drop_table("identity")
    op.drop_index("ix_instance_quarantine", table_name="instance")
    op.drop_column("instance", "quarantine")
    op.drop_column("partner", "policy")
