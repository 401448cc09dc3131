"""A circuit breaker per provider: aiobreaker's state machine behind a small wrapper.

aiobreaker (1.2.0, 2021) counts consecutive failures, keeps the closed / open /
half-open state and tells listeners about changes; we keep that. Two things it
gets wrong for us are taken out of its hands:

- Time. It stamps `datetime.utcnow()` when it opens (the wall clock, which jumps;
  deprecated since Python 3.12) and compares against it when called. Our subclass
  stamps an injectable monotonic clock instead, and the wrapper alone decides when
  the open period is over, so aiobreaker's open-state code never runs.
- Half-open admission. aiobreaker lets every concurrent caller through once the
  timeout passes. The wrapper moves the breaker to half-open itself and admits
  exactly one trial call; everyone else is refused at once until the trial settles.
  The admission check is synchronous, so on one event loop it cannot race.

Breakers are per worker process: each worker learns on its own that the provider
is down (at most `fail_max` failed calls per worker).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from aiobreaker import CircuitBreaker, CircuitBreakerError, CircuitBreakerListener
from aiobreaker import CircuitBreakerState as _State

from services.payment.metrics import BREAKER_REJECTIONS, BREAKER_STATE, BREAKER_TRANSITIONS

log = logging.getLogger("shopstack.payment.breaker")

T = TypeVar("T")
Clock = Callable[[], float]

STATE_NAMES = {_State.CLOSED: "closed", _State.HALF_OPEN: "half-open", _State.OPEN: "open"}
STATE_VALUES = {"closed": 0, "half-open": 1, "open": 2}


class BreakerOpen(Exception):
    """The breaker refused the call; the provider was not touched."""

    def __init__(self, provider: str, retry_after_s: float) -> None:
        super().__init__(f"circuit for {provider} is open")
        self.provider = provider
        self.retry_after_s = retry_after_s


class _MonotonicCircuitBreaker(CircuitBreaker):  # type: ignore[misc]
    """aiobreaker with the wall clock taken out: opening stamps our clock."""

    def __init__(self, *, clock: Clock, **kwargs: Any) -> None:
        self._clock = clock
        self.opened_at: float = -math.inf
        super().__init__(**kwargs)

    def open(self) -> None:
        if self._state_storage.state is _State.OPEN:
            # A late failure of a call admitted before the breaker opened: the open
            # period already runs and must not be extended by stragglers.
            return
        self.opened_at = self._clock()
        self._state_storage.opened_at = None
        self.state = self._state_storage.state = _State.OPEN

    @property
    def opens_at(self) -> None:
        # aiobreaker derives this from the wall clock; nothing of ours reads it.
        return None


class _MetricsListener(CircuitBreakerListener):  # type: ignore[misc]
    def __init__(self, provider: str) -> None:
        self.provider = provider

    def state_change(self, breaker: Any, old: Any, new: Any) -> None:
        name = STATE_NAMES[new.state]
        BREAKER_STATE.labels(self.provider).set(STATE_VALUES[name])
        BREAKER_TRANSITIONS.labels(self.provider, name).inc()
        previous = STATE_NAMES.get(getattr(old, "state", None), "none")
        log.warning(
            "circuit breaker state changed",
            extra={"provider": self.provider, "from": previous, "to": name},
        )


class ProviderBreaker:
    """Guards calls to one provider: fail fast while open, one trial call when half-open."""

    def __init__(
        self,
        provider: str,
        *,
        fail_max: int,
        reset_timeout_s: float,
        is_failure: Callable[[BaseException], bool],
        clock: Clock = time.monotonic,
    ) -> None:
        self.provider = provider
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._trial_running = False
        self._breaker = _MonotonicCircuitBreaker(
            clock=clock,
            fail_max=fail_max,
            timeout_duration=timedelta(seconds=reset_timeout_s),
            exclude=[lambda exc: not is_failure(exc)],
            listeners=[_MetricsListener(provider)],
            name=provider,
        )
        BREAKER_STATE.labels(provider).set(0)

    @property
    def state(self) -> str:
        """closed, open or half-open (an open breaker past its timeout still reads open)."""
        return STATE_NAMES[self._breaker.current_state]

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far."""
        count: int = self._breaker.fail_counter
        return count

    def retry_after_s(self) -> float:
        """How long until a call may be let through again."""
        if self._breaker.current_state is _State.OPEN:
            elapsed = self._clock() - self._breaker.opened_at
            return max(0.0, self.reset_timeout_s - elapsed)
        if self._trial_running:
            return self.reset_timeout_s
        return 0.0

    def check(self) -> None:
        """Raise BreakerOpen if a call made now would be refused (changes nothing)."""
        if self.retry_after_s() > 0:
            BREAKER_REJECTIONS.labels(self.provider).inc()
            raise BreakerOpen(self.provider, self.retry_after_s())

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` under the breaker; BreakerOpen if refused, else fn's result or error."""
        is_trial = self._admit()
        try:
            result: T = await self._breaker.call_async(fn)
            return result
        except CircuitBreakerError as exc:
            # aiobreaker replaces the failure that trips the breaker with its own error;
            # callers need the real one (a timeout means something else than a 503).
            cause = exc.__cause__
            if isinstance(cause, Exception):
                raise cause from None
            raise BreakerOpen(self.provider, self.retry_after_s()) from None
        finally:
            if is_trial:
                self._trial_running = False

    def _admit(self) -> bool:
        """Let the call through (True when it is the half-open trial) or raise BreakerOpen."""
        state = self._breaker.current_state
        if state is _State.CLOSED:
            return False
        if state is _State.OPEN:
            if self._clock() - self._breaker.opened_at < self.reset_timeout_s:
                BREAKER_REJECTIONS.labels(self.provider).inc()
                raise BreakerOpen(self.provider, self.retry_after_s())
            self._breaker.half_open()
        if self._trial_running:
            BREAKER_REJECTIONS.labels(self.provider).inc()
            raise BreakerOpen(self.provider, self.reset_timeout_s)
        self._trial_running = True
        return True
