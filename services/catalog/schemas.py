"""Catalog request and response models (the API.md contract)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    model_validator,
)

from services.common.identity import USER_ID_PATTERN
from services.common.jsontypes import JSON_INTEGER, NO_CONTROL_CHARACTERS, NO_NUL, UtcDateTime

# Ids stay within I-JSON's exact integers (RFC 7493: +-(2**53 - 1)), which every JSON
# client, JavaScript's included, reads without rounding (Postgres stores them as bigint).
MAX_ID = 2**53 - 1
ProductId = Annotated[int, Field(ge=1, le=MAX_ID)]
Cents = Annotated[StrictInt, Field(ge=0, le=10**12), JSON_INTEGER]


class FlashSale(BaseModel):
    """A sale price open from `starts_at` (inclusive) to `ends_at` (exclusive); `ends_at`
    must come after `starts_at` (else 422)."""

    model_config = ConfigDict(extra="forbid")

    price_cents: Cents
    starts_at: UtcDateTime
    ends_at: UtcDateTime
    per_user_limit: Annotated[StrictInt, Field(ge=1, le=1000), JSON_INTEGER]

    @model_validator(mode="after")
    def _window(self) -> FlashSale:
        if self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self


class ProductIn(BaseModel):
    """Body of PUT /api/v1/admin/products/{id}: every Product field but id and updated_at."""

    model_config = ConfigDict(extra="forbid")

    sku: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._\-]+$")]
    name: Annotated[StrictStr, Field(min_length=1, max_length=200, pattern=NO_CONTROL_CHARACTERS)]
    description: Annotated[StrictStr, Field(max_length=10_000, pattern=NO_NUL)] = ""
    price_cents: Cents
    currency: Annotated[StrictStr, Field(pattern=r"^[A-Z]{3}$")]
    stock: Annotated[StrictInt, Field(ge=0, le=1_000_000_000), JSON_INTEGER]
    flash_sale: FlashSale | None = None


class Product(ProductIn):
    id: ProductId
    updated_at: AwareDatetime


class ProductPage(BaseModel):
    items: list[Product]
    next: int | None


OrderStatus = Literal["reserved", "paid", "expired", "cancelled"]


class OrderIn(BaseModel):
    """Body of POST /api/v1/orders. Price, status and owner never come from the client."""

    model_config = ConfigDict(extra="forbid")

    product_id: Annotated[StrictInt, Field(ge=1, le=MAX_ID), JSON_INTEGER]
    quantity: Annotated[StrictInt, Field(ge=1, le=10), JSON_INTEGER]


class Order(BaseModel):
    """An order as its owner sees it."""

    id: UUID
    status: OrderStatus
    product_id: ProductId
    quantity: int
    amount_cents: int
    currency: str
    expires_at: AwareDatetime


class InternalOrder(Order):
    """An order as the payment service sees it (GET /internal/v1/orders/{id})."""

    user_id: str
    held_by: UUID | None


class PaymentRef(BaseModel):
    """Body of the internal paid / release calls."""

    model_config = ConfigDict(extra="forbid")

    payment_id: UUID


class HoldRef(PaymentRef):
    """Body of the internal hold call. With `user_id` (the paying user), an order of
    anyone else is answered 404, so the payment service checks the owner, learns the
    amount and holds the order in one call."""

    user_id: str | None = Field(default=None, pattern=USER_ID_PATTERN)


MAX_OUTCOMES = 500


class OrderOutcome(PaymentRef):
    """One payment outcome for the catalog: `paid` (charge succeeded) or `release`
    (charge failed: drop the payment's hold)."""

    order_id: UUID
    kind: Literal["paid", "release"]


class OrderOutcomes(BaseModel):
    """Body of POST /internal/v1/order-outcomes: the payment outbox's batch."""

    model_config = ConfigDict(extra="forbid")

    items: list[OrderOutcome] = Field(min_length=1, max_length=MAX_OUTCOMES)


class OrderOutcomeResult(BaseModel):
    """What one item got: `status` 200 with the order, or 404 / 409 with the problem
    its own paid / release call would have answered."""

    order_id: UUID
    payment_id: UUID
    kind: Literal["paid", "release"]
    status: int
    order: InternalOrder | None
    problem: dict[str, Any] | None


class OrderOutcomeResults(BaseModel):
    results: list[OrderOutcomeResult]
