"""Payment request and response models (the API.md contract)."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from services.common.jsontypes import JSON_INTEGER, NO_CONTROL_CHARACTERS

PaymentStatus = Literal["succeeded", "failed", "pending"]
# Idempotency-Key: 1..255 visible ASCII characters (and spaces).
KEY_PATTERN = r"^[\x20-\x7e]{1,255}$"


class PaymentIn(BaseModel):
    """Body of POST /api/v1/payments: only the order; amount and currency come from it."""

    model_config = ConfigDict(extra="forbid")

    order_id: uuid.UUID


class Payment(BaseModel):
    id: uuid.UUID
    order_id: uuid.UUID
    status: PaymentStatus
    amount_cents: int
    currency: str


class CallbackData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    charge_id: Annotated[
        StrictStr, Field(min_length=1, max_length=255, pattern=NO_CONTROL_CHARACTERS)
    ]
    payment_id: uuid.UUID
    amount_cents: Annotated[StrictInt, Field(ge=0, le=10**12), JSON_INTEGER]
    currency: Annotated[StrictStr, Field(pattern=r"^[A-Z]{3}$")]


class CallbackEvent(BaseModel):
    """A provider event; fields a provider adds later are ignored, not refused."""

    model_config = ConfigDict(extra="ignore")

    id: Annotated[StrictStr, Field(min_length=1, max_length=255, pattern=NO_CONTROL_CHARACTERS)]
    type: Annotated[StrictStr, Field(min_length=1, max_length=100, pattern=NO_CONTROL_CHARACTERS)]
    created: Annotated[StrictInt, Field(ge=0, le=2**53 - 1), JSON_INTEGER]
    data: CallbackData


class CallbackReply(BaseModel):
    status: Literal["processed", "duplicate", "ignored"]
