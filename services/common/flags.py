"""Per-process "sold out" flags: refuse at once, without a Redis or Postgres round trip.

A flag lives `ttl_s` (a short re-check interval) and is cleared at once when a
message says stock came back, so a product is never refused for longer than
`ttl_s` after a restock even if a message is lost. The catalog and the gateway
each keep their own.
"""

from __future__ import annotations

import time


class SoldOutFlags:
    """Product ids answered "sold out" recently, each until its own deadline."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._until: dict[int, float] = {}

    def is_sold_out(self, product_id: int) -> bool:
        until = self._until.get(product_id)
        if until is None:
            return False
        if time.monotonic() >= until:
            self._until.pop(product_id, None)
            return False
        return True

    def mark(self, product_id: int) -> None:
        if self.ttl_s > 0:
            self._until[product_id] = time.monotonic() + self.ttl_s

    def clear(self, product_id: int) -> None:
        self._until.pop(product_id, None)

    def clear_all(self) -> None:
        self._until.clear()
