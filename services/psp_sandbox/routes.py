"""Sandbox HTTP routes: the provider API (/v1) and its controls (/_sandbox)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response

from services.common.app import JSONResponse
from services.common.asgi import Receive, Scope, Send
from services.common.errors import ValidationProblem
from services.common.fastlane import (
    FastReply,
    FastRequest,
    FastRoute,
    framework_reply,
    parse_body,
)
from services.common.openapi import link, problem
from services.psp_sandbox import domain
from services.psp_sandbox.schemas import Charge, ChargeIn, ChargeList, FaultsIn, FaultsOut, Stats
from services.psp_sandbox.state import SandboxState

router = APIRouter(tags=["psp-sandbox"])


async def sandbox_state(request: Request) -> SandboxState:
    state: SandboxState = request.state.app_state
    return state


State = Annotated[SandboxState, Depends(sandbox_state)]
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
]


class HangingResponse(Response):
    """A black hole: answers only after `hang_s`, and not at all if the client hangs up first."""

    def __init__(self, body: bytes, *, status_code: int, hang_s: float) -> None:
        super().__init__(body, status_code=status_code, media_type="application/json")
        self.hang_s = hang_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with asyncio.timeout(self.hang_s):
                while (await receive())["type"] != "http.disconnect":
                    pass
            return
        except TimeoutError:
            pass
        await super().__call__(scope, receive, send)


class TruncatedResponse(Response):
    """Sends the status and half the body, then drops the connection (work done, reply lost)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": self.status_code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self.body)).encode()),
                ],
            }
        )
        # more_body=True and then returning: the server must close the connection.
        await send(
            {
                "type": "http.response.body",
                "body": self.body[: len(self.body) // 2],
                "more_body": True,
            }
        )


_CHARGE_LINKS = {
    "GetCharge": link(
        "/v1/charges/{charge_id}",
        "get",
        "the charge",
        parameters={"charge_id": "$response.body#/id"},
    ),
    "ListCharges": link(
        "/v1/charges",
        "get",
        "the charges of its reference",
        parameters={"reference": "$response.body#/reference"},
    ),
}


@router.post(
    "/v1/charges",
    response_model=Charge,
    status_code=201,
    responses={
        200: {
            "model": Charge,
            "description": "The charge this key already created",
            "links": _CHARGE_LINKS,
        },
        201: {"description": "Charged", "links": _CHARGE_LINKS},
        400: problem(400, "rejected by a `reject` fault", code="charge-rejected"),
        503: problem(503, "an `error` fault: nothing charged", code="provider-error"),
    },
)
async def create_charge(
    request: Request, data: ChargeIn, idempotency_key: IdempotencyKey = None
) -> Response:
    return await framework_reply(charge, request)


async def charge(request: FastRequest) -> FastReply:
    """The charge route itself (the fast lane serves it; see FAST_ROUTES)."""
    state: SandboxState = request.state
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        error = {"loc": ["header", "Idempotency-Key"], "msg": "1..255 characters"}
        error["type"] = "string_length"
        raise ValidationProblem("the request is not valid", extra={"errors": [error]})
    outcome = await domain.create_charge(
        store=state.store,
        in_force=state.faults,
        rng=state.rng,
        data=parse_body(ChargeIn, request.body),
        idempotency_key=key,
    )
    if outcome.created:
        state.dispatcher.kick()
    body = outcome.body
    status = 201 if outcome.created else 200
    if outcome.fault == "timeout":
        hang_s = state.sandbox_settings.psp_hang_s
        return FastReply(
            status, body, custom=HangingResponse(body, status_code=status, hang_s=hang_s)
        )
    if outcome.fault == "reset":
        return FastReply(status, body, custom=TruncatedResponse(body, status_code=status))
    return FastReply(status, body)


FAST_ROUTES = [FastRoute("POST", "/v1/charges", charge)]


@router.get("/v1/charges", response_model=ChargeList)
async def list_charges(
    state: State, reference: Annotated[str, Query(min_length=1, max_length=255)]
) -> ChargeList:
    """Charges created for a reference (how a client settles a charge whose reply it lost)."""
    return ChargeList(items=await domain.charges_for(store=state.store, reference=reference))


@router.get(
    "/v1/charges/{charge_id}",
    response_model=Charge,
    responses={404: problem(404, "no charge ch_0b0e...")},
)
async def get_charge(
    state: State, charge_id: Annotated[str, Path(pattern=r"^ch_[0-9a-f]{32}$")]
) -> Charge:
    return await domain.get_charge(store=state.store, charge_id=charge_id)


@router.get("/_sandbox/faults", response_model=FaultsOut)
async def get_faults(state: State) -> FaultsOut:
    return await domain.current_faults(store=state.store, settings=state.sandbox_settings)


@router.post("/_sandbox/faults", response_model=FaultsOut)
async def set_faults(state: State, data: FaultsIn) -> FaultsOut:
    return await domain.update_faults(store=state.store, settings=state.sandbox_settings, data=data)


@router.get("/_sandbox/stats", response_model=Stats)
async def stats(
    state: State, reference: Annotated[str | None, Query(min_length=1, max_length=255)] = None
) -> Stats:
    """Charge requests and charges created, in total or for one reference."""
    counts = await state.store.stats(reference)
    return Stats(reference=reference, **counts)


@router.post("/_sandbox/reset")
async def reset(state: State) -> JSONResponse:
    """Forget every charge, key, fault and queued callback (tests)."""
    removed = await state.store.reset()
    return JSONResponse({"removed_keys": removed})
