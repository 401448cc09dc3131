"""Retries for provider calls: full jitter, an overall deadline and a retry budget.

Only calls that are safe to repeat are retried: the charge carries the provider
idempotency key (the payment id) and status queries are reads. A call without
a key gets exactly one attempt, whatever the error.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from services.payment.breaker import BreakerOpen, Clock, ProviderBreaker
from services.payment.metrics import RETRIES, RETRY_BUDGET_EXHAUSTED

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_s: float
    cap_s: float
    deadline_s: float

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^(retry-1))] (AWS architecture blog)."""
        return rng.uniform(0.0, min(self.cap_s, self.base_s * 2 ** (retry - 1)))


class RetryBudget:
    """Retries may add at most `ratio` of the calls (plus a small floor) over a sliding window.

    Finagle's retry budget: when the provider is failing for everyone, retries stop
    multiplying the load; a lone failure still gets its retries from the floor.
    """

    def __init__(
        self, *, ratio: float, min_per_s: float, window_s: float, clock: Clock = time.monotonic
    ) -> None:
        self.ratio = ratio
        self.floor = min_per_s * window_s
        self.window_s = window_s
        self._clock = clock
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        for times in (self._calls, self._retries):
            while times and times[0] < horizon:
                times.popleft()

    def record_call(self) -> None:
        now = self._clock()
        self._prune(now)
        self._calls.append(now)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        now = self._clock()
        self._prune(now)
        if len(self._retries) >= self.floor + self.ratio * len(self._calls):
            return False
        self._retries.append(now)
        return True


async def call_with_retries(
    attempt: Callable[[float], Awaitable[T]],
    *,
    provider: str,
    operation: str,
    breaker: ProviderBreaker,
    policy: RetryPolicy,
    budget: RetryBudget,
    idempotent: bool,
    is_retryable: Callable[[Exception], bool],
    history: list[Exception],
    rng: random.Random,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    attempt_timeout_s: float,
) -> T:
    """Run `attempt(timeout_s)` through the breaker, retrying retryable errors.

    Each failed attempt's error is appended to `history` (the caller needs to know
    whether any attempt may have reached the provider). Raises the last error,
    BreakerOpen when the breaker refuses, or TimeoutError when the deadline is spent
    before an attempt could start.
    """
    deadline = clock() + policy.deadline_s
    max_attempts = policy.max_attempts if idempotent else 1
    budget.record_call()
    number = 0
    while True:
        number += 1
        remaining = deadline - clock()
        if remaining <= 0:
            raise TimeoutError(f"{operation}: deadline of {policy.deadline_s} s spent")
        timeout_s = min(attempt_timeout_s, remaining)
        try:
            return await breaker.call(functools.partial(attempt, timeout_s))
        except BreakerOpen:
            raise
        except Exception as exc:
            history.append(exc)
            if number >= max_attempts or not is_retryable(exc):
                raise
            delay = policy.backoff_s(number, rng)
            if clock() + delay >= deadline:
                raise
            if not budget.try_spend():
                RETRY_BUDGET_EXHAUSTED.labels(provider, operation).inc()
                raise
            RETRIES.labels(provider, operation).inc()
            await sleep(delay)
