"""frame plans kept with the instance metadata (on-demand renders without parsing the object)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 16:40:00

- instance_metadata.render_plan: the frame plan (imaging.render.FramePlan, JSON) the render
  workers made from the same parse as the row's DICOM JSON, for uncompressed greyscale objects;
  NULL for anything else and for rows made before this revision (those objects are parsed for
  each render, as before).
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instance_metadata", sa.Column("render_plan", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("instance_metadata", "render_plan")
