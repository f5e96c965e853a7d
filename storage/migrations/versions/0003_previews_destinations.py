"""previews (rendition table, instance preview status) and C-MOVE destinations

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 11:30:00

- partner.dest_host, partner.dest_port: where C-MOVE sends to the partner's AE title;
- instance.preview_status, instance.preview_reason: NULL until the preview workers have rendered
  the instance (a partial index over the pending rows is their queue), then 'ok' or
  'unrenderable' with a reason; instances stored before this revision are pending, so previews
  are made for them too;
- rendition: thumbnails and previews kept in the object store under generated keys.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PENDING = sa.text("preview_status IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("partner", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dest_host", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("dest_port", sa.Integer(), nullable=True))
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("preview_status", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("preview_reason", sa.String(length=200), nullable=True))
    op.create_index(
        "ix_instance_preview_pending",
        "instance",
        ["id"],
        unique=False,
        sqlite_where=PENDING,
        postgresql_where=PENDING,
    )
    op.create_table(
        "rendition",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("frame", sa.Integer(), nullable=False),
        sa.Column("object_key", sa.String(length=128), nullable=False),
        sa.Column("media_type", sa.String(length=32), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["instance_id"], ["instance.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("instance_id", "kind", "frame", name="uq_rendition"),
        sa.UniqueConstraint("object_key"),
    )


def downgrade() -> None:
    # plain DROP COLUMN (SQLite 3.35+): batch mode would copy tables others refer to
    op.drop_table("rendition")
    op.drop_index("ix_instance_preview_pending", table_name="instance")
    op.drop_column("instance", "preview_reason")
    op.drop_column("instance", "preview_status")
    op.drop_column("partner", "dest_port")
    op.drop_column("partner", "dest_host")
