"""Token buckets in Redis, shared by every gateway worker.

One Lua script refills and takes atomically; the bucket's state is a hash
with a TTL, so idle keys disappear. Time comes from Redis (TIME), so workers
with skewed clocks agree.

The script runs by its SHA (EVALSHA, loaded again after a NOSCRIPT), and the
calls made in one turn of the event loop travel together in one pipeline: each
script still runs atomically and in arrival order, and every caller gets its
own answer or error, but the client's per-command work (pool checkout, retry
wrapper, release) is paid once per batch instead of once per request.

A caller waits for its answer at most `timeout_s` (the Redis budget of a request,
SHOPSTACK_REDIS_TIMEOUT_S) and then gets a redis TimeoutError, however slow Redis or
a new connection's handshake is; the command itself still goes out with its batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

# KEYS: buckets, in order. ARGV: per bucket rate, burst, cost, consume (1/0).
# Buckets are taken in order and the first that cannot pay stops the run (the ones
# before it keep what they paid, as separate calls would). Returns {refused, wait}:
# refused is the 1-based index of that bucket, 0 when every bucket paid.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i, key in ipairs(KEYS) do
    local at = (i - 1) * 4
    local rate = tonumber(ARGV[at + 1])
    local burst = tonumber(ARGV[at + 2])
    local cost = tonumber(ARGV[at + 3])
    local consume = ARGV[at + 4] == '1'
    local state = redis.call('HMGET', key, 'tokens', 'ts')
    local tokens = tonumber(state[1])
    local ts = tonumber(state[2])
    if tokens == nil then
        tokens = burst
        ts = now
    end
    tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
    local allowed = tokens >= cost
    if allowed and consume then
        tokens = tokens - cost
    end
    if consume then
        redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
        redis.call('EXPIRE', key, math.ceil(burst / rate) + 1)
    end
    if not allowed then
        return {i, tostring((cost - tokens) / rate)}
    end
end
return {0, '0'}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: int


@dataclass(frozen=True)
class Bucket:
    rate_per_s: float
    burst: int


# Redis names a script by the SHA-1 of its text (an identifier, not a security measure).
_TAKE_SHA = hashlib.sha1(_TAKE.encode(), usedforsecurity=False).hexdigest()
MAX_BATCH = 256  # commands per pipeline; more arrivals in one turn go as several at once


class RateLimiter:
    def __init__(
        self, redis: Redis, *, prefix: str = "ratelimit", timeout_s: float | None = None
    ) -> None:
        self._redis = redis
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

    async def take(
        self, key: str, bucket: Bucket, cost: int = 1, *, timeout_s: float | None = None
    ) -> Decision:
        """Take `cost` tokens if there are enough; RedisError propagates (callers fail closed).

        `timeout_s` overrides the limiter's wait for the answer (a request's budget left).
        """
        return await self._run([(key, bucket, True)], cost, timeout_s)

    async def take_each(self, *buckets: tuple[str, Bucket]) -> Decision:
        """`take` one token from each bucket in order, in one round trip.

        The first bucket that cannot pay refuses the whole request; the buckets
        before it keep what they paid, as the same `take` calls in a row would.
        """
        return await self._run([(key, bucket, True) for key, bucket in buckets], 1)

    async def take_then_peek(self, take: tuple[str, Bucket], peek: tuple[str, Bucket]) -> Decision:
        """`take` a token from one bucket, then `peek` another, in one round trip.

        As `take` then `peek` would: a refusal by the first leaves the second unasked.
        """
        return await self._run([(*take, True), (*peek, False)], 1)

    async def peek(self, key: str, bucket: Bucket, cost: int = 1) -> Decision:
        """Would `take` succeed? Takes nothing."""
        return await self._run([(key, bucket, False)], cost)

    async def _run(
        self, buckets: list[tuple[str, Bucket, bool]], cost: int, timeout_s: float | None = None
    ) -> Decision:
        command: list[Any] = ["EVALSHA", _TAKE_SHA, len(buckets)]
        command += [f"{self.prefix}:{key}" for key, _, _ in buckets]
        for _, bucket, consume in buckets:
            command += [bucket.rate_per_s, bucket.burst, cost, "1" if consume else "0"]
        refused, wait = await self._call(
            tuple(command), self.timeout_s if timeout_s is None else timeout_s
        )
        return Decision(int(refused) == 0, max(1, math.ceil(float(wait))))

    async def _call(self, command: tuple[Any, ...], timeout_s: float | None) -> Any:
        """Queue one EVALSHA for the batch of this loop turn and wait for its own reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((command, future))
        if len(self._queue) == 1:
            task = loop.create_task(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        try:
            async with asyncio.timeout(timeout_s):
                return await future  # on timeout the batch skips this (cancelled) future
        except TimeoutError:
            raise RedisTimeoutError(f"no answer from Redis within {timeout_s} s") from None

    async def _flush(self) -> None:
        batch, self._queue = self._queue, []
        if len(batch) <= MAX_BATCH:
            await self._flush_part(batch)
            return
        parts = [batch[i : i + MAX_BATCH] for i in range(0, len(batch), MAX_BATCH)]
        await asyncio.gather(*(self._flush_part(part) for part in parts))

    async def _flush_part(self, part: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._send([command for command, _ in part])
        except BaseException as exc:
            # Every waiter gets the error its own call would have raised (a
            # cancelled batch, at shutdown, reads as Redis being unavailable).
            error = exc if isinstance(exc, Exception) else RedisError("batch cancelled")
            for _, future in part:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(part, replies, strict=True):
            if future.done():  # its caller went away
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Replies (or the error of each command) in order; NOSCRIPT loads and resends."""
        replies = await self._send_once(commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # The server lost its scripts (restart, SCRIPT FLUSH, failover): a NOSCRIPT
            # reply means the script did not run, so resending charges nothing twice.
            await self._redis.script_load(_TAKE)
            again = await self._send_once([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _send_once(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if len(commands) == 1:
            try:
                reply = await self._redis.execute_command(*commands[0])  # type: ignore[no-untyped-call]
                return [reply]
            except NoScriptError as exc:
                return [exc]
        pipe = self._redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))
