"""The sandbox provider: charges with idempotency keys, faults, and the events it emits."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from dataclasses import dataclass

import orjson

from services.common.errors import IdempotencyMismatch, NotFound, Problem
from services.psp_sandbox.schemas import (
    Charge,
    ChargeIn,
    Fault,
    Faults,
    FaultsIn,
    FaultsOut,
)
from services.psp_sandbox.settings import SandboxSettings
from services.psp_sandbox.store import SandboxStore
from services.psp_sandbox.webhooks import charge_event

log = logging.getLogger("shopstack.psp_sandbox")

# An out-of-order pair is delivered this long after the on-time event.
OUT_OF_ORDER_LAG_MS = 200


class ProviderError(Problem):
    """The injected provider failure: 503, nothing charged."""

    status, code, title = 503, "provider-error", "Provider Error"


class ChargeRejected(Problem):
    """The injected request rejection: 400, nothing charged."""

    status, code, title = 400, "charge-rejected", "Charge Rejected"


@dataclass(frozen=True)
class ChargeOutcome:
    charge: Charge
    created: bool
    fault: Fault | None


def env_faults(settings: SandboxSettings) -> Faults:
    """The faults the environment sets (SHOPSTACK_PSP_*)."""
    return Faults(
        latency_ms=settings.psp_latency_ms,
        error_rate=settings.psp_error_rate,
        timeout_rate=settings.psp_timeout_rate,
        reset_rate=settings.psp_reset_rate,
        decline_rate=settings.psp_decline_rate,
        reject_rate=settings.psp_reject_rate,
        duplicate_rate=settings.psp_duplicate_rate,
        out_of_order_rate=settings.psp_out_of_order_rate,
        callback_drop_rate=settings.psp_callback_drop_rate,
        callback_delay_ms=settings.psp_callback_delay_ms,
    )


def merged_faults(settings: SandboxSettings, override: dict[str, object]) -> Faults:
    """Env defaults overridden by the run-time settings."""
    return Faults.model_validate({**env_faults(settings).model_dump(), **override})


async def current_faults(*, store: SandboxStore, settings: SandboxSettings) -> FaultsOut:
    """Env defaults overridden by the run-time settings, plus the queued faults."""
    merged = merged_faults(settings, await store.faults_override()).model_dump()
    return FaultsOut(**merged, next_faults=await store.queued_faults())


async def update_faults(
    *, store: SandboxStore, settings: SandboxSettings, data: FaultsIn
) -> FaultsOut:
    """Apply a POST /_sandbox/faults body and return the faults now in force."""
    override = {} if data.reset else await store.faults_override()
    override.update(data.model_dump(exclude_none=True, exclude={"reset", "next_faults"}))
    await store.set_faults_override(override, clear=data.reset)
    if data.next_faults is not None:
        await store.queue_faults(data.next_faults)
    return await current_faults(store=store, settings=settings)


def fingerprint(data: ChargeIn) -> str:
    """What makes two requests with one key "the same" request."""
    return hashlib.sha256(orjson.dumps(data.model_dump(), option=orjson.OPT_SORT_KEYS)).hexdigest()


def pick_fault(faults: Faults, rng: random.Random) -> Fault | None:
    """Draw at most one fault from the rates, in a fixed order."""
    for fault, rate in (
        ("reject", faults.reject_rate),
        ("error", faults.error_rate),
        ("decline", faults.decline_rate),
        ("timeout", faults.timeout_rate),
        ("reset", faults.reset_rate),
    ):
        if rate > 0 and rng.random() < rate:
            return fault  # type: ignore[return-value]
    return None


async def create_charge(
    *,
    store: SandboxStore,
    settings: SandboxSettings,
    rng: random.Random,
    data: ChargeIn,
    idempotency_key: str | None,
) -> ChargeOutcome:
    """Charge once per idempotency key; faults decide how the request goes wrong."""
    override, queued = await store.begin_request(data.reference)
    faults = merged_faults(settings, override)
    if faults.latency_ms:
        await asyncio.sleep(faults.latency_ms / 1000)
    fault: Fault | None = queued if queued is not None else pick_fault(faults, rng)  # type: ignore[assignment]
    if fault == "reject":
        raise ChargeRejected("the provider rejected the charge request")
    if fault == "error":
        raise ProviderError("the provider failed; nothing was charged")

    charge_id = "ch_" + uuid.uuid4().hex
    charge = Charge(
        id=charge_id,
        status="failed" if fault == "decline" else "succeeded",
        amount_cents=data.amount_cents,
        currency=data.currency,
        reference=data.reference,
        created=int(time.time()),
    )
    # No key: every request is a new charge (the key is what makes a retry safe).
    key = idempotency_key or "none:" + charge_id
    result = await store.create_charge(
        idempotency_key=key,
        fingerprint=fingerprint(data),
        charge_id=charge_id,
        charge=charge.model_dump_json().encode(),
        reference=data.reference,
    )
    if result.outcome == "mismatch":
        raise IdempotencyMismatch("this Idempotency-Key was used with a different request")
    stored = Charge.model_validate_json(result.charge)
    created = result.outcome == "created"
    if created:
        await emit_events(store=store, charge=stored, faults=faults, rng=rng)
    return ChargeOutcome(stored, created, fault if fault in ("timeout", "reset") else None)


async def emit_events(
    *, store: SandboxStore, charge: Charge, faults: Faults, rng: random.Random
) -> None:
    """Queue the callbacks for a new charge: maybe dropped, duplicated or out of order."""
    if faults.callback_drop_rate > 0 and rng.random() < faults.callback_drop_rate:
        log.info("callback dropped on purpose", extra={"charge_id": charge.id})
        return
    delay = faults.callback_delay_ms
    event = charge_event(charge, status=charge.status, created=charge.created)
    await store.enqueue_callback(event, delivery_id=uuid.uuid4().hex, delay_ms=delay)
    if faults.duplicate_rate > 0 and rng.random() < faults.duplicate_rate:
        await store.enqueue_callback(event, delivery_id=uuid.uuid4().hex, delay_ms=delay)
    if (
        charge.status == "succeeded"
        and faults.out_of_order_rate > 0
        and rng.random() < faults.out_of_order_rate
    ):
        # A first authorization attempt that was declined before the retry succeeded:
        # its older charge.failed event arrives after the charge.succeeded one.
        stale = charge_event(charge, status="failed", created=charge.created - 1)
        await store.enqueue_callback(
            stale, delivery_id=uuid.uuid4().hex, delay_ms=delay + OUT_OF_ORDER_LAG_MS
        )


async def get_charge(*, store: SandboxStore, charge_id: str) -> Charge:
    body = await store.get_charge(charge_id)
    if body is None:
        raise NotFound(f"no charge {charge_id}")
    return Charge.model_validate_json(body)


async def charges_for(*, store: SandboxStore, reference: str) -> list[Charge]:
    """Charges created for a reference, oldest first."""
    charges = [Charge.model_validate_json(b) for b in await store.charges_for(reference)]
    return sorted(charges, key=lambda c: (c.created, c.id))
