"""current consents and the customer on install states, for segment counts

Segments over a million customers spent half their time working out "the latest
marketing_email decision is a grant" from the consent history, and the other half
hopping from install states to customers through cards. This keeps the latest
decision per customer and kind in ``current_consents`` and copies the card's
customer onto ``card_install_states``; both are backfilled here.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 15:32:25.315610
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.infra.models

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('current_consents',
    sa.Column('customer_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('granted', sa.Boolean(), nullable=False),
    sa.Column('recorded_at', app.infra.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('consent_id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['consent_id'], ['consents.id'], name=op.f('fk_current_consents_consent_id_consents'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_current_consents_customer_id_customers'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_current_consents_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('customer_id', 'kind', name=op.f('pk_current_consents'))
    )
    # The latest record per customer and kind; on a tie in time the later row wins, as
    # in Customer.current_consents().
    op.execute("""
        INSERT INTO current_consents (customer_id, kind, granted, recorded_at, consent_id, tenant_id)
        SELECT customer_id, kind, granted, recorded_at, id, tenant_id FROM (
            SELECT c.*, row_number() OVER (PARTITION BY customer_id, kind
                                           ORDER BY recorded_at DESC, id DESC) AS rank
            FROM consents c) AS ranked
        WHERE rank = 1
    """)
    op.create_index('ix_current_consents_granted', 'current_consents', ['tenant_id', 'kind', 'customer_id'], unique=False, postgresql_where=sa.text('granted'), sqlite_where=sa.text('granted'))
    op.create_index(op.f('ix_current_consents_tenant_id'), 'current_consents', ['tenant_id'], unique=False)

    with op.batch_alter_table('card_install_states', schema=None) as batch_op:
        batch_op.add_column(sa.Column('customer_id', sa.Integer(), nullable=True))
    op.execute("""
        UPDATE card_install_states SET customer_id =
            (SELECT cards.customer_id FROM cards WHERE cards.id = card_install_states.card_id)
    """)
    with op.batch_alter_table('card_install_states', schema=None) as batch_op:
        batch_op.alter_column('customer_id', existing_type=sa.Integer(), nullable=False)
        batch_op.create_foreign_key(op.f('fk_card_install_states_customer_id_customers'), 'customers', ['customer_id'], ['id'], ondelete='CASCADE')
        batch_op.create_index('ix_card_install_states_program_customer', ['program_id', 'customer_id'], unique=False)
        batch_op.create_index('ix_card_install_states_program_state_customer', ['program_id', 'state', 'customer_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('card_install_states', schema=None) as batch_op:
        batch_op.drop_index('ix_card_install_states_program_state_customer')
        batch_op.drop_index('ix_card_install_states_program_customer')
        batch_op.drop_constraint(op.f('fk_card_install_states_customer_id_customers'), type_='foreignkey')
        batch_op.drop_column('customer_id')
    op.drop_index(op.f('ix_current_consents_tenant_id'), table_name='current_consents')
    op.drop_index('ix_current_consents_granted', table_name='current_consents', postgresql_where=sa.text('granted'), sqlite_where=sa.text('granted'))
    op.drop_table('current_consents')
