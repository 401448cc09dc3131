"""The catalog's own Prometheus metrics (order path, gate, sweeper, reconciler)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ORDER_ATTEMPTS = Counter(
    "shopstack_order_attempts_total",
    "POST /api/v1/orders outcomes (sold_out_local: refused by the in-process flag).",
    ["outcome"],
)
ORDER_PG_QUERIES = Counter(
    "shopstack_order_pg_queries_total",
    "Postgres statements issued by the order path (placing, reading, cancelling orders).",
)
GATE_CALLS = Counter(
    "shopstack_gate_calls_total",
    "Redis admission-gate script calls, by operation.",
    ["op"],
)
ORDERS_EXPIRED = Counter(
    "shopstack_orders_expired_total",
    "Reservations expired by the sweeper (stock returned).",
)
INVENTORY_DISCREPANCY = Gauge(
    "shopstack_inventory_discrepancy_units",
    "Sum over products of |units_on_sale - stock - units in reserved or paid orders|"
    " (0 = healthy).",
    multiprocess_mode="livemax",
)
GATE_DRIFT = Gauge(
    "shopstack_gate_drift_units",
    "Sum over products of |gate stock - expected gate stock| seen by the last reconcile.",
    multiprocess_mode="livemax",
)
GATE_REPAIRS = Counter(
    "shopstack_gate_repairs_total",
    "Repairs of the Redis gate from Postgres, by kind.",
    ["kind"],
)
RECONCILER_LAST_RUN = Gauge(
    "shopstack_reconciler_last_run_timestamp_seconds",
    "Unix time at which the reconciler last finished a run.",
    multiprocess_mode="max",
)
