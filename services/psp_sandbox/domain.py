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
from services.psp_sandbox.store import Callback, ChargeWrite, SandboxStore
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
    body: bytes  # the charge as stored (its JSON)


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


class FaultsInForce:
    """The merged faults for the last run-time override read from Redis, parsed once per
    change: a charge is planned with them, and the store checks they still hold."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.raw = b""  # no override stored
        self.faults = merged_faults(settings, {})

    def given(self, raw: bytes) -> Faults:
        """The faults for the raw override `raw` (b"": none)."""
        if raw != self.raw:
            loaded = orjson.loads(raw) if raw else {}
            self.faults = merged_faults(self.settings, loaded if isinstance(loaded, dict) else {})
            self.raw = raw
        return self.faults


@dataclass(frozen=True)
class _Plan:
    """The charge a request makes and the callbacks it causes if the charge is new."""

    fault: Fault | None
    charge: Charge
    body: bytes  # the charge's JSON, as stored and answered
    callbacks: tuple[Callback, ...]
    dropped: bool  # no callback, on purpose


async def create_charge(
    *,
    store: SandboxStore,
    in_force: FaultsInForce,
    rng: random.Random,
    data: ChargeIn,
    idempotency_key: str | None,
) -> ChargeOutcome:
    """Charge once per idempotency key; faults decide how the request goes wrong.

    The request is planned with the faults last seen and sent in one round trip that
    counts it, checks those faults still hold (and none is queued) and then writes the
    charge. Otherwise (other faults, a queued fault, a latency to wait between counting
    and charging) the counted request is decided and written in a second round trip.
    """
    fprint = fingerprint(data)
    faults = in_force.faults
    planned_raw = in_force.raw
    fault = pick_fault(faults, rng)
    plan: _Plan | None = None
    if not faults.latency_ms and fault not in ("reject", "error"):
        plan = _plan(data, faults, fault, rng)
    result = await store.charge_request(
        reference=data.reference,
        planned_faults=planned_raw,
        write=None if plan is None else _write(plan, idempotency_key, fprint, data.reference),
    )
    outcome = result.outcome
    stored = result.charge
    if plan is None or outcome == "stale":
        if outcome == "stale":
            faults = in_force.given(result.faults)
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        if outcome == "stale":
            fault = result.queued if result.queued is not None else pick_fault(faults, rng)  # type: ignore[assignment]
        if fault == "reject":
            raise ChargeRejected("the provider rejected the charge request")
        if fault == "error":
            raise ProviderError("the provider failed; nothing was charged")
        plan = _plan(data, faults, fault, rng)
        created = await store.create_charge(_write(plan, idempotency_key, fprint, data.reference))
        outcome, stored = created.outcome, created.charge
    if outcome == "mismatch":
        raise IdempotencyMismatch("this Idempotency-Key was used with a different request")
    fault = plan.fault if plan.fault in ("timeout", "reset") else None
    if outcome == "created":
        if plan.dropped:
            log.info("callback dropped on purpose", extra={"charge_id": plan.charge.id})
        return ChargeOutcome(plan.charge, True, fault, plan.body)
    return ChargeOutcome(Charge.model_validate_json(stored), False, fault, stored)


def _plan(data: ChargeIn, faults: Faults, fault: Fault | None, rng: random.Random) -> _Plan:
    """The charge a request makes under `fault` (not reject or error: those charge
    nothing) and the callbacks it would cause."""
    charge = Charge(
        id="ch_" + uuid.uuid4().hex,
        status="failed" if fault == "decline" else "succeeded",
        amount_cents=data.amount_cents,
        currency=data.currency,
        reference=data.reference,
        created=int(time.time()),
    )
    body = charge.model_dump_json().encode()
    dropped = faults.callback_drop_rate > 0 and rng.random() < faults.callback_drop_rate
    callbacks = () if dropped else events_for(charge, faults=faults, rng=rng)
    return _Plan(fault, charge, body, callbacks, dropped)


def _write(plan: _Plan, idempotency_key: str | None, fprint: str, reference: str) -> ChargeWrite:
    # No key: every request is a new charge (the key is what makes a retry safe).
    return ChargeWrite(
        idempotency_key=idempotency_key or "none:" + plan.charge.id,
        fingerprint=fprint,
        charge_id=plan.charge.id,
        charge=plan.body,
        reference=reference,
        callbacks=plan.callbacks,
    )


def events_for(charge: Charge, *, faults: Faults, rng: random.Random) -> tuple[Callback, ...]:
    """The callbacks a new charge causes: maybe duplicated or out of order (not dropped:
    the caller draws that first)."""
    delay = faults.callback_delay_ms
    event = charge_event(charge, status=charge.status, created=charge.created)
    callbacks = [Callback(uuid.uuid4().hex, event, delay)]
    if faults.duplicate_rate > 0 and rng.random() < faults.duplicate_rate:
        callbacks.append(Callback(uuid.uuid4().hex, event, delay))
    if (
        charge.status == "succeeded"
        and faults.out_of_order_rate > 0
        and rng.random() < faults.out_of_order_rate
    ):
        # A first authorization attempt that was declined before the retry succeeded:
        # its older charge.failed event arrives after the charge.succeeded one.
        stale = charge_event(charge, status="failed", created=charge.created - 1)
        callbacks.append(Callback(uuid.uuid4().hex, stale, delay + OUT_OF_ORDER_LAG_MS))
    return tuple(callbacks)


async def get_charge(*, store: SandboxStore, charge_id: str) -> Charge:
    body = await store.get_charge(charge_id)
    if body is None:
        raise NotFound(f"no charge {charge_id}")
    return Charge.model_validate_json(body)


async def charges_for(*, store: SandboxStore, reference: str) -> list[Charge]:
    """Charges created for a reference, oldest first."""
    charges = [Charge.model_validate_json(b) for b in await store.charges_for(reference)]
    return sorted(charges, key=lambda c: (c.created, c.id))
