"""APNs connection status per Apple identity (the push workers' circuit breaker)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.infra.models

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('apple_identities') as batch:
        batch.add_column(sa.Column('apns_failing_since', app.infra.models.UTCDateTime(timezone=True),
                                   nullable=True))
        batch.add_column(sa.Column('apns_problem', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('apns_next_attempt_at',
                                   app.infra.models.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('apple_identities') as batch:
        batch.drop_column('apns_next_attempt_at')
        batch.drop_column('apns_problem')
        batch.drop_column('apns_failing_since')
