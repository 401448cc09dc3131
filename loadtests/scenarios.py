"""The write-up's four scenarios (plus unique callbacks and the payment-status reference),
each closed-loop and open-model.

Closed loop = the write-up's tools: wrk or ab keep N connections busy and
send again as soon as a reply arrives. Open model = loadtests/openloop.py at a
fixed arrival rate (default: 60 % of the closed-loop median), latency from the
intended send time.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import httpx

from loadtests import prepare, workload
from loadtests.calibrate import Shape
from loadtests.prepare import Availability, PrepareError
from loadtests.results import ScenarioResult
from loadtests.runners import LoadToolFailed, Run, lua_script, run_ab, run_openloop, run_wrk
from loadtests.session import Session, lookup_charge_ids

OPEN_MAX_CONNECTIONS = 256
GENERATOR_HEADROOM = 0.75  # open-model rates stay this far under the generator's own ceiling
RATE_LIMIT_HINT = (
    "answered 429: the gateway rate-limits per client address and every simulated client "
    "shares the load generator's; see loadtests/README.md (SHOPSTACK_TRUSTED_PROXIES)"
)


class Scenario(ABC):
    """One scenario: how to check it exists, prepare it, and run it in both models."""

    name = ""
    title = ""
    writeup = ""  # which of the write-up's tables it mirrors
    tool = "wrk"
    close = False
    method = "GET"
    default_connections = 16
    expected: tuple[int, ...] = (200,)
    sniff_callbacks = False

    def connections(self, s: Session) -> int:
        return s.options.connections.get(self.name, self.default_connections)

    def shape(self, s: Session) -> Shape:
        return Shape(self.tool, self.connections(s), self.close, self.method)

    @abstractmethod
    async def availability(self, s: Session) -> Availability:
        """Whether the target serves this scenario's endpoints (404/501: skip it)."""

    def prepare(self, s: Session) -> None:  # noqa: B027 (optional hook)
        """One-time set-up before the warm-up (default: nothing needed)."""

    @abstractmethod
    def closed(self, s: Session, duration_s: float, est_rps: float | None) -> Run:
        """One closed-loop run with wrk or ab."""

    @abstractmethod
    def source(self, s: Session, rate: float, duration_s: float) -> dict[str, Any]:
        """The open-model generator's request source for `rate` requests/s."""

    def after_run(self, s: Session, run: Run) -> None:  # noqa: B027 (optional hook)
        """Record in the ledger what the audit must find (default: nothing)."""

    def wrk(self, s: Session, script: str, args: list[str], duration_s: float) -> Run:
        return run_wrk(
            base_url=s.options.target,
            script=lua_script(script, s.workdir),
            script_args=args,
            connections=self.connections(s),
            duration_s=duration_s,
            close=self.close,
            plan=s.plan,
            sampler=s.sampler,
        )

    def open_run(self, s: Session, rate: float, duration_s: float) -> Run:
        url = httpx.URL(s.options.target)
        spec = {
            "host": url.host,
            "port": url.port or 80,
            "rate": rate,
            "duration_s": duration_s,
            "close": self.close,
            "max_connections": OPEN_MAX_CONNECTIONS,
            "sniff_callbacks": self.sniff_callbacks,
            "source": self.source(s, rate, duration_s),
        }
        return run_openloop(spec=spec, plan=s.plan, workdir=s.workdir, sampler=s.sampler)


async def _can_pay(s: Session) -> Availability:
    """Whether orders and payments can be created (the probes' empty bodies create nothing)."""
    users = await asyncio.to_thread(s.tokens)
    token, address = users.pick(0)
    headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": address}
    async with prepare.client(s.options.target) as http:
        orders = await prepare.probe(http, "POST", "/api/v1/orders", json={}, headers=headers)
        if not orders.available:
            return orders
        return await prepare.probe(http, "POST", "/api/v1/payments", json={}, headers=headers)


def _needed(
    est_rps: float | None, duration_s: float, *, guess_rps: float, cap: int, margin: float = 1.3
) -> int:
    """Items to pre-generate for a run: `margin` x what the last run's rate (or a guess) uses."""
    rate = guess_rps if est_rps is None else est_rps
    return min(cap, math.ceil(rate * duration_s * margin) + 50)


class ProductDetail(Scenario):
    name = "product-detail"
    title = "Product detail, keep-alive (flash sale)"
    writeup = "wrk, keep-alive: QPS, avg and P99 latency, memory, CPU"
    default_connections = 64

    async def availability(self, s: Session) -> Availability:
        async with prepare.client(s.options.target) as http:
            return await prepare.probe(http, "GET", "/api/v1/products/1")

    def prepare(self, s: Session) -> None:
        for pid in range(1, min(s.options.product_ids, workload.FLASH_SALE_IDS) + 1):
            if pid not in s.ledger.product_ids:
                s.ledger.product_ids.append(pid)

    def closed(self, s: Session, duration_s: float, est_rps: float | None) -> Run:
        args = [str(s.options.product_ids), str(workload.ZIPF_S)]
        return self.wrk(s, "product", args, duration_s)

    def source(self, s: Session, rate: float, duration_s: float) -> dict[str, Any]:
        return {"kind": "product", "count": s.options.product_ids, "s": workload.ZIPF_S}


class Payment(Scenario):
    name = "payment"
    title = "Payment, short connections (fresh reserved order each)"
    writeup = "ab, short connections: QPS, avg latency, error rate, throughput, conn set-up"
    close = True
    method = "POST"
    default_connections = 16
    expected = (201,)

    async def availability(self, s: Session) -> Availability:
        return await _can_pay(s)

    def prepare(self, s: Session) -> None:
        s.ensure_product()

    def _pairs_file(self, s: Session, count: int, result_notes: list[str]) -> Path:
        batch = asyncio.run(prepare.create_orders(s.options.target, s.tokens(), count))
        if not batch.items:
            raise PrepareError(f"no reserved order could be created: {dict(batch.failures)}")
        if batch.failures:
            made, failed = len(batch.items), dict(batch.failures)
            result_notes.append(f"order creation for pairs: {made} made, failures {failed}")
        return workload.write_pairs(s.workdir / "pairs.tsv", batch.items)

    def closed(self, s: Session, duration_s: float, est_rps: float | None) -> Run:
        count = _needed(est_rps, duration_s, guess_rps=250, cap=s.options.max_pairs)
        path = self._pairs_file(s, count, s.notes)
        return self.wrk(s, "payment", [str(path)], duration_s)

    def source(self, s: Session, rate: float, duration_s: float) -> dict[str, Any]:
        count = min(s.options.max_pairs, math.ceil(rate * duration_s) + 10)
        return {"kind": "payment", "file": str(self._pairs_file(s, count, s.notes))}


class PaymentStatus(Scenario):
    """The owner polling a payment of theirs, as a checkout page does after paying.

    Not in the write-up. It is the cheapest authenticated short-connection request that
    reaches the payment service and its database (the token checked at the gateway, one
    read of the payment), on the payment scenario's shape but for the method: the payment
    scenario's cost less this one's is what paying itself costs (catalog hold, provider
    charge, writes).
    """

    name = "payment-status"
    title = "Payment status, short connections (the owner polling)"
    close = True
    default_connections = Payment.default_connections
    payments = 100  # real payments polled in turn (one per demo user by default)

    async def availability(self, s: Session) -> Availability:
        return await _can_pay(s)

    def prepare(self, s: Session) -> None:
        s.ensure_product()
        users = s.tokens()
        orders = asyncio.run(prepare.create_orders(s.options.target, users, self.payments))
        if not orders.items:
            raise PrepareError(
                f"no reserved order could be created for payments to poll: {dict(orders.failures)}"
            )
        paid = asyncio.run(prepare.create_payments(s.options.target, orders.items))
        owners = {pair.order_id: pair for pair in orders.items}
        owned: list[workload.OwnedPayment] = []
        for payment in paid.items:
            owner = owners.get(str(payment["order_id"]))
            if owner is not None:
                owned.append(workload.OwnedPayment(owner.token, str(payment["id"]), owner.client))
        if not owned:
            raise PrepareError(
                "no payment could be created to poll: POST /api/v1/payments answered "
                f"{dict(paid.failures)} for {len(orders.items)} reserved orders"
            )
        failures = orders.failures + paid.failures
        if failures:
            s.notes.append(f"payments to poll: {len(owned)} made, failures {dict(failures)}")
        first = owned[0]
        status, reply = asyncio.run(prepare.fetch_payment(s.options.target, first))
        if status != 200:
            raise PrepareError(
                f"GET /api/v1/payments/{first.payment_id} as the payment's owner answered "
                f"{status}: {reply}"
            )
        workload.write_owned_payments(self._file(s), owned)

    def _file(self, s: Session) -> Path:
        return s.workdir / "payment_status.tsv"

    def closed(self, s: Session, duration_s: float, est_rps: float | None) -> Run:
        return self.wrk(s, "payment_status", [str(self._file(s))], duration_s)

    def source(self, s: Session, rate: float, duration_s: float) -> dict[str, Any]:
        return {"kind": "payment-status", "file": str(self._file(s))}


class Login(Scenario):
    name = "login"
    title = "Login, short connections (demo users)"
    writeup = "wrk, short connections: QPS, avg latency, conn set-up, memory, error rate"
    close = True
    method = "POST"
    default_connections = 8

    async def availability(self, s: Session) -> Availability:
        async with prepare.client(s.options.target) as http:
            found = await prepare.probe(
                http,
                "POST",
                "/api/v1/auth/login",
                json=workload.demo_credentials(1),
                headers={"X-Forwarded-For": workload.client_address(1)},
            )
        if found.status == 401:
            raise prepare.Skip("demo users are not seeded (demo1 could not log in): shopstack seed")
        return found

    def closed(self, s: Session, duration_s: float, est_rps: float | None) -> Run:
        return self.wrk(s, "login", ["1", str(s.options.users)], duration_s)

    def source(self, s: Session, rate: float, duration_s: float) -> dict[str, Any]:
        return {"kind": "login", "first": 1, "count": s.options.users}


class Callbacks(Scenario):
    """ab, as the write-up: one signed event sent again and again (duplicates by design)."""

    name = "callbacks"
    title = "Payment callbacks, short connections (one event: duplicates)"
    writeup = "ab, short connections: QPS, avg latency, error rate, throughput, conn reuse"
    tool = "ab"
    close = True
    method = "POST"
    default_connections = 32
    sniff_callbacks = True
    event_id = ""
    body = b""

    async def availability(self, s: Session) -> Availability:
        bad = {"PSP-Signature": "t=0,v1=00", "Content-Type": "application/json"}
        async with prepare.client(s.options.target) as http:
            return await prepare.probe(http, "POST", workload.CALLBACK_PATH, json={}, headers=bad)

    def prepare(self, s: Session) -> None:
        if not s.refs:
            s.refs = payment_refs(s)
        s.ledger.callbacks_available = True
        self.event_id = f"{workload.new_event_prefix()}-dup"
        s.ledger.callback_prefixes.append(self.event_id)
        self.body = workload.callback_body(self.event_id, s.refs[0])
        first = workload.SignedEvent(
            self.event_id, workload.sign(prepare.webhook_secret(), self.body), self.body
        )
        status, reply = asyncio.run(prepare.send_callback(s.options.target, first))
        if status != 200:
            raise PrepareError(f"the first delivery of the event answered {status}: {reply}")
        s.ledger.callbacks_sent += 1
        if reply == "processed":
            s.ledger.callbacks_processed += 1

    def _signed(self, s: Session) -> tuple[Path, str]:
        body = s.workdir / "callback.json"
        body.write_bytes(self.body)
        return body, workload.sign(prepare.webhook_secret(), self.body)

    def closed(self, s: Session, duration_s: float, est_rps: float | None) -> Run:
        body, signature = self._signed(s)
        return run_ab(
            url=s.options.target.rstrip("/") + workload.CALLBACK_PATH,
            body=body,
            content_type="application/json",
            headers={"PSP-Signature": signature},
            connections=self.connections(s),
            duration_s=duration_s,
            keepalive=False,
            plan=s.plan,
            workdir=s.workdir,
            sampler=s.sampler,
        )

    def source(self, s: Session, rate: float, duration_s: float) -> dict[str, Any]:
        body, signature = self._signed(s)
        return {
            "kind": "fixed",
            "method": "POST",
            "path": workload.CALLBACK_PATH,
            "headers": {"Content-Type": "application/json", "PSP-Signature": signature},
            "body_file": str(body),
        }

    def after_run(self, s: Session, run: Run) -> None:
        # Every request repeats the event already processed in prepare(): "processed" again
        # would be a second effect.
        s.ledger.callbacks_reprocessed += run.measurement.marks.get("processed", 0)


class CallbacksUnique(Callbacks):
    """wrk: every request a distinct, pre-signed event (ab cannot vary the body)."""

    name = "callbacks-unique"
    title = "Payment callbacks, short connections (unique pre-signed events)"
    tool = "wrk"

    def prepare(self, s: Session) -> None:
        if not s.refs:
            s.refs = payment_refs(s)
        s.ledger.callbacks_available = True

    def after_run(self, s: Session, run: Run) -> None:
        s.ledger.callbacks_processed += run.measurement.marks.get("processed", 0)
        s.ledger.callbacks_sent += run.measurement.marks.get("sent", 0)

    def _events_file(self, s: Session, count: int) -> Path:
        prefix = workload.new_event_prefix()
        s.ledger.callback_prefixes.append(prefix)
        events = workload.signed_events(prepare.webhook_secret(), s.refs, count, prefix)
        return workload.write_events(s.workdir / "events.tsv", events)

    def closed(self, s: Session, duration_s: float, est_rps: float | None) -> Run:
        path = self._events_file(
            s, _needed(est_rps, duration_s, guess_rps=1000, cap=100_000, margin=2.0)
        )
        return self.wrk(s, "callbacks", [str(path)], duration_s)

    def source(self, s: Session, rate: float, duration_s: float) -> dict[str, Any]:
        path = self._events_file(s, math.ceil(rate * duration_s) + 10)
        return {"kind": "callbacks", "file": str(path)}


def payment_refs(s: Session, count: int = 10) -> list[workload.PaymentRef]:
    """Payments for callbacks to name: real ones when orders and payments exist, else made up."""
    try:
        users = s.tokens()
        s.ensure_product()
        orders = asyncio.run(prepare.create_orders(s.options.target, users, count))
        paid = asyncio.run(prepare.create_payments(s.options.target, orders.items))
    except (PrepareError, httpx.HTTPError) as exc:
        s.notes.append(f"callbacks name made-up payments ({exc})")
        paid = prepare.Batch()
    if not paid.items:
        s.notes.append("callbacks name made-up payments: no payment could be created via the API")
        return [
            workload.PaymentRef(str(uuid.uuid4()), f"ch_lt_{uuid.uuid4().hex[:16]}", 999, "EUR")
            for _ in range(count)
        ]
    ids = [str(p["id"]) for p in paid.items]
    charges = asyncio.run(lookup_charge_ids(s.options.database_url, ids))
    return [
        workload.PaymentRef(
            str(p["id"]),
            charges.get(str(p["id"]), f"ch_lt_{str(p['id'])[:8]}"),
            int(p["amount_cents"]),
            str(p["currency"]),
        )
        for p in paid.items
    ]


SCENARIOS: dict[str, Scenario] = {
    sc.name: sc
    for sc in (
        ProductDetail(),
        Payment(),
        PaymentStatus(),
        Login(),
        Callbacks(),
        CallbacksUnique(),
    )
}


def open_rate(sc: Scenario, s: Session, closed: ScenarioResult) -> tuple[float, list[str]]:
    """The open-model arrival rate: --rate, else a fraction of the closed-loop median."""
    notes: list[str] = []
    opts = s.options
    rate = opts.rates.get(sc.name, opts.rates.get("*"))
    if rate is None:
        rps = closed.median.get("rps") or 0.0
        rate = max(1.0, round(opts.open_fraction * rps, 1))
        notes.append(f"rate = {opts.open_fraction:.0%} of the closed-loop median ({rps:,.0f}/s)")
    ceiling = s.generator_ceiling(sc.close)
    if ceiling and rate > GENERATOR_HEADROOM * ceiling:
        rate = GENERATOR_HEADROOM * ceiling
        notes.append(
            f"rate capped at {GENERATOR_HEADROOM:.0%} of the generator's measured ceiling "
            f"({ceiling:,.0f}/s)"
        )
    return float(rate), notes


def execute(sc: Scenario, s: Session) -> list[ScenarioResult]:
    """Probe, prepare, warm up, repeat closed-loop runs, then one open-model run."""
    shape = sc.shape(s).key
    closed = ScenarioResult(sc.name, sc.title, "closed", sc.tool, shape)
    opened = ScenarioResult(sc.name, sc.title, "open", "openloop", shape)
    opts = s.options
    try:
        found = asyncio.run(sc.availability(s))
        if not found.available:
            for result in (closed, opened):
                result.status = "skipped"
                result.reason = f"endpoint not on this stack: {found.reason()}"
            return [closed, opened]
        sc.prepare(s)
        est: float | None = None
        if opts.warmup_s > 0:
            warm = sc.closed(s, opts.warmup_s, None)
            warm.measurement.classify(sc.expected)
            sc.after_run(s, warm)
            est = warm.measurement.rps
        runs = []
        for _ in range(opts.repeats):
            run = sc.closed(s, opts.duration_s, est)
            run.measurement.classify(sc.expected)
            sc.after_run(s, run)
            est = run.measurement.rps
            runs.append(run)
        closed.add_runs(runs)
        if opts.open_duration_s > 0:
            rate, notes = open_rate(sc, s, closed)
            run = sc.open_run(s, rate, opts.open_duration_s)
            run.measurement.classify(sc.expected)
            sc.after_run(s, run)
            opened.add_runs([run])
            opened.extra["rate"] = rate
            opened.notes += notes
            if run.measurement.extra.get("saturated"):
                opened.notes.append(
                    "the generator fell behind its schedule (median send lag > 2 ms)"
                )
        else:
            opened.status, opened.reason = "skipped", "--open-duration 0"
    except prepare.Skip as exc:
        for result in (closed, opened):
            result.status, result.reason = "skipped", str(exc)
    except (PrepareError, LoadToolFailed, httpx.HTTPError, OSError) as exc:
        for result in (closed, opened):
            if result.status == "ok" and not result.repeats:
                result.status, result.reason = "error", f"{type(exc).__name__}: {exc}"
    for result in (closed, opened):
        limited = result.statuses.get("429", 0)
        if limited:
            result.notes.append(f"{limited} requests {RATE_LIMIT_HINT}")
        wrapped = result.marks.get("wrapped", 0)
        if wrapped:
            result.notes.append(
                f"pre-generated data ran out {wrapped} times: some requests repeated an earlier one"
            )
    if s.notes:
        closed.notes += s.notes
        s.notes = []
    return [closed, opened]
