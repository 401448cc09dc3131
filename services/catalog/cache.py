"""Redis cache-aside for product detail bodies, safe against stale refills.

A reader notes the product's generation before it reads Postgres and refills
the cache only if no write bumped the generation meanwhile, so a slow reader
can never put back a body older than the last invalidation.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("shopstack.catalog.cache")

CHANGED_CHANNEL = "catalog:product-changed"
MISSING = b"-"  # negative-cache marker: the product does not exist

_FILL_IF_CURRENT = """
if (redis.call('GET', KEYS[2]) or '0') == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
    return 1
end
return 0
"""


def body_key(product_id: int) -> str:
    return f"catalog:product:{product_id}"


def generation_key(product_id: int) -> str:
    return f"catalog:product-gen:{product_id}"


class ProductCache:
    """Cached product bodies; every Redis failure degrades to a miss, never an error."""

    def __init__(self, redis: Redis, *, ttl_s: int, negative_ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self._fill = redis.register_script(_FILL_IF_CURRENT)

    async def lookup(self, product_id: int) -> tuple[bytes | None, bytes]:
        """Return (cached body or None, generation to hand back to `fill`)."""
        try:
            body, generation = await self.redis.mget(
                body_key(product_id), generation_key(product_id)
            )
        except RedisError as exc:
            log.warning("cache lookup failed", extra={"error": str(exc)})
            return None, b""
        return _as_bytes(body), _as_bytes(generation) or b"0"

    async def fill(self, product_id: int, generation: bytes, body: bytes | None) -> None:
        """Store a body (None: a negative entry) unless the product changed since lookup."""
        if not generation:
            return
        ttl = self.ttl_s if body is not None else self.negative_ttl_s
        try:
            await self._fill(
                keys=[body_key(product_id), generation_key(product_id)],
                args=[generation, body if body is not None else MISSING, ttl],
            )
        except RedisError as exc:
            log.warning("cache fill failed", extra={"error": str(exc)})

    async def invalidate(self, product_id: int) -> None:
        """Bump the generation, drop the body and tell every subscriber (gateway caches)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(generation_key(product_id))
            pipe.delete(body_key(product_id))
            pipe.publish(CHANGED_CHANNEL, str(product_id))
            await pipe.execute()


def _as_bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value
