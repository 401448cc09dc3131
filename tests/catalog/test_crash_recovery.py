"""INV-4: kill a real catalog process between the gate and the commit, restart, reconcile.

The catalog runs as `shopstack serve catalog` (granian, a real process) with the
test-only fault hook SHOPSTACK_CATALOG_FAULT_CRASH_AFTER_GATE: the worker
os._exit()s right after the Lua gate admitted a buy, before Postgres commits it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import pytest
from redis.asyncio import Redis

from tests.catalog.conftest import ADMIN, new_product_id, product_body
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
BUYS = 100


class CatalogProcess:
    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.env = env
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, crash_chance: float) -> None:
        env = {
            **os.environ,
            **self.env,
            "SHOPSTACK_PORT": str(self.port),
            "SHOPSTACK_CATALOG_FAULT_CRASH_AFTER_GATE": str(crash_chance),
            "PYTHONPATH": str(ROOT),
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "serve", "catalog"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"catalog exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"catalog not ready:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]
        except psutil.NoSuchProcess:
            family = []
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        _, alive = psutil.wait_procs(family, timeout=5)
        for proc in alive:
            proc.kill()
        self.proc = None

    def wait_down(self) -> None:
        """After a crash: wait for the server to be gone, killing what is left of it."""
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.stop()


async def _pg_state(dsn: str, pid: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """
            SELECT p.stock, p.units_on_sale,
                   coalesce((SELECT sum(quantity) FROM orders o WHERE o.product_id = p.id
                             AND o.status IN ('reserved', 'paid')), 0)::int AS held,
                   (SELECT count(*) FROM orders o WHERE o.product_id = p.id)::int AS orders
            FROM products p WHERE p.id = $1
            """,
            pid,
        )
        ids = await conn.fetch("SELECT id FROM orders WHERE product_id = $1", pid)
    finally:
        await conn.close()
    return {**dict(row), "ids": {str(r["id"]) for r in ids}}


@pytest.mark.slow
async def test_inv4_crash_between_gate_and_commit(
    service_env: dict[str, str], database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """INV-4: ~20 of 100 buys die after the gate; restart; reconcile: 0 lost, 0 oversold."""
    env = {
        **service_env,
        "SHOPSTACK_DATA_DIR": str(tmp_path / "data"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "SHOPSTACK_CATALOG_GATE_PENDING_GRACE_S": "2",
        "SHOPSTACK_CATALOG_RECONCILE_INTERVAL_S": "0.5",
        "SHOPSTACK_CATALOG_RESERVATION_TTL_S": "900",  # nothing expires during the run
    }
    server = CatalogProcess(env, free_port(), tmp_path / "catalog.log")
    pid = new_product_id()
    rds = Redis.from_url(redis_url)
    created: set[str] = set()
    crashes = 0
    try:
        server.start(crash_chance=0.2)
        put = httpx.put(
            f"{server.url}/api/v1/admin/products/{pid}",
            json=product_body(sku=f"SKU-C{pid}", stock=100),
            headers=ADMIN,
            timeout=10,
        )
        assert put.status_code == 201, put.text
        for i in range(BUYS):
            try:
                resp = httpx.post(
                    f"{server.url}/api/v1/orders",
                    json={"product_id": pid, "quantity": 1},
                    headers={"X-User-Id": f"inv4-{i}-{uuid.uuid4().hex[:4]}"},
                    timeout=10,
                )
            except httpx.HTTPError:
                crashes += 1
                server.wait_down()
                server.start(crash_chance=0.2)
                continue
            assert resp.status_code == 201, resp.text
            created.add(resp.json()["id"])
        server.stop()
        assert crashes > 0, "the fault hook never fired"

        # Restart without faults; the reconciler undoes the dead admissions.
        server.start(crash_chance=0.0)
        deadline = time.monotonic() + 30
        while True:
            state = await _pg_state(database_url, pid)
            gate_stock = await rds.hget(f"gate:{pid}:p", "stock")
            pending = await rds.zcard(f"gate:{pid}:q")
            if gate_stock is not None and int(gate_stock) == state["stock"] and pending == 0:
                break
            assert time.monotonic() < deadline, (gate_stock, pending, state)
            time.sleep(0.2)
        metrics = httpx.get(server.url + "/metrics", timeout=5).text
    finally:
        server.stop()
        await rds.aclose()

    # Every 201 is an order; no crashed buy left an order or took a unit.
    assert state["ids"] == created
    assert state["orders"] == BUYS - crashes
    assert state["stock"] == 100 - len(created)
    assert state["units_on_sale"] == state["stock"] + state["held"] == 100
    assert "shopstack_inventory_discrepancy_units 0.0" in metrics
    assert "shopstack_reconciler_last_run_timestamp_seconds" in metrics
