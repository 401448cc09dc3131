"""The sandbox store against real Redis: one round trip per charge, leased callbacks."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis

from services.psp_sandbox.store import Callback, ChargeWrite, SandboxStore


@pytest.fixture
async def store(rds: aioredis.Redis) -> AsyncIterator[SandboxStore]:
    sandbox = SandboxStore(rds, prefix=f"psptest-{uuid.uuid4().hex[:8]}:", retention_s=600)
    yield sandbox
    await sandbox.reset()


def write(reference: str, *, key: str | None = None, callbacks: int = 1) -> ChargeWrite:
    charge_id = "ch_" + uuid.uuid4().hex
    return ChargeWrite(
        idempotency_key=key or str(uuid.uuid4()),
        fingerprint="fp-" + reference,
        charge_id=charge_id,
        charge=orjson.dumps({"id": charge_id, "reference": reference}),
        reference=reference,
        callbacks=tuple(
            Callback(uuid.uuid4().hex, b'{"n": %d}' % i, delay_ms=0) for i in range(callbacks)
        ),
    )


async def test_planned_charge_is_counted_written_and_queued_in_one_call(
    store: SandboxStore,
) -> None:
    planned = write("r1", callbacks=2)
    result = await store.charge_request(reference="r1", planned_faults=b"", write=planned)
    assert (result.outcome, result.charge) == ("created", planned.charge)
    assert await store.get_charge(planned.charge_id) == planned.charge
    assert await store.pending_callbacks() == 2
    counts = await store.stats("r1")
    assert (counts["charge_requests"], counts["charges_created"]) == (1, 1)

    again = await store.charge_request(
        reference="r1", planned_faults=b"", write=write("r1", key=planned.idempotency_key)
    )
    assert (again.outcome, again.charge) == ("existing", planned.charge)
    assert await store.pending_callbacks() == 2  # a replay queues nothing
    other = dataclasses.replace(
        write("r1", key=planned.idempotency_key), fingerprint="another body"
    )
    mismatch = await store.charge_request(reference="r1", planned_faults=b"", write=other)
    assert mismatch.outcome == "mismatch"
    assert await store.pending_callbacks() == 2
    counts = await store.stats("r1")
    assert (counts["charge_requests"], counts["charges_created"]) == (3, 1)


async def test_changed_or_queued_faults_make_the_plan_stale(store: SandboxStore) -> None:
    await store.set_faults_override({"error_rate": 1.0}, clear=False)
    planned = write("r2")
    stale = await store.charge_request(reference="r2", planned_faults=b"", write=planned)
    assert (stale.outcome, orjson.loads(stale.faults), stale.queued) == (
        "stale",
        {"error_rate": 1.0},
        None,
    )
    assert await store.get_charge(planned.charge_id) is None
    assert await store.pending_callbacks() == 0

    await store.queue_faults(["decline", "reset"])
    queued = await store.charge_request(reference="r2", planned_faults=stale.faults, write=planned)
    assert (queued.outcome, queued.queued) == ("stale", "decline")
    assert await store.queued_faults() == ["reset"]
    assert await store.get_charge(planned.charge_id) is None

    created = await store.create_charge(planned)  # the second call of a stale request
    assert created.outcome == "created"
    assert await store.pending_callbacks() == 1
    counts = await store.stats("r2")
    assert (counts["charge_requests"], counts["charges_created"]) == (2, 1)


async def test_a_plan_that_writes_nothing_is_only_counted(store: SandboxStore) -> None:
    result = await store.charge_request(reference="r3", planned_faults=b"", write=None)
    assert result.outcome == "counted"
    counts = await store.stats("r3")
    assert (counts["charge_requests"], counts["charges_created"]) == (1, 0)


async def test_concurrent_plans_with_one_key_create_one_charge(store: SandboxStore) -> None:
    key = str(uuid.uuid4())
    results = await asyncio.gather(
        *(
            store.charge_request(reference="r4", planned_faults=b"", write=write("r4", key=key))
            for _ in range(20)
        )
    )
    assert sorted(r.outcome for r in results) == ["created"] + ["existing"] * 19
    assert len({r.charge for r in results}) == 1
    assert await store.pending_callbacks() == 1


async def test_an_unacknowledged_delivery_comes_back_after_its_lease(
    store: SandboxStore,
) -> None:
    planned = write("r5", callbacks=3)
    await store.charge_request(reference="r5", planned_faults=b"", write=planned)
    claimed = await store.claim_callbacks(lease_ms=300, limit=10)
    assert sorted(d.body for d in claimed) == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert all(d.attempts == 0 for d in claimed)
    assert await store.claim_callbacks(lease_ms=300, limit=10) == []  # leased

    # Two acknowledged in one batch; the third is sent but never acknowledged.
    await store.callbacks_delivered([claimed[0].id, claimed[1].id])
    assert (await store.stats(None))["callbacks_sent"] == 2
    await asyncio.sleep(0.4)
    again = await store.claim_callbacks(lease_ms=300, limit=10)
    assert [(d.id, d.body) for d in again] == [(claimed[2].id, claimed[2].body)]
    await store.callbacks_delivered([claimed[2].id])
    await asyncio.sleep(0.4)
    assert await store.claim_callbacks(lease_ms=300, limit=10) == []
    assert await store.pending_callbacks() == 0
    assert (await store.stats(None))["callbacks_sent"] == 3
