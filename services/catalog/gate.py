"""The Redis admission gate in front of Postgres, and the local sold-out flags.

Postgres is the authority for stock; the gate only keeps hopeless buys away
from it. Per product the gate holds:

    gate:{pid}:p   hash   stock, cap (-1: none), from / until (sale window, ms)
    gate:{pid}:u   hash   user -> units held in reserved or paid orders
    gate:{pid}:r   hash   reservation id -> "P|user|qty" (admitted, not yet in
                          Postgres) or "C|user|qty" (committed, still reserved)
    gate:{pid}:q   zset   pending reservation ids scored by admission time (ms)
    gate:t:{rid}   string tombstone "R" (released) / "X" (undone), with a TTL

Every script is keyed by the reservation id (the order id), so a rerun -- redis-py
resends a command after a timeout -- finds its own marker and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from redis.asyncio import Redis

META_KEY = "gate:meta"


def _keys(product_id: int, rid: str | None = None) -> list[str]:
    base = f"gate:{product_id}:"
    keys = [base + "p", base + "u", base + "r", base + "q"]
    if rid is not None:
        keys.append(f"gate:t:{rid}")
    return keys


# KEYS: p u r q t; ARGV: rid, user, qty, now_ms, reopen ("1": a retry of a
# reservation the reconciler undid may be admitted again)
_ADMIT = """
local stock = redis.call('HGET', KEYS[1], 'stock')
if not stock then return {-1, 0} end
stock = tonumber(stock)
local rid, user, qty, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('HEXISTS', KEYS[3], rid) == 1 then return {2, stock} end
local tomb = redis.call('GET', KEYS[5])
if tomb and not (tomb == 'X' and ARGV[5] == '1') then return {-2, stock} end
if stock < qty then return {0, stock} end
local cap = tonumber(redis.call('HGET', KEYS[1], 'cap') or '-1')
if cap >= 0 then
    local from = tonumber(redis.call('HGET', KEYS[1], 'from') or '0')
    local till = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
    if now >= from and now < till then
        local held = tonumber(redis.call('HGET', KEYS[2], user) or '0')
        if held + qty > cap then return {3, stock} end
    end
end
redis.call('HINCRBY', KEYS[1], 'stock', -qty)
redis.call('HINCRBY', KEYS[2], user, qty)
redis.call('HSET', KEYS[3], rid, 'P|' .. user .. '|' .. qty)
redis.call('ZADD', KEYS[4], now, rid)
if tomb then redis.call('DEL', KEYS[5]) end
return {1, stock - qty}
"""

# KEYS: p u r q t; ARGV: rid, user, qty
_COMMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local rid, user, qty = ARGV[1], ARGV[2], tonumber(ARGV[3])
local marker = redis.call('HGET', KEYS[3], rid)
if marker then
    if string.sub(marker, 1, 1) == 'P' then
        redis.call('HSET', KEYS[3], rid, 'C' .. string.sub(marker, 2))
        redis.call('ZREM', KEYS[4], rid)
        return 1
    end
    return 0
end
if redis.call('GET', KEYS[5]) == 'R' then return 0 end
-- Committed in Postgres but unknown here (undone as dead, or lost): adopt it.
redis.call('DEL', KEYS[5])
redis.call('HINCRBY', KEYS[1], 'stock', -qty)
redis.call('HINCRBY', KEYS[2], user, qty)
redis.call('HSET', KEYS[3], rid, 'C|' .. user .. '|' .. qty)
return 2
"""

# KEYS: p u r q t; ARGV: rid, tombstone ttl, allowed states ("P" or "PC"), tombstone
_GIVE_BACK = """
local rid, ttl, allowed, mark = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local marker = redis.call('HGET', KEYS[3], rid)
if not marker then
    redis.call('SET', KEYS[5], mark, 'EX', ttl, 'NX')
    return 0
end
if not string.find(allowed, string.sub(marker, 1, 1), 1, true) then return 0 end
local _, _, user, qty = string.find(marker, '^.|(.*)|(%d+)$')
qty = tonumber(qty)
if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('HINCRBY', KEYS[1], 'stock', qty)
end
if redis.call('HINCRBY', KEYS[2], user, -qty) <= 0 then redis.call('HDEL', KEYS[2], user) end
redis.call('HDEL', KEYS[3], rid)
redis.call('ZREM', KEYS[4], rid)
redis.call('SET', KEYS[5], mark, 'EX', ttl)
return 1
"""

# KEYS: r; ARGV: rid -- a paid order will never be released: drop its marker.
_FORGET = """
local marker = redis.call('HGET', KEYS[1], ARGV[1])
if marker and string.sub(marker, 1, 1) == 'C' then
    redis.call('HDEL', KEYS[1], ARGV[1])
    return 1
end
return 0
"""

# KEYS: p u r q; ARGV: mode, stock, cap, from, until, now_ms, grace_ms,
#   n_orders, (rid, user, qty) * n_orders, n_users, (user, units) * n_users,
#   n_known, rid * n_known (pending ids Postgres already knows)
_INSTALL = """
local mode = ARGV[1]
if mode == 'absent' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local stock = tonumber(ARGV[2])
local now, grace = tonumber(ARGV[6]), tonumber(ARGV[7])
local i = 8
local n_orders = tonumber(ARGV[i]); i = i + 1
local orders_at = i
i = i + 3 * n_orders
local n_users = tonumber(ARGV[i]); i = i + 1
local users_at = i
i = i + 2 * n_users
local n_known = tonumber(ARGV[i]); i = i + 1
local known = {}
for k = 0, n_known - 1 do known[ARGV[i + k]] = true end
for k = 0, n_orders - 1 do known[ARGV[orders_at + 3 * k]] = true end
-- Admissions still in flight (not in Postgres yet, younger than the grace) survive.
local inflight = {}
local pend = redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES')
for k = 1, #pend, 2 do
    local rid, at = pend[k], tonumber(pend[k + 1])
    if not known[rid] and now - at < grace then
        local marker = redis.call('HGET', KEYS[3], rid)
        if marker then
            local _, _, user, qty = string.find(marker, '^.|(.*)|(%d+)$')
            table.insert(inflight, {rid, user, tonumber(qty), at})
            stock = stock - tonumber(qty)
        end
    end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[1], 'stock', stock, 'cap', ARGV[3], 'from', ARGV[4], 'until', ARGV[5])
for k = 0, n_orders - 1 do
    local at = orders_at + 3 * k
    redis.call('HSET', KEYS[3], ARGV[at], 'C|' .. ARGV[at + 1] .. '|' .. ARGV[at + 2])
end
for k = 0, n_users - 1 do
    local at = users_at + 2 * k
    redis.call('HSET', KEYS[2], ARGV[at], ARGV[at + 1])
end
for _, f in ipairs(inflight) do
    redis.call('HSET', KEYS[3], f[1], 'P|' .. f[2] .. '|' .. f[3])
    redis.call('ZADD', KEYS[4], f[4], f[1])
    redis.call('HINCRBY', KEYS[2], f[2], f[3])
end
return 1
"""

# KEYS: p; ARGV: delta
_ADJUST = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
return redis.call('HINCRBY', KEYS[1], 'stock', tonumber(ARGV[1]))
"""


class Admission(IntEnum):
    """What the admit script decided."""

    NOT_LOADED = -1  # the product has no gate entry (new, or Redis lost it)
    CLOSED = -2  # this reservation id was already undone or released
    SOLD_OUT = 0
    ADMITTED = 1
    ALREADY_ADMITTED = 2  # a rerun: the first run admitted it
    LIMIT = 3


@dataclass(frozen=True)
class AdmitResult:
    decision: Admission
    stock: int  # gate stock after the decision


@dataclass(frozen=True)
class Marker:
    rid: str
    pending: bool
    user_id: str
    quantity: int


@dataclass(frozen=True)
class GateView:
    """One product's gate, read atomically."""

    stock: int | None  # None: the product is not loaded
    markers: dict[str, Marker]
    pending_since_ms: dict[str, int]


@dataclass(frozen=True)
class GateSource:
    """What Postgres says one product's gate must hold."""

    product_id: int
    stock: int
    cap: int | None
    sale_from_ms: int
    sale_until_ms: int
    reserved: Sequence[tuple[str, str, int]]  # (order id, user id, quantity)
    user_units: Sequence[tuple[str, int]]
    known_pending: Sequence[str] = ()


def now_ms() -> int:
    """Wall-clock milliseconds (the sale window is wall-clock time)."""
    return time.time_ns() // 1_000_000


class InventoryGate:
    """The Lua scripts, one method each; every call is one Redis round trip."""

    def __init__(self, redis: Redis, *, tombstone_ttl_s: int) -> None:
        self.redis = redis
        self.tombstone_ttl_s = tombstone_ttl_s
        self._admit = redis.register_script(_ADMIT)
        self._commit = redis.register_script(_COMMIT)
        self._give_back = redis.register_script(_GIVE_BACK)
        self._forget = redis.register_script(_FORGET)
        self._install = redis.register_script(_INSTALL)
        self._adjust = redis.register_script(_ADJUST)

    async def admit(
        self,
        *,
        product_id: int,
        rid: str,
        user_id: str,
        quantity: int,
        at_ms: int,
        reopen: bool = False,
    ) -> AdmitResult:
        """Check stock and the per-user limit and take the units, once per reservation id."""
        code, stock = await self._admit(
            keys=_keys(product_id, rid),
            args=[rid, user_id, quantity, at_ms, "1" if reopen else "0"],
        )
        return AdmitResult(Admission(int(code)), int(stock))

    async def commit(self, *, product_id: int, rid: str, user_id: str, quantity: int) -> int:
        """Postgres committed the reservation: pending -> committed (adopts unknown ids)."""
        return int(await self._commit(keys=_keys(product_id, rid), args=[rid, user_id, quantity]))

    async def undo(self, *, product_id: int, rid: str) -> bool:
        """Postgres refused (or never got) an admitted reservation: give its units back."""
        result = await self._give_back(
            keys=_keys(product_id, rid), args=[rid, self.tombstone_ttl_s, "P", "X"]
        )
        return bool(result)

    async def release(self, *, product_id: int, rid: str) -> bool:
        """A reservation was cancelled or expired in Postgres: give its units back once."""
        result = await self._give_back(
            keys=_keys(product_id, rid), args=[rid, self.tombstone_ttl_s, "PC", "R"]
        )
        return bool(result)

    async def release_many(self, items: Iterable[tuple[int, str]]) -> None:
        """release() for many (product id, reservation id) pairs in one pipeline."""
        async with self.redis.pipeline(transaction=False) as pipe:
            count = 0
            for product_id, rid in items:
                await self._give_back(
                    keys=_keys(product_id, rid),
                    args=[rid, self.tombstone_ttl_s, "PC", "R"],
                    client=pipe,
                )
                count += 1
            if count:
                await pipe.execute()

    async def forget(self, *, product_id: int, rid: str) -> bool:
        """Drop the marker of a paid order (it can never be released)."""
        return bool(await self._forget(keys=[_keys(product_id)[2]], args=[rid]))

    async def forget_many(self, items: Iterable[tuple[int, str]]) -> None:
        """forget() for many (product id, reservation id) pairs in one pipeline."""
        async with self.redis.pipeline(transaction=False) as pipe:
            count = 0
            for product_id, rid in items:
                await self._forget(keys=[_keys(product_id)[2]], args=[rid], client=pipe)
                count += 1
            if count:
                await pipe.execute()

    async def adjust(self, *, product_id: int, delta: int) -> int | None:
        """Shift the gate stock by `delta` (the reconciler's repair of drift)."""
        result = await self._adjust(keys=[_keys(product_id)[0]], args=[delta])
        return None if result is None else int(result)

    async def install(
        self, source: GateSource, *, replace: bool, grace_ms: int, client: Any = None
    ) -> bool:
        """Write a product's gate from Postgres; keeps admissions still in flight.

        With replace=False it only writes a product that has no gate entry yet.
        """
        args: list[Any] = [
            "replace" if replace else "absent",
            source.stock,
            -1 if source.cap is None else source.cap,
            source.sale_from_ms,
            source.sale_until_ms,
            now_ms(),
            grace_ms,
            len(source.reserved),
        ]
        for rid, user_id, quantity in source.reserved:
            args += [rid, user_id, quantity]
        args.append(len(source.user_units))
        for user_id, units in source.user_units:
            args += [user_id, units]
        args.append(len(source.known_pending))
        args += list(source.known_pending)
        result = await self._install(keys=_keys(source.product_id), args=args, client=client)
        return client is not None or bool(result)

    async def view(self, product_id: int) -> GateView:
        """Stock, markers and pending ages of one product, read in one MULTI."""
        return (await self.views([product_id]))[product_id]

    async def views(self, product_ids: list[int]) -> dict[int, GateView]:
        """`view` of several products, all read in one MULTI (one round trip)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for product_id in product_ids:
                p, _, r, q = _keys(product_id)
                pipe.hget(p, "stock")
                pipe.hgetall(r)
                pipe.zrange(q, 0, -1, withscores=True)
            replies = await pipe.execute()
        found: dict[int, GateView] = {}
        for i, product_id in enumerate(product_ids):
            stock, raw_markers, pending = replies[3 * i : 3 * i + 3]
            markers: dict[str, Marker] = {}
            for raw_rid, raw in raw_markers.items():
                rid = _text(raw_rid)
                state, user_id, quantity = _text(raw).split("|")
                markers[rid] = Marker(rid, state == "P", user_id, int(quantity))
            found[product_id] = GateView(
                stock=None if stock is None else int(stock),
                markers=markers,
                pending_since_ms={_text(rid): int(score) for rid, score in pending},
            )
        return found

    async def loaded_stock(self, product_id: int) -> int | None:
        """The gate stock of a product, or None when it is not loaded."""
        raw = await self.redis.hget(_keys(product_id)[0], "stock")
        return None if raw is None else int(raw)

    async def server_run_id(self) -> str:
        """The Redis server's run id: it changes on every Redis restart."""
        info = await self.redis.info("server")
        return str(info["run_id"])

    async def installed_run_id(self) -> str | None:
        """The Redis run id the gate was last fully rebuilt under (None: never)."""
        raw = await self.redis.hget(META_KEY, "run_id")
        return None if raw is None else _text(raw)

    async def mark_rebuilt(self, run_id: str) -> None:
        await self.redis.hset(META_KEY, mapping={"run_id": run_id, "rebuilt_at_ms": now_ms()})

    async def drop_all(self) -> None:
        """Delete every gate key (a full rebuild starts from nothing)."""
        batch: list[Any] = []
        async for key in self.redis.scan_iter(match="gate:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await self.redis.unlink(*batch)
                batch = []
        if batch:
            await self.redis.unlink(*batch)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
