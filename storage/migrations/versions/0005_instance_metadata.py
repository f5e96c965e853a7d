"""instance metadata kept in the index (WADO-RS metadata without reading the objects)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 14:00:00

- instance_metadata: per instance, its DICOM JSON (PS3.18 F.2), zlib-compressed, computed after
  the ack by the render workers, and the object key it was computed from. A table of its own, so
  the instance rows every search reads stay narrow. Instances stored before this revision have
  no row: WADO-RS computes theirs on first request and keeps it.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instance_metadata",
        sa.Column(
            "instance_id",
            sa.Integer(),
            sa.ForeignKey("instance.id"),
            nullable=False,
            autoincrement=False,
        ),
        sa.Column("object_key", sa.String(length=128), nullable=False),
        sa.Column("dicom_json", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("instance_id"),
    )


def downgrade() -> None:
    op.drop_table("instance_metadata")
