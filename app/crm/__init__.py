"""The CRM connector: where a tenant's customer data lives, read fresh and written back.

One interface (:class:`Connector`), two implementations: the built-in store
(Passerelle's own customers are the CRM) and an HTTP JSON connector configured
per tenant (``CrmConnection``). Reads go through :func:`load_customer`
(read-through with a staleness-limited fallback); writes go through the
durable outbox (:func:`record_write`, :func:`deliver`). See docs/crm.md.
"""

from app.crm.connections import connector_for
from app.crm.connector import (
    Connector,
    CrmError,
    CrmNotFound,
    CrmRecord,
    CrmRejected,
    CrmStale,
    CrmUnavailable,
)
from app.crm.outbox import customer_payload, deliver, due_entries, record_write
from app.crm.sync import load_customer, refresh_customer, store_record

__all__ = [
    "Connector", "CrmError", "CrmNotFound", "CrmRecord", "CrmRejected", "CrmStale",
    "CrmUnavailable", "connector_for", "customer_payload", "deliver", "due_entries",
    "load_customer", "record_write", "refresh_customer", "store_record",
]
