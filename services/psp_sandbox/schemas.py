"""PSP sandbox request and response models."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from services.common.jsontypes import JSON_INTEGER

ChargeStatus = Literal["succeeded", "failed"]
# A fault the sandbox applies to one charge request:
#   error   503 before charging        timeout  charge, then never answer in time
#   reset   charge, then drop the connection mid-reply
#   decline charge with status failed  reject   400 before charging
Fault = Literal["error", "timeout", "reset", "decline", "reject"]
Rate = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]


class ChargeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_cents: Annotated[StrictInt, Field(ge=1, le=10**12), JSON_INTEGER]
    currency: Annotated[StrictStr, Field(pattern=r"^[A-Z]{3}$")]
    reference: Annotated[StrictStr, Field(min_length=1, max_length=255)]


class Charge(BaseModel):
    id: str
    status: ChargeStatus
    amount_cents: int
    currency: str
    reference: str
    created: int


class ChargeList(BaseModel):
    items: list[Charge]


class Faults(BaseModel):
    """The faults in force (env defaults overridden at run time)."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: Annotated[StrictInt, Field(ge=0, le=60_000), JSON_INTEGER] = 0
    error_rate: Rate = 0.0
    timeout_rate: Rate = 0.0
    reset_rate: Rate = 0.0
    decline_rate: Rate = 0.0
    reject_rate: Rate = 0.0
    duplicate_rate: Rate = 0.0
    out_of_order_rate: Rate = 0.0
    callback_drop_rate: Rate = 0.0
    callback_delay_ms: Annotated[StrictInt, Field(ge=0, le=600_000), JSON_INTEGER] = 0


class FaultsIn(BaseModel):
    """Body of POST /_sandbox/faults: the fields given replace the ones in force.

    `next_faults` queues faults for the next charge requests, in order, ahead of the
    rates (deterministic tests); `reset: true` first returns everything to the env defaults.
    """

    model_config = ConfigDict(extra="forbid")

    reset: StrictBool = False
    latency_ms: Annotated[StrictInt, Field(ge=0, le=60_000), JSON_INTEGER] | None = None
    error_rate: Rate | None = None
    timeout_rate: Rate | None = None
    reset_rate: Rate | None = None
    decline_rate: Rate | None = None
    reject_rate: Rate | None = None
    duplicate_rate: Rate | None = None
    out_of_order_rate: Rate | None = None
    callback_drop_rate: Rate | None = None
    callback_delay_ms: Annotated[StrictInt, Field(ge=0, le=600_000), JSON_INTEGER] | None = None
    next_faults: Annotated[list[Fault], Field(max_length=1000)] | None = None


class FaultsOut(Faults):
    next_faults: list[Fault]


class Stats(BaseModel):
    """Counters: charge requests received and charges created (in total or per reference)."""

    reference: str | None
    charge_requests: int
    charges_created: int
    callbacks_sent: int
    callbacks_failed: int
