"""Real `shopstack serve stats` processes: SIGTERM flush (SHD-3), SIGKILL recovery (SHD-4),
and memory under a sustained backlog."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from tests.stats.conftest import (
    JSON,
    Names,
    backlog,
    body,
    brute_force,
    event,
    pending_count,
    span,
    stored,
    wait_for,
)
from tests.stats.process import StatsProcess, start_stats

pytestmark = pytest.mark.slow


def make_events(count: int, pid_base: int, products: int = 10) -> list[dict[str, Any]]:
    types = ["view", "view", "cart", "purchase"]
    return [
        event(pid_base + i % products, type=types[i % 4], user_id=f"u{i % 997}")
        for i in range(count)
    ]


async def post_batches(url: str, batches: list[bytes], *, concurrency: int = 8) -> list[int]:
    """POST every batch (retrying politely on 503); return the final statuses."""
    statuses: list[int] = []
    queue = list(reversed(batches))
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def sender() -> None:
            while queue:
                raw = queue.pop()
                while True:
                    resp = await client.post("/api/v1/events", content=raw, headers=JSON)
                    if resp.status_code != 503:
                        statuses.append(resp.status_code)
                        break
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return statuses


@pytest.fixture
def stats_env(service_env: dict[str, str], names: Names) -> dict[str, str]:
    return {**service_env, **names.env(), "SHOPSTACK_STATS_MAINTENANCE_INTERVAL_S": "0.2"}


@pytest.fixture
def processes() -> Any:
    started: list[StatsProcess] = []
    yield started
    for proc in started:
        proc.ensure_stopped()


async def test_shd3_sigterm_flushes_what_is_buffered(
    stats_env: dict[str, str],
    processes: list[StatsProcess],
    tmp_path: Path,
    pg: asyncpg.Connection,
    rds: aioredis.Redis,
    names: Names,
    pid_base: int,
) -> None:
    """SHD-3: 10,000 accepted events (batch 500 / 1 s), SIGTERM: 10,000 rows, 0 dup, exit < 5 s."""
    env = {
        **stats_env,
        "SHOPSTACK_STATS_BATCH_SIZE": "500",
        "SHOPSTACK_STATS_FLUSH_INTERVAL_S": "1.0",
        # A slow database: the writer falls behind, so most events are still buffered
        # (accepted, in the stream or held by the writer) when SIGTERM comes.
        "SHOPSTACK_STATS_FAULT_WRITE_DELAY_S": "0.2",
    }
    proc = start_stats(env, tmp_path / "stats.log")
    processes.append(proc)
    events = make_events(10_000, pid_base)
    ids = [e["event_id"] for e in events]
    statuses = await post_batches(
        proc.url, [body(events[i : i + 100]) for i in range(0, 10_000, 100)]
    )
    assert statuses == [202] * 100
    before = await stored(pg, ids)
    assert before < 10_000
    seconds = proc.terminate()
    after = await stored(pg, ids)
    print(f"SHD-3: stored {before} before SIGTERM, {after} after; exit took {seconds:.2f} s")
    assert proc.process.returncode == 0
    assert seconds < 5
    assert after == 10_000
    dup = await pg.fetchval(
        "SELECT count(*) - count(DISTINCT event_id) FROM stats_events "
        "WHERE event_id = ANY($1::uuid[])",
        ids,
    )
    assert dup == 0
    assert await pending_count(rds, names) == 0
    assert await backlog(rds, names) == 0
    assert await rds.xinfo_consumers(names.stream, names.group) == []  # it left the group


async def test_shd4_sigkill_mid_batch_loses_nothing_and_counts_once(
    stats_env: dict[str, str],
    processes: list[StatsProcess],
    tmp_path: Path,
    pg: asyncpg.Connection,
    rds: aioredis.Redis,
    names: Names,
    pid_base: int,
) -> None:
    """SHD-4: 100,000 events, SIGKILL the writer mid-batch, restart (min-idle 1 s):
    100,000 distinct rows, the dead consumers' entries reclaimed < 2 s after restart."""
    env = {
        **stats_env,
        "SHOPSTACK_STATS_BATCH_SIZE": "500",
        "SHOPSTACK_STATS_FLUSH_INTERVAL_S": "0.2",
        "SHOPSTACK_STATS_CLAIM_MIN_IDLE_S": "1",
        "SHOPSTACK_STATS_MAX_LAG_S": "0",
    }
    # The first process writes slowly, so the kill surely lands with batches in flight.
    first = start_stats({**env, "SHOPSTACK_STATS_FAULT_WRITE_DELAY_S": "0.15"}, tmp_path / "a.log")
    processes.append(first)
    events = make_events(100_000, pid_base)
    ids = [e["event_id"] for e in events]
    batches = [body(events[i : i + 1000]) for i in range(0, 100_000, 1000)]
    started = time.monotonic()
    statuses = await post_batches(first.url, batches)
    print(f"SHD-4: posted 100,000 in {time.monotonic() - started:.1f} s")
    assert statuses == [202] * 100
    assert await stored(pg, ids) < 100_000  # still writing
    await wait_for(lambda: _positive(pending_count(rds, names)), timeout_s=5, interval_s=0.01)
    first.kill()
    dead = {c["name"].decode() for c in await rds.xinfo_consumers(names.stream, names.group)}
    pending_at_kill = await pending_count(rds, names)
    rows_at_kill = await stored(pg, ids)
    print(f"SHD-4: killed with {pending_at_kill} entries pending, {rows_at_kill} rows stored")
    assert pending_at_kill > 0  # entries were delivered to the dead writer and not acked

    spawned = time.monotonic()
    second = start_stats(env, tmp_path / "b.log")
    processes.append(second)
    ready = time.monotonic()

    async def dead_entries_reclaimed() -> bool:
        summary = await rds.xpending(names.stream, names.group)
        return not any(c["name"].decode() in dead for c in summary["consumers"])

    reclaim_s = await wait_for(dead_entries_reclaimed, timeout_s=10, interval_s=0.02)

    async def everything_stored() -> bool:
        return await backlog(rds, names) == 0 and await stored(pg, ids) == 100_000

    done_s = await wait_for(everything_stored, timeout_s=60, interval_s=0.1)
    print(
        f"SHD-4: restart took {ready - spawned:.2f} s; dead consumers' entries reclaimed "
        f"{reclaim_s:.2f} s after ready; all stored {done_s:.2f} s after ready"
    )
    assert reclaim_s < 2
    assert await pending_count(rds, names) == 0
    distinct = await pg.fetchval(
        "SELECT count(DISTINCT event_id) FROM stats_events WHERE event_id = ANY($1::uuid[])", ids
    )
    assert distinct == 100_000
    # Counted exactly once across the crash: the aggregates equal Postgres.
    async with httpx.AsyncClient(base_url=second.url) as client:
        for product_id in (pid_base, pid_base + 3, pid_base + 9):
            doc = (await client.get(f"/api/v1/stats/products/{product_id}?window=300")).json()
            start, end = span(doc)
            exact = await brute_force(pg, product_id, start, end)
            for key in ("views", "carts", "purchases"):
                assert doc[key] == exact[key], (key, doc, exact)


async def _positive(value: Any) -> bool:
    return int(await value) > 0


async def test_memory_stays_bounded_under_a_sustained_backlog(
    stats_env: dict[str, str],
    processes: list[StatsProcess],
    tmp_path: Path,
    rds: aioredis.Redis,
    names: Names,
    pid_base: int,
) -> None:
    """A writer slower than the clients for 10 s: the backlog hits its budget (503), the
    service's memory does not follow it."""
    budget = 60_000
    env = {
        **stats_env,
        "SHOPSTACK_STATS_MAX_BACKLOG": str(budget),
        "SHOPSTACK_STATS_MAX_LAG_S": "0",
        "SHOPSTACK_STATS_FAULT_WRITE_DELAY_S": "0.3",
    }
    proc = start_stats(env, tmp_path / "stats.log")
    processes.append(proc)
    template = make_events(1000, pid_base)
    rss: list[int] = []
    statuses: dict[int, int] = {}
    highest_backlog = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    async with httpx.AsyncClient(base_url=proc.url, timeout=30) as client:

        async def sender() -> None:
            while loop.time() < end:
                fresh = [{**e, "event_id": event(1)["event_id"]} for e in template]
                resp = await client.post("/api/v1/events", content=body(fresh), headers=JSON)
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                if resp.status_code == 503:
                    assert resp.headers["retry-after"]
                    await asyncio.sleep(0.1)

        async def sampler() -> None:
            nonlocal highest_backlog
            while loop.time() < end:
                rss.append(proc.worker_rss_bytes())
                highest_backlog = max(highest_backlog, await backlog(rds, names))
                await asyncio.sleep(0.5)

        await asyncio.gather(sampler(), *(sender() for _ in range(4)))
    mib = [r / 2**20 for r in rss]
    print(f"memory: worker RSS MiB {[round(m) for m in mib]}; statuses {statuses}")
    assert statuses.get(503, 0) > 0  # the budget was reached and enforced
    assert set(statuses) <= {202, 503}
    assert highest_backlog <= budget
    assert max(mib) <= 96
    settled = mib[len(mib) // 3 :]
    assert max(settled) - min(settled) < 16  # flat while the backlog sits at its budget
