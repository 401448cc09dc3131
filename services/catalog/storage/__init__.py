"""Every SQL statement of the catalog, one function per query (split by table)."""

from services.catalog.storage.idempotency import (
    claim_idempotency_key,
    delete_idempotency_key,
    fetch_idempotency_key,
    purge_idempotency_keys,
    store_idempotent_response,
    take_over_idempotency_key,
    unlock_idempotency_key,
)
from services.catalog.storage.orders import (
    ORDER_COLUMNS,
    close_order,
    expire_due,
    fetch_gate_products,
    fetch_inventory_discrepancies,
    fetch_order,
    fetch_order_statuses,
    fetch_reserved_orders,
    fetch_user_units,
    mark_paid,
    reserve,
    set_hold,
)
from services.catalog.storage.products import (
    fetch_page,
    fetch_product,
    insert_products_if_absent,
    lock_product,
    upsert_product,
)

__all__ = [
    "ORDER_COLUMNS",
    "claim_idempotency_key",
    "close_order",
    "delete_idempotency_key",
    "expire_due",
    "fetch_gate_products",
    "fetch_idempotency_key",
    "fetch_inventory_discrepancies",
    "fetch_order",
    "fetch_order_statuses",
    "fetch_page",
    "fetch_product",
    "fetch_reserved_orders",
    "fetch_user_units",
    "insert_products_if_absent",
    "lock_product",
    "mark_paid",
    "purge_idempotency_keys",
    "reserve",
    "set_hold",
    "store_idempotent_response",
    "take_over_idempotency_key",
    "unlock_idempotency_key",
    "upsert_product",
]
