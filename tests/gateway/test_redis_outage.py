"""FLT-4: Redis is killed (SIGKILL) under the whole stack, then comes back.

The stack here has a Redis of its own (an embedded redis-server on a free port, with
its append-only file), so killing it touches nothing else. While it is down, writes
that need it fail fast with 503 problem+json (never a hang, never a 500), login fails
closed, and product pages are still served; once it is back, orders go through again
without restarting anything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from services.common.embedded import EmbeddedRedis
from tests.support.problems import assert_problem
from tests.support.servers import free_port, kill_redis
from tests.support.stack import RunningStack, private_stack

ORDER = "/api/v1/orders"


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    redis = EmbeddedRedis(tmp_path_factory.mktemp("flt4-redis"), port=free_port())
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture(scope="module")
def outage_stack(
    servers: tuple[str, str], own_redis: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningStack, str]]:
    with private_stack(
        servers[0],
        redis_url=own_redis.url,
        log_dir=tmp_path_factory.mktemp("flt4-stack"),
        products=20,
        users=2,
    ) as found:
        yield found


async def _stock(dsn: str) -> dict[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, stock FROM products WHERE id BETWEEN 3 AND 14")
    finally:
        await conn.close()
    return {row["id"]: row["stock"] for row in rows}


def test_flt4_redis_killed_and_back(
    outage_stack: tuple[RunningStack, str], own_redis: EmbeddedRedis
) -> None:
    stack, dsn = outage_stack
    url = stack.url()
    initial = asyncio.run(_stock(dsn))
    login = {"username": "demo1", "password": "demo-password-1"}
    token = httpx.post(url + "/api/v1/auth/login", json=login).json()["access_token"]
    buyer = {"Authorization": f"Bearer {token}"}
    before = httpx.post(url + ORDER, json={"product_id": 3, "quantity": 1}, headers=buyer)
    assert before.status_code == 201, before.text

    kill_redis(own_redis)
    # Every order needs the inventory gate: each is refused at once, never a hang or a 500
    # (the client's timeout of 5 s would fail the test long before the services' own).
    with httpx.Client(timeout=5.0) as client:
        for product_id in range(4, 14):
            down = client.post(
                url + ORDER, json={"product_id": product_id, "quantity": 1}, headers=buyer
            )
            assert_problem(down, 503, "upstream-unavailable")
            assert down.headers["retry-after"]
        assert_problem(
            client.post(url + "/api/v1/auth/login", json=login), 503, "upstream-unavailable"
        )  # login fails closed without its throttle
        page = client.get(url + "/api/v1/products/3")
        assert page.status_code == 200  # reads do not need Redis
        assert page.json()["id"] == 3

    own_redis.start()  # same port, same append-only file
    deadline = time.monotonic() + 30.0
    after = None
    while time.monotonic() < deadline:
        after = httpx.post(url + ORDER, json={"product_id": 14, "quantity": 1}, headers=buyer)
        if after.status_code != 503:
            break
        time.sleep(0.1)
    assert after is not None
    assert after.status_code == 201, after.text
    assert httpx.post(url + "/api/v1/auth/login", json=login).status_code == 200
    # Stock still adds up: the order before the outage and the one after, nothing else.
    now = asyncio.run(_stock(dsn))
    assert {pid: initial[pid] - now[pid] for pid in now} == {
        pid: 1 if pid in (3, 14) else 0 for pid in initial
    }
