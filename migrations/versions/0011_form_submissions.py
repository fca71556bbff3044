"""form submissions: a repeated post of the same form page does not enroll twice

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 11:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.infra.models

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('form_submissions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('purpose', sa.String(length=16), nullable=False),
    sa.Column('program_id', sa.Integer(), nullable=False),
    sa.Column('customer_id', sa.Integer(), nullable=True),
    sa.Column('fingerprint', sa.String(length=64), nullable=True),
    sa.Column('created_at', app.infra.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_form_submissions_customer_id_customers'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['program_id'], ['programs.id'], name=op.f('fk_form_submissions_program_id_programs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_form_submissions_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_form_submissions')),
    sa.UniqueConstraint('tenant_id', 'key_hash', name=op.f('uq_form_submissions_tenant_id_key_hash'))
    )
    op.create_index(op.f('ix_form_submissions_created_at'), 'form_submissions', ['created_at'], unique=False)
    op.create_index(op.f('ix_form_submissions_tenant_id'), 'form_submissions', ['tenant_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_form_submissions_tenant_id'), table_name='form_submissions')
    op.drop_index(op.f('ix_form_submissions_created_at'), table_name='form_submissions')
    op.drop_table('form_submissions')
