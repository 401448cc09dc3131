"""The payment provider behind an adapter: the sandbox today, a real PSP tomorrow.

The domain talks to `PaymentProvider` only. Errors say whether the provider may
have processed the request (`maybe_processed`): an answer we could not read is an
unknown outcome, never a failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from services.payment.metrics import PROVIDER_ATTEMPTS, PROVIDER_LATENCY

log = logging.getLogger("shopstack.payment.provider")

ChargeStatus = Literal["succeeded", "failed"]
REPLY_LOG_CHARS = 500


class ProviderError(Exception):
    """A provider call did not give a usable answer."""

    maybe_processed: bool = True
    retryable: bool = False
    counts_as_failure: bool = True  # for the circuit breaker

    def __init__(self, message: str, *, reply: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply[:REPLY_LOG_CHARS]
        self.status = status


class ProviderRejected(ProviderError):
    """A 4xx: the provider refused the request and did nothing. Retrying cannot help."""

    maybe_processed = False
    counts_as_failure = False


class ProviderUnavailable(ProviderError):
    """A 5xx or 429: the provider is in trouble; it may have done the work (5xx)."""

    retryable = True


class ProviderUnreachable(ProviderError):
    """Could not connect: the request never left."""

    maybe_processed = False
    retryable = True


class ProviderConnectionLost(ProviderError):
    """The connection broke after the request was sent: the reply is lost."""

    retryable = True


class ProviderTimeout(ProviderError):
    """No answer in time: unknown outcome. Not retried inline (the settle job asks later)."""


@dataclass(frozen=True)
class ProviderCharge:
    id: str
    status: ChargeStatus
    amount_cents: int
    currency: str
    reference: str


class PaymentProvider(Protocol):
    """What payment needs from a PSP."""

    name: str

    async def create_charge(
        self,
        *,
        idempotency_key: str,
        amount_cents: int,
        currency: str,
        reference: str,
        timeout_s: float,
    ) -> ProviderCharge:
        """Charge once per idempotency key; the same key returns the same charge."""
        ...

    async def find_charges(self, *, reference: str, timeout_s: float) -> list[ProviderCharge]:
        """Charges the provider holds for our reference (the payment id)."""
        ...

    async def close(self) -> None: ...


class _ChargeDoc(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    status: ChargeStatus
    amount_cents: int
    currency: str
    reference: str


class _ChargeListDoc(BaseModel):
    model_config = ConfigDict(extra="ignore")

    items: list[_ChargeDoc]


def _charge(doc: _ChargeDoc) -> ProviderCharge:
    return ProviderCharge(doc.id, doc.status, doc.amount_cents, doc.currency, doc.reference)


class SandboxProvider:
    """The PSP sandbox's HTTP API over a pooled aiohttp session."""

    def __init__(
        self, *, name: str, base_url: str, pool_size: int, connect_timeout_s: float
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        connector = aiohttp.TCPConnector(
            limit=pool_size, limit_per_host=pool_size, keepalive_timeout=4.0
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
        )

    async def close(self) -> None:
        await self.session.close()

    def _timeout(self, timeout_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=timeout_s,
            connect=min(self.connect_timeout_s, timeout_s),
            sock_connect=min(self.connect_timeout_s, timeout_s),
        )

    async def _request(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        timeout_s: float,
        json: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        started = time.perf_counter()
        outcome = "error"
        try:
            async with self.session.request(
                method,
                self.base_url + path,
                json=json,
                headers=headers,
                params=params,
                timeout=self._timeout(timeout_s),
            ) as resp:
                body = await resp.read()
                outcome = str(resp.status)
                return resp.status, body
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            outcome = "unreachable"
            raise ProviderUnreachable(f"{self.name}: cannot connect", reply=repr(exc)) from exc
        except TimeoutError as exc:
            outcome = "timeout"
            raise ProviderTimeout(f"{self.name}: no answer in {timeout_s:.2f} s") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            outcome = "connection-lost"
            raise ProviderConnectionLost(
                f"{self.name}: connection lost before the reply", reply=repr(exc)
            ) from exc
        except aiohttp.ClientError as exc:
            outcome = "connection-lost"
            raise ProviderConnectionLost(
                f"{self.name}: {type(exc).__name__}", reply=repr(exc)
            ) from exc
        finally:
            PROVIDER_ATTEMPTS.labels(self.name, operation, outcome).inc()
            PROVIDER_LATENCY.labels(self.name, operation).observe(time.perf_counter() - started)

    def _raise_for_status(self, status: int, body: bytes) -> None:
        reply = body[:REPLY_LOG_CHARS].decode("utf-8", "replace")
        if status >= 500:
            raise ProviderUnavailable(f"{self.name} answered {status}", reply=reply, status=status)
        if status == 429:
            raise ProviderUnavailable(f"{self.name} is throttling", reply=reply, status=status)
        if status == 409:
            # The provider is still working on this idempotency key: ask again later.
            raise ProviderUnavailable(f"{self.name}: key in use", reply=reply, status=status)
        raise ProviderRejected(
            f"{self.name} rejected the request ({status})", reply=reply, status=status
        )

    async def create_charge(
        self,
        *,
        idempotency_key: str,
        amount_cents: int,
        currency: str,
        reference: str,
        timeout_s: float,
    ) -> ProviderCharge:
        status, body = await self._request(
            "charge",
            "POST",
            "/v1/charges",
            timeout_s=timeout_s,
            json={"amount_cents": amount_cents, "currency": currency, "reference": reference},
            headers={"Idempotency-Key": idempotency_key},
        )
        if status not in (200, 201):
            self._raise_for_status(status, body)
        try:
            return _charge(_ChargeDoc.model_validate_json(body))
        except ValidationError as exc:
            raise ProviderUnavailable(
                f"{self.name}: unreadable charge", reply=body.decode("utf-8", "replace")
            ) from exc

    async def find_charges(self, *, reference: str, timeout_s: float) -> list[ProviderCharge]:
        status, body = await self._request(
            "lookup", "GET", "/v1/charges", timeout_s=timeout_s, params={"reference": reference}
        )
        if status != 200:
            self._raise_for_status(status, body)
        try:
            return [_charge(doc) for doc in _ChargeListDoc.model_validate_json(body).items]
        except ValidationError as exc:
            raise ProviderUnavailable(
                f"{self.name}: unreadable charge list", reply=body.decode("utf-8", "replace")
            ) from exc
