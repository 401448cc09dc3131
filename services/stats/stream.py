"""The Redis side of ingestion: admission, reading, acking, dead letters, trimming.

Each accepted batch is one entry of one stream (see services.stats.events), read
by one consumer group. A counter beside the stream holds the number of events
accepted and not yet acknowledged: the backlog. The scripts below make the steps
that must not be split atomic:
- ADMIT: refuse the whole batch when the backlog would pass its budget, else append
  it and grow the backlog. Batches arriving together share one run (one round trip),
  each judged as if alone. Nothing is ever trimmed unread.
- ACK_AND_COUNT: for each entry this consumer still owns, XACK it, shrink the
  backlog and add the events it inserted to the aggregates, in one step; an entry
  claimed meanwhile by another consumer is left to that one. So an event is counted
  exactly when its entry is acked, and never twice.
- MAINTAIN: trim history below the oldest entry any group still needs, report
  backlog figures (resetting the counter when nothing is unacknowledged), and
  forget idle consumers that own nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from services.stats.events import COUNT_FIELD, PAYLOAD_FIELD
from services.stats.settings import StatsSettings

# KEYS: stream, backlog counter, lag. ARGV: budget (events), lag budget (ms, 0: none),
# then per batch: its event count and its payload. Returns per batch, judged in order as
# if each came alone: the backlog after it, -1 over the event budget, -2 over the lag.
_ADMIT = """
local budget, max_lag = tonumber(ARGV[1]), tonumber(ARGV[2])
local backlog = tonumber(redis.call('GET', KEYS[2]) or '0')
local lagging = max_lag > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') > max_lag
local results, added = {}, 0
for i = 3, #ARGV, 2 do
    local n = tonumber(ARGV[i])
    if backlog + n > budget then
        results[#results + 1] = -1
    elseif lagging then
        results[#results + 1] = -2
    else
        redis.call('XADD', KEYS[1], '*', 'n', ARGV[i], 'e', ARGV[i + 1])
        backlog = backlog + n
        added = added + n
        results[#results + 1] = backlog
    end
end
if added > 0 then redis.call('INCRBY', KEYS[2], added) end
return results
"""

# KEYS: stream, backlog counter. ARGV: group, consumer, prefix, fine_keep_s, coarse_keep_s,
# now (unix s), then per entry: id, its event count, and either its ops, one line
# "metric|pid|second|minute|user" per event to count (second or minute empty when that
# tier can no longer use the event), or "*": count every event of the entry, read from
# the stream itself (the common case; its lines are "1|id|metric|pid|ts_us|user").
_ACK_AND_COUNT = """
local stream = KEYS[1]
local group, consumer, prefix = ARGV[1], ARGV[2], ARGV[3]
local fine_keep, coarse_keep, now = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local find, sub, floor = string.find, string.sub, math.floor
local fine, coarse, ids = {}, {}, {}
local done, counted, foreign, too_old = 0, 0, 0, 0

-- Counts are gathered per bucket first (tier[bucket].c[metric][pid] = n, .u[pid] = users),
-- so each key's name is built once per call, not once per event.
local function add(tier, bucket, metric, pid, user)
    local t = tier[bucket]
    if not t then t = {c = {}, u = {}}; tier[bucket] = t end
    local c = t.c[metric]
    if not c then c = {}; t.c[metric] = c end
    c[pid] = (c[pid] or 0) + 1
    local u = t.u[pid]
    if not u then u = {}; t.u[pid] = u end
    u[#u + 1] = user
end

-- Op lines "metric|pid|second|minute|user", one per event to count.
local function count_ops(text)
    local pos, n = 1, #text
    while pos <= n do
        local a = find(text, '|', pos, true)
        local b = find(text, '|', a + 1, true)
        local c = find(text, '|', b + 1, true)
        local d = find(text, '|', c + 1, true)
        local stop = find(text, '\\n', d + 1, true) or (n + 1)
        local metric, pid = sub(text, pos, a - 1), sub(text, a + 1, b - 1)
        local sec, minute = sub(text, b + 1, c - 1), sub(text, c + 1, d - 1)
        local user = sub(text, d + 1, stop - 1)
        if sec ~= '' then add(fine, tonumber(sec), metric, pid, user) end
        if minute ~= '' then add(coarse, tonumber(minute), metric, pid, user) end
        counted = counted + 1
        pos = stop + 1
    end
end

-- An entry's own lines "1|id|metric|pid|ts_us|user": every event counts, in the buckets
-- services.stats.buckets.Tiers picks (none when it is too old for every window).
local function count_all(text)
    local pos, n = 1, #text
    while pos <= n do
        local a = find(text, '|', pos, true)
        local b = find(text, '|', a + 1, true)
        local c = find(text, '|', b + 1, true)
        local d = find(text, '|', c + 1, true)
        local e = find(text, '|', d + 1, true)
        local stop = find(text, '\\n', e + 1, true) or (n + 1)
        local metric, pid = sub(text, b + 1, c - 1), sub(text, c + 1, d - 1)
        local ts = tonumber(sub(text, d + 1, e - 1))
        local user = sub(text, e + 1, stop - 1)
        local sec, minute = floor(ts / 1000000), floor(ts / 60000000)
        local is_fine, is_coarse = sec + fine_keep > now, (minute + 1) * 60 + coarse_keep > now
        if is_fine then add(fine, sec, metric, pid, user) end
        if is_coarse then add(coarse, minute, metric, pid, user) end
        if is_fine or is_coarse then counted = counted + 1 else too_old = too_old + 1 end
        pos = stop + 1
    end
end

for i = 7, #ARGV, 3 do
    local id, size, ops = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
    local p = redis.call('XPENDING', stream, group, id, id, 1)[1]
    if p and p[2] == consumer then
        ids[#ids + 1] = id
        done = done + size
        if ops == '*' then
            local fields = redis.call('XRANGE', stream, id, id)[1][2]
            for j = 1, #fields, 2 do
                if fields[j] == 'e' then count_all(fields[j + 1]) end
            end
        else
            count_ops(ops)
        end
    elseif p then
        foreign = foreign + 1
    end
end

for first = 1, #ids, 500 do
    redis.call('XACK', stream, group, unpack(ids, first, math.min(first + 499, #ids)))
end
if done > 0 and redis.call('DECRBY', KEYS[2], done) < 0 then
    redis.call('SET', KEYS[2], 0)
end

local function flush(tier, code, ucode, expire_at)
    for bucket, t in pairs(tier) do
        local b = string.format('%d', bucket)
        local at = expire_at(bucket)
        for metric, c in pairs(t.c) do
            local zkey = prefix .. ':' .. code .. ':' .. b .. ':' .. metric
            for pid, n in pairs(c) do
                redis.call('ZINCRBY', zkey, n, pid)
            end
            redis.call('EXPIREAT', zkey, at)
        end
        for pid, u in pairs(t.u) do
            local hkey = prefix .. ':' .. ucode .. ':' .. b .. ':' .. pid
            for first = 1, #u, 500 do
                redis.call('PFADD', hkey, unpack(u, first, math.min(first + 499, #u)))
            end
            redis.call('EXPIREAT', hkey, at)
        end
    end
end
flush(fine, 'f', 'fu', function(s) return s + fine_keep + 1 end)
flush(coarse, 'm', 'mu', function(m) return (m + 1) * 60 + coarse_keep end)
return {#ids, counted, foreign, too_old}
"""

# KEYS: stream, dead-letter stream, backlog counter, lag.
# ARGV: this consumer (never reaped), reap idle ms (0: off), lag key lifetime ms.
_MAINTAIN = """
local stream = KEYS[1]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('XLEN', KEYS[2])
if redis.call('EXISTS', stream) == 0 then
    return {0, 0, 0, -1, now_ms, dead, 0, 0, tonumber(redis.call('GET', KEYS[3]) or '0')}
end

local function parse(id)
    local dash = string.find(id, '-', 1, true)
    return {tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))}
end
local function less(a, b)
    return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end

local xlen = redis.call('XLEN', stream)
local groups = redis.call('XINFO', 'GROUPS', stream)
local safe, oldest = nil, nil
local pending, undelivered, reaped = 0, 0, 0
for _, g in ipairs(groups) do
    local info = {}
    for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
    local last = parse(info['last-delivered-id'])
    local candidate = {last[1], last[2] + 1}
    local after = redis.call('XRANGE', stream, '(' .. info['last-delivered-id'], '+', 'COUNT', 1)
    if after[1] then
        local first = parse(after[1][1])
        if oldest == nil or less(first, oldest) then oldest = first end
    end
    if type(info['lag']) == 'number' then undelivered = undelivered + info['lag'] end
    if info['pending'] > 0 then
        pending = pending + info['pending']
        local summary = redis.call('XPENDING', stream, info['name'])
        local pmin = parse(summary[2])
        if less(pmin, candidate) then candidate = pmin end
        if oldest == nil or less(pmin, oldest) then oldest = pmin end
    end
    if safe == nil or less(candidate, safe) then safe = candidate end
    if tonumber(ARGV[2]) > 0 then
        local consumers = redis.call('XINFO', 'CONSUMERS', stream, info['name'])
        for _, c in ipairs(consumers) do
            local ci = {}
            for j = 1, #c, 2 do ci[c[j]] = c[j + 1] end
            if ci['pending'] == 0 and ci['idle'] > tonumber(ARGV[2]) and ci['name'] ~= ARGV[1] then
                redis.call('XGROUP', 'DELCONSUMER', stream, info['name'], ci['name'])
                reaped = reaped + 1
            end
        end
    end
end
local trimmed = 0
if safe ~= nil then
    trimmed = redis.call('XTRIM', stream, 'MINID', '~',
        string.format('%d-%d', safe[1], safe[2]), 'LIMIT', 0)
end
local oldest_ms = -1
if oldest ~= nil then oldest_ms = oldest[1] end
-- What admission compares with its lag budget; it expires if no writer maintains it.
redis.call('SET', KEYS[4], oldest ~= nil and math.max(0, now_ms - oldest_ms) or 0,
    'PX', ARGV[3])
-- Nothing unacknowledged in any group: the backlog is exactly zero (heals any drift).
if #groups > 0 and oldest == nil then redis.call('SET', KEYS[3], 0) end
local backlog = tonumber(redis.call('GET', KEYS[3]) or '0')
return {redis.call('XLEN', stream), pending, undelivered, oldest_ms, now_ms, dead, trimmed, reaped,
        backlog}
"""

# KEYS: stream. ARGV: group, consumer. Deletes the consumer only if it owns nothing.
_LEAVE = """
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local ci = {}
    for j = 1, #c, 2 do ci[c[j]] = c[j + 1] end
    if ci['name'] == ARGV[2] then
        if ci['pending'] == 0 then
            redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
            return 1
        end
        return 0
    end
end
return 1
"""


_ADMIT_GROUP_MAX = 32  # batches appended in one round trip, at most
_ADMIT_CHARS_MAX = 2_000_000  # ...and their payloads' size


class Refusal(StrEnum):
    BACKLOG = "the event backlog is over its budget"
    LAG = "the writers are too far behind"


@dataclass(frozen=True)
class Entry:
    """One stream entry as read: its id, payload, event count, and if it came before."""

    id: str
    payload: bytes | None
    size: int
    redelivered: bool

    @property
    def received_ms(self) -> int:
        return int(self.id.split("-", 1)[0])


@dataclass(frozen=True)
class Backlog:
    length: int
    pending: int
    undelivered: int
    oldest_unacked_ms: int | None
    now_ms: int
    dead_letters: int
    trimmed: int
    reaped: int
    events: int

    @property
    def lag_s(self) -> float:
        """Age of the oldest entry not yet acknowledged (0 when none)."""
        if self.oldest_unacked_ms is None:
            return 0.0
        return max(0.0, (self.now_ms - self.oldest_unacked_ms) / 1000)


@dataclass(frozen=True)
class AckResult:
    acked: int
    counted: int
    foreign: int
    too_old: int  # events of "*" entries too old for any window (stored, not counted)


ALL_EVENTS = "*"  # ack_and_count: count every event of the entry (no ops sent)


@dataclass(frozen=True)
class DeadLetter:
    """What the dead-letter stream keeps of a failed event (or of a corrupt entry)."""

    entry_id: str
    payload: bytes | str
    error: str
    deliveries: int


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _size(raw: bytes | None) -> int:
    try:
        return max(0, int(raw or b"0"))
    except ValueError:
        return 0


def _entries(raw: Any, redelivered: bool) -> list[Entry]:
    """Entries from an XREADGROUP / XAUTOCLAIM reply: (id, {field: value}) pairs."""
    found = []
    for entry_id, fields in raw:
        values = fields or {}
        found.append(
            Entry(
                _text(entry_id),
                values.get(PAYLOAD_FIELD),
                _size(values.get(COUNT_FIELD)),
                redelivered,
            )
        )
    return found


class EventStream:
    """The event stream, its backlog counter and its consumer group, named by the settings."""

    def __init__(self, redis: Redis, settings: StatsSettings) -> None:
        self.redis = redis
        self.stream = settings.stats_stream
        self.backlog = settings.stats_stream + ":backlog"
        self.lag = settings.stats_stream + ":lag-ms"
        self.max_lag_ms = int(settings.stats_max_lag_s * 1000)
        self.lag_ttl_ms = int(max(5.0, 5 * settings.stats_maintenance_interval_s) * 1000)
        self.group = settings.stats_group
        self.dead_letters = settings.stats_dead_letter_stream
        self.dead_letter_max = settings.stats_dead_letter_max
        self.max_backlog = settings.stats_max_backlog
        self._admit = redis.register_script(_ADMIT)
        self._waiting: deque[tuple[str, int, asyncio.Future[int]]] = deque()
        self._appender: asyncio.Task[None] | None = None
        self._ack_and_count = redis.register_script(_ACK_AND_COUNT)
        self._maintain = redis.register_script(_MAINTAIN)
        self._leave = redis.register_script(_LEAVE)

    async def admit(self, payload: str, count: int) -> Refusal | None:
        """Append one accepted batch, or say why not (the backlog is over a budget).

        Batches that arrive while an append is on its way wait for it, then go together
        in the next one: one round trip (and one script run) for all of them, each
        judged as if it came alone. Under no load a batch goes at once, alone.
        """
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append((payload, count, future))
        if self._appender is None:
            self._appender = asyncio.create_task(self._append_waiting())
        result = await future
        if result >= 0:
            return None
        return Refusal.BACKLOG if result == -1 else Refusal.LAG

    async def _append_waiting(self) -> None:
        """Send the waiting batches, a bounded group per round trip, until none wait."""
        try:
            while self._waiting:
                group: list[tuple[str, int, asyncio.Future[int]]] = []
                chars = 0
                while self._waiting and len(group) < _ADMIT_GROUP_MAX and chars < _ADMIT_CHARS_MAX:
                    payload, count, future = self._waiting.popleft()
                    if not future.done():  # its request was cancelled: append nothing of it
                        group.append((payload, count, future))
                        chars += len(payload)
                if group:
                    await self._append_group(group)
        finally:
            self._appender = None

    async def _append_group(self, group: list[tuple[str, int, asyncio.Future[int]]]) -> None:
        args: list[str | int] = [self.max_backlog, self.max_lag_ms]
        for payload, count, _ in group:
            args += [count, payload]
        try:
            results = await self._admit(keys=[self.stream, self.backlog, self.lag], args=args)
        except BaseException as exc:
            for _, _, future in group:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RedisError())
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(int(result))

    async def ensure_group(self) -> None:
        """Create the consumer group (from the stream's start, so nothing is skipped)."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, consumer: str, *, count: int, block_ms: int | None) -> list[Entry]:
        """New entries for this consumer (first deliveries)."""
        reply: Any = await self.redis.xreadgroup(
            self.group, consumer, {self.stream: ">"}, count=count, block=block_ms
        )
        if not reply:
            return []
        return _entries(reply[0][1], redelivered=False)

    async def claim(
        self, consumer: str, *, min_idle_ms: int, cursor: str, count: int
    ) -> tuple[str, list[Entry]]:
        """Take over entries idle longer than `min_idle_ms` (from any consumer, this one too)."""
        reply: Any = await self.redis.xautoclaim(
            self.stream, self.group, consumer, min_idle_ms, cursor, count=count
        )
        return _text(reply[0]), _entries(reply[1], redelivered=True)

    async def deliveries(self, entry_id: str) -> tuple[str | None, int]:
        """(owner, delivery count) of a pending entry; (None, 0) when it is not pending."""
        rows: Any = await self.redis.xpending_range(
            self.stream, self.group, min=entry_id, max=entry_id, count=1
        )
        if not rows:
            return None, 0
        return _text(rows[0]["consumer"]), int(rows[0]["times_delivered"])

    async def ack_and_count(
        self,
        consumer: str,
        *,
        prefix: str,
        fine_keep_s: int,
        coarse_keep_s: int,
        now_s: int,
        specs: list[str | int],
    ) -> AckResult:
        """Ack the entries this consumer owns and count their events (see _ACK_AND_COUNT)."""
        reply = await self._ack_and_count(
            keys=[self.stream, self.backlog],
            args=[self.group, consumer, prefix, fine_keep_s, coarse_keep_s, now_s, *specs],
        )
        return AckResult(int(reply[0]), int(reply[1]), int(reply[2]), int(reply[3]))

    async def dead_letter(self, letters: list[DeadLetter], *, consumer: str) -> None:
        """Append failed events (or corrupt entries) to the dead-letter stream (capped)."""
        failed_at = datetime.now(UTC).isoformat()
        async with self.redis.pipeline(transaction=True) as pipe:
            for letter in letters:
                fields: dict[str, bytes | str | int] = {
                    "entry_id": letter.entry_id,
                    "payload": letter.payload,
                    "error": letter.error[:1000],
                    "deliveries": letter.deliveries,
                    "consumer": consumer,
                    "failed_at": failed_at,
                }
                # Exact trimming: dead letters are rare, and the bound must hold.
                pipe.xadd(
                    self.dead_letters,
                    fields,  # type: ignore[arg-type]
                    maxlen=self.dead_letter_max,
                    approximate=False,
                )
            await pipe.execute()

    async def maintain(self, consumer: str, *, reap_idle_ms: int) -> Backlog:
        """Trim acknowledged history, forget idle empty consumers, report the backlog."""
        r = await self._maintain(
            keys=[self.stream, self.dead_letters, self.backlog, self.lag],
            args=[consumer, reap_idle_ms, self.lag_ttl_ms],
        )
        oldest = int(r[3])
        return Backlog(
            length=int(r[0]),
            pending=int(r[1]),
            undelivered=int(r[2]),
            oldest_unacked_ms=oldest if oldest >= 0 else None,
            now_ms=int(r[4]),
            dead_letters=int(r[5]),
            trimmed=int(r[6]),
            reaped=int(r[7]),
            events=int(r[8]),
        )

    async def leave(self, consumer: str) -> bool:
        """Delete this consumer from the group if it owns no entry; True when gone."""
        return bool(await self._leave(keys=[self.stream], args=[self.group, consumer]))
