"""import job leases: a sweeper re-queues jobs no worker took or whose worker died

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23 15:54:35.590121
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.infra.models

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('import_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_until', app.infra.models.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('import_jobs', schema=None) as batch_op:
        batch_op.drop_column('attempts')
        batch_op.drop_column('claimed_until')
