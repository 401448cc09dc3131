"""The sandbox's state in Redis, shared by every worker: charges, keys, faults, callbacks.

A charge and its idempotency key are written by one Lua script, so two concurrent
requests with the same key can never both create a charge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from services.psp_sandbox.schemas import Fault

_CREATE = """
local existing = redis.call('GET', KEYS[1])
if existing then
    local sep = string.find(existing, '|', 1, true)
    if string.sub(existing, 1, sep - 1) ~= ARGV[1] then
        return {'mismatch', ''}
    end
    local body = redis.call('GET', ARGV[5] .. string.sub(existing, sep + 1))
    return {'existing', body or ''}
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'EX', ARGV[4])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('HINCRBY', KEYS[4], 'charges_created', 1)
redis.call('EXPIRE', KEYS[4], ARGV[4])
redis.call('HINCRBY', KEYS[5], 'charges_created', 1)
return {'created', ARGV[3]}
"""

# Claim due callback deliveries by pushing their due time past a lease.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
    redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[2], id)
end
return ids
"""


@dataclass(frozen=True)
class CreateResult:
    outcome: str  # created | existing | mismatch
    charge: bytes


@dataclass(frozen=True)
class Delivery:
    id: str
    body: bytes
    attempts: int


def now_ms() -> int:
    return int(time.time() * 1000)


class SandboxStore:
    """Every Redis access of the sandbox, under one key prefix."""

    def __init__(self, redis: Redis, *, prefix: str, retention_s: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.retention_s = retention_s
        self._create = redis.register_script(_CREATE)
        self._claim = redis.register_script(_CLAIM)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def begin_request(self, reference: str) -> tuple[dict[str, object], str | None]:
        """Count one charge request (every hit, faults included); return the run-time
        fault overrides and the next queued fault, if any (one round trip)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(self._k("stats"), "charge_requests", 1)
            pipe.hincrby(self._k("refstats", reference), "charge_requests", 1)
            pipe.expire(self._k("refstats", reference), self.retention_s)
            pipe.get(self._k("faults"))
            pipe.lpop(self._k("next_faults"))
            *_, raw_faults, queued = await pipe.execute()
        loaded = orjson.loads(raw_faults) if raw_faults else {}
        override = loaded if isinstance(loaded, dict) else {}
        return override, (_as_str(queued) if queued is not None else None)

    async def create_charge(
        self,
        *,
        idempotency_key: str,
        fingerprint: str,
        charge_id: str,
        charge: bytes,
        reference: str,
    ) -> CreateResult:
        """Store a new charge under its key, or return the charge the key already names."""
        outcome, body = await self._create(
            keys=[
                self._k("idem", idempotency_key),
                self._k("charge", charge_id),
                self._k("ref", reference),
                self._k("refstats", reference),
                self._k("stats"),
            ],
            args=[fingerprint, charge_id, charge, self.retention_s, self._k("charge", "")],
        )
        return CreateResult(outcome.decode(), bytes(body))

    async def get_charge(self, charge_id: str) -> bytes | None:
        body = await self.redis.get(self._k("charge", charge_id))
        return _as_bytes(body)

    async def charges_for(self, reference: str) -> list[bytes]:
        """Every charge created for a reference."""
        members = await self.redis.smembers(self._k("ref", reference))
        ids = sorted(_as_str(m) for m in members)
        if not ids:
            return []
        bodies = await self.redis.mget([self._k("charge", i) for i in ids])
        return [_as_bytes(b) or b"" for b in bodies if b is not None]

    async def stats(self, reference: str | None) -> dict[str, int]:
        totals = await self.redis.hgetall(self._k("stats"))
        scoped = await self.redis.hgetall(self._k("refstats", reference)) if reference else totals
        return {
            "charge_requests": int(scoped.get(b"charge_requests", 0)),
            "charges_created": int(scoped.get(b"charges_created", 0)),
            "callbacks_sent": int(totals.get(b"callbacks_sent", 0)),
            "callbacks_failed": int(totals.get(b"callbacks_failed", 0)),
        }

    async def faults_override(self) -> dict[str, object]:
        raw = await self.redis.get(self._k("faults"))
        loaded = orjson.loads(raw) if raw else {}
        return loaded if isinstance(loaded, dict) else {}

    async def set_faults_override(self, override: dict[str, object], *, clear: bool) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._k("faults"), orjson.dumps(override))
            if clear:
                pipe.delete(self._k("next_faults"))
            await pipe.execute()

    async def queue_faults(self, faults: list[Fault]) -> None:
        """Replace the queue of faults for the next charge requests."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._k("next_faults"))
            if faults:
                pipe.rpush(self._k("next_faults"), *faults)
            await pipe.execute()

    async def queued_faults(self) -> list[str]:
        return [_as_str(f) for f in await self.redis.lrange(self._k("next_faults"), 0, -1)]

    async def reset(self) -> int:
        """Drop every sandbox key (tests); return how many were removed."""
        removed = 0
        async for key in self.redis.scan_iter(match=self.prefix + "*", count=500):
            removed += int(await self.redis.delete(key))
        return removed

    # Callback deliveries: a sorted set of due times and a hash of bodies.

    async def enqueue_callback(self, body: bytes, *, delivery_id: str, delay_ms: int) -> None:
        doc = orjson.dumps({"body": body.decode(), "attempts": 0})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("cb", "body"), delivery_id, doc)
            pipe.zadd(self._k("cb", "due"), {delivery_id: now_ms() + delay_ms})
            await pipe.execute()

    async def claim_callbacks(self, *, lease_ms: int, limit: int) -> list[Delivery]:
        ids = await self._claim(keys=[self._k("cb", "due")], args=[now_ms(), lease_ms, limit])
        if not ids:
            return []
        docs = await self.redis.hmget(self._k("cb", "body"), ids)
        found: list[Delivery] = []
        for raw_id, raw in zip(ids, docs, strict=True):
            if raw is None:  # delivered by another worker meanwhile
                await self.redis.zrem(self._k("cb", "due"), raw_id)
                continue
            doc = orjson.loads(raw)
            found.append(Delivery(raw_id.decode(), doc["body"].encode(), int(doc["attempts"])))
        return found

    async def callback_delivered(self, delivery_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._k("cb", "due"), delivery_id)
            pipe.hdel(self._k("cb", "body"), delivery_id)
            pipe.hincrby(self._k("stats"), "callbacks_sent", 1)
            await pipe.execute()

    async def callback_retry(self, delivery: Delivery, *, delay_ms: int) -> None:
        doc = orjson.dumps({"body": delivery.body.decode(), "attempts": delivery.attempts + 1})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("cb", "body"), delivery.id, doc)
            pipe.zadd(self._k("cb", "due"), {delivery.id: now_ms() + delay_ms})
            await pipe.execute()

    async def callback_given_up(self, delivery_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._k("cb", "due"), delivery_id)
            pipe.hdel(self._k("cb", "body"), delivery_id)
            pipe.hincrby(self._k("stats"), "callbacks_failed", 1)
            await pipe.execute()

    async def pending_callbacks(self) -> int:
        return int(await self.redis.zcard(self._k("cb", "due")))


def _as_bytes(value: bytes | str | None) -> bytes | None:
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else bytes(value)


def _as_str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
