"""The sandbox's state in Redis, shared by every worker: charges, keys, faults, callbacks.

A charge, its idempotency key and its callbacks are written by one Lua script, so two
concurrent requests with the same key can never both create a charge; the same script
counts the request and reads the faults in force, so a charge usually costs one round trip.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from services.psp_sandbox.schemas import Fault

# One charge request in one round trip. Modes:
#   begin   count the request, read the faults in force and pop the next queued fault;
#           if they are the ones the caller planned with (ARGV[3], none queued), also
#           write the planned charge, else return them ('stale') for the caller to decide
#   count   as begin, but stop after counting (the planned outcome writes nothing yet)
#   create  write the charge only (the request was counted by an earlier call)
# Writing: the key and the charge together, or what the key already names; a new
# charge's callbacks (ARGV[8..], triples of delivery id, document, due time) are queued
# in the same step, so a charge is never stored without its events.
_CHARGE = """
local mode, retention = ARGV[1], ARGV[2]
if mode ~= 'create' then
    redis.call('HINCRBY', KEYS[1], 'charge_requests', 1)
    redis.call('HINCRBY', KEYS[2], 'charge_requests', 1)
    redis.call('EXPIRE', KEYS[2], retention)
    local faults = redis.call('GET', KEYS[3]) or ''
    local queued = redis.call('LPOP', KEYS[4]) or ''
    if faults ~= ARGV[3] or queued ~= '' then
        return {'stale', faults, queued}
    end
    if mode == 'count' then
        return {'counted', faults, ''}
    end
end
local existing = redis.call('GET', KEYS[5])
if existing then
    local sep = string.find(existing, '|', 1, true)
    if string.sub(existing, 1, sep - 1) ~= ARGV[4] then
        return {'mismatch', ''}
    end
    local body = redis.call('GET', ARGV[7] .. string.sub(existing, sep + 1))
    return {'existing', body or ''}
end
redis.call('SET', KEYS[5], ARGV[4] .. '|' .. ARGV[5], 'EX', retention)
redis.call('SET', KEYS[6], ARGV[6], 'EX', retention)
redis.call('SADD', KEYS[7], ARGV[5])
redis.call('EXPIRE', KEYS[7], retention)
redis.call('HINCRBY', KEYS[2], 'charges_created', 1)
redis.call('EXPIRE', KEYS[2], retention)
redis.call('HINCRBY', KEYS[1], 'charges_created', 1)
for i = 8, #ARGV, 3 do
    redis.call('HSET', KEYS[8], ARGV[i], ARGV[i + 1])
    redis.call('ZADD', KEYS[9], ARGV[i + 2], ARGV[i])
end
return {'created', ARGV[6]}
"""

# Claim due callback deliveries by pushing their due time past a lease; return each
# claimed id and its document. An id without a document was delivered meanwhile.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local found = {}
for _, id in ipairs(ids) do
    local doc = redis.call('HGET', KEYS[2], id)
    if doc then
        redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[2], id)
        found[#found + 1] = id
        found[#found + 1] = doc
    else
        redis.call('ZREM', KEYS[1], id)
    end
end
return found
"""


@dataclass(frozen=True)
class Callback:
    """A callback to queue with a new charge."""

    id: str
    body: bytes
    delay_ms: int


@dataclass(frozen=True)
class ChargeWrite:
    """A charge to store under an idempotency key, with the callbacks it causes."""

    idempotency_key: str
    fingerprint: str
    charge_id: str
    charge: bytes
    reference: str
    callbacks: tuple[Callback, ...] = ()


@dataclass(frozen=True)
class CreateResult:
    outcome: str  # created | existing | mismatch
    charge: bytes


@dataclass(frozen=True)
class RequestResult:
    """What one charge request's round trip did.

    `stale`: counted only; `faults` and `queued` are the ones in force (not the planned
    ones). `counted`: counted only, the plan holds. Otherwise the plan's write happened
    and `outcome` is the CreateResult one.
    """

    outcome: str  # stale | counted | created | existing | mismatch
    charge: bytes = b""
    faults: bytes = b""
    queued: str | None = None


@dataclass(frozen=True)
class Delivery:
    id: str
    body: bytes
    attempts: int


Arg = bytes | str | int


def now_ms() -> int:
    return int(time.time() * 1000)


class SandboxStore:
    """Every Redis access of the sandbox, under one key prefix."""

    def __init__(self, redis: Redis, *, prefix: str, retention_s: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.retention_s = retention_s
        self._charge = redis.register_script(_CHARGE)
        self._claim = redis.register_script(_CLAIM)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def charge_request(
        self, *, reference: str, planned_faults: bytes, write: ChargeWrite | None
    ) -> RequestResult:
        """Count one charge request (every hit, faults included) and pop the next queued
        fault; if the faults in force are `planned_faults` (the raw override) and none was
        queued, also make `write` (None: write nothing yet). One round trip."""
        keys = self._charge_keys(reference, write)
        if write is None:
            reply = await self._charge(keys=keys, args=["count", self.retention_s, planned_faults])
        else:
            args = self._write_args("begin", write, planned_faults)
            reply = await self._charge(keys=keys, args=args)
        outcome = reply[0].decode()
        if outcome in ("stale", "counted"):
            queued = _as_str(reply[2]) if reply[2] else None
            return RequestResult(outcome, faults=bytes(reply[1]), queued=queued)
        return RequestResult(outcome, charge=bytes(reply[1]))

    async def create_charge(self, write: ChargeWrite) -> CreateResult:
        """Store a new charge under its key and queue its callbacks, or return the charge
        the key already names (the request was counted by `charge_request`)."""
        reply = await self._charge(
            keys=self._charge_keys(write.reference, write),
            args=self._write_args("create", write, b""),
        )
        return CreateResult(reply[0].decode(), bytes(reply[1]))

    def _charge_keys(self, reference: str, write: ChargeWrite | None) -> list[str]:
        keys = [
            self._k("stats"),
            self._k("refstats", reference),
            self._k("faults"),
            self._k("next_faults"),
        ]
        if write is not None:
            keys += [
                self._k("idem", write.idempotency_key),
                self._k("charge", write.charge_id),
                self._k("ref", reference),
                self._k("cb", "body"),
                self._k("cb", "due"),
            ]
        return keys

    def _write_args(self, mode: str, write: ChargeWrite, planned_faults: bytes) -> list[Arg]:
        args: list[Arg] = [
            mode,
            self.retention_s,
            planned_faults,
            write.fingerprint,
            write.charge_id,
            write.charge,
            self._k("charge", ""),
        ]
        if write.callbacks:
            now = now_ms()
            for callback in write.callbacks:
                doc = orjson.dumps({"body": callback.body.decode(), "attempts": 0})
                args += (callback.id, doc, now + callback.delay_ms)
        return args

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

    async def claim_callbacks(self, *, lease_ms: int, limit: int) -> list[Delivery]:
        reply = await self._claim(
            keys=[self._k("cb", "due"), self._k("cb", "body")], args=[now_ms(), lease_ms, limit]
        )
        found: list[Delivery] = []
        for raw_id, raw in zip(reply[::2], reply[1::2], strict=True):
            doc = orjson.loads(raw)
            found.append(Delivery(raw_id.decode(), doc["body"].encode(), int(doc["attempts"])))
        return found

    async def callbacks_delivered(self, delivery_ids: list[str]) -> None:
        """Acknowledge deliveries (one round trip for the lot)."""
        if not delivery_ids:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._k("cb", "due"), *delivery_ids)
            pipe.hdel(self._k("cb", "body"), *delivery_ids)
            pipe.hincrby(self._k("stats"), "callbacks_sent", len(delivery_ids))
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
