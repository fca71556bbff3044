"""mail outbox campaigns as long as link campaigns (100): a link of any campaign may ask

The mail outbox copied a link's campaign into a 64-character column while links
take 100, so a member asking for a fresh link from a page whose campaign was
longer hit "value too long" on PostgreSQL (SQLite does not check lengths).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 11:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('mail_outbox', schema=None) as batch_op:
        batch_op.alter_column('campaign', existing_type=sa.String(length=64),
                              type_=sa.String(length=100), existing_nullable=True)


def downgrade() -> None:
    # Longer campaigns would not fit back: cut them, as the column can hold no more.
    op.execute("UPDATE mail_outbox SET campaign = substr(campaign, 1, 64) "
               "WHERE length(campaign) > 64")
    with op.batch_alter_table('mail_outbox', schema=None) as batch_op:
        batch_op.alter_column('campaign', existing_type=sa.String(length=100),
                              type_=sa.String(length=64), existing_nullable=True)
