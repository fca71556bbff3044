"""mail outbox: members who enroll again are sent their own card link

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-23 15:57:27.634439
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.infra.models

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('mail_outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('program_id', sa.Integer(), nullable=False),
    sa.Column('customer_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('locale', sa.String(length=35), nullable=True),
    sa.Column('campaign', sa.String(length=64), nullable=True),
    sa.Column('created_at', app.infra.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('not_before', app.infra.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('claimed_until', app.infra.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.String(length=500), nullable=True),
    sa.Column('done_at', app.infra.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=True),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_mail_outbox_customer_id_customers'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['program_id'], ['programs.id'], name=op.f('fk_mail_outbox_program_id_programs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_mail_outbox_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mail_outbox'))
    )
    op.create_index('ix_mail_outbox_pending', 'mail_outbox', ['done_at', 'not_before'], unique=False)
    op.create_index('ix_mail_outbox_recent', 'mail_outbox', ['customer_id', 'program_id', 'created_at'], unique=False)
    op.create_index(op.f('ix_mail_outbox_tenant_id'), 'mail_outbox', ['tenant_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_mail_outbox_tenant_id'), table_name='mail_outbox')
    op.drop_index('ix_mail_outbox_recent', table_name='mail_outbox')
    op.drop_index('ix_mail_outbox_pending', table_name='mail_outbox')
    op.drop_table('mail_outbox')
