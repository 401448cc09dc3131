"""Payment HTTP routes: parse, call the domain, shape the reply (and replay it)."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from pydantic import ValidationError

from services.common.errors import (
    PROBLEM_CONTENT_TYPE,
    Problem,
    ValidationProblem,
    problem_bytes,
)
from services.common.fastlane import FastReply, FastRequest, FastRoute
from services.common.identity import Caller, current_caller
from services.payment import domain, events, idempotency
from services.payment.idempotency import REPLAYED_HEADER, KeyClaim, StoredResponse
from services.payment.schemas import KEY_PATTERN, CallbackEvent, CallbackReply, Payment, PaymentIn
from services.payment.state import PaymentState
from services.payment.webhooks import verify_signature

router = APIRouter(prefix="/api/v1/payments", tags=["payments"])

_CALLBACK_REPLIES = {
    outcome: b'{"status":"' + outcome.encode() + b'"}'
    for outcome in ("processed", "duplicate", "ignored")
}
_PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}


async def payment_state(request: Request) -> PaymentState:
    state: PaymentState = request.state.app_state
    return state


State = Annotated[PaymentState, Depends(payment_state)]
CallerDep = Annotated[Caller, Depends(current_caller)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=KEY_PATTERN,
        description="1..255 printable ASCII characters; scoped to the caller, kept >= 24 h",
    ),
]


def stored_problem(exc: Problem) -> StoredResponse:
    body = problem_bytes(exc.status, exc.code, exc.detail, title=exc.title, **exc.extra)
    headers = {
        "content-type": PROBLEM_CONTENT_TYPE,
        **{k.lower(): v for k, v in exc.headers.items()},
    }
    return StoredResponse(exc.status, headers, body)


def as_response(stored: StoredResponse, *, replayed: bool = False) -> Response:
    headers = {k: v for k, v in stored.headers.items() if k != "content-type"}
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    return Response(
        stored.body,
        status_code=stored.status,
        headers=headers,
        media_type=stored.headers.get("content-type", "application/json"),
    )


@router.post(
    "",
    status_code=201,
    response_model=Payment,
    responses={
        404: _PROBLEM,
        409: _PROBLEM,
        422: _PROBLEM,
        503: {"description": "provider or catalog unavailable (Retry-After)", **_PROBLEM},
    },
)
async def create_payment(
    request: Request,
    state: State,
    caller: CallerDep,
    data: PaymentIn,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Pay an order (the amount comes from the order). Safe to retry with an Idempotency-Key."""
    if idempotency_key is None:
        body = await domain.create_payment(
            state=state, caller=caller, order_id=data.order_id, claim=None
        )
        return Response(body, status_code=201, media_type="application/json")
    begun = await idempotency.begin(
        state.db,
        user_id=caller.user_id,
        key=idempotency_key,
        fingerprint=idempotency.fingerprint("POST", request.url.path, data.model_dump(mode="json")),
        lock_s=state.config.payment_idempotency_lock_s,
    )
    if isinstance(begun, StoredResponse):
        return as_response(begun, replayed=True)
    return await _run_claimed(state, caller, data, begun)


async def _run_claimed(
    state: PaymentState, caller: Caller, data: PaymentIn, claim: KeyClaim
) -> Response:
    try:
        body = await domain.create_payment(
            state=state, caller=caller, order_id=data.order_id, claim=claim
        )
    except Problem as exc:
        if exc.status >= 500:
            # Nothing irreversible happened: forget the key so a retry can succeed.
            await idempotency.forget(state.db, claim)
            raise
        stored = stored_problem(exc)
        await idempotency.complete(state.db, claim, stored)
        return as_response(stored)
    # Any other error leaves the key locked: after the lock timeout a retry resumes the
    # same payment id, which the provider's own idempotency makes safe.
    return Response(body, status_code=201, media_type="application/json")


@router.get("/{payment_id}", response_model=Payment, responses={404: _PROBLEM})
async def get_payment(
    state: State, caller: CallerDep, payment_id: Annotated[uuid.UUID, Path()]
) -> Response:
    """The caller's own payment; 404 for anyone else's."""
    body = await domain.get_payment(state=state, caller=caller, payment_id=payment_id)
    return Response(body, media_type="application/json")


@router.post(
    "/callbacks/psp",
    response_model=CallbackReply,
    responses={400: {"description": "bad or missing signature", **_PROBLEM}, 422: _PROBLEM},
)
async def psp_callback(request: Request, state: State) -> Response:
    """Provider webhook, signed with PSP-Signature; a repeated event id is a no-op."""
    reply = await callback(FastRequest(state, request.headers, await request.body()))
    return Response(reply.body, status_code=reply.status, media_type="application/json")


async def callback(request: FastRequest) -> FastReply:
    """The callback route itself (the fast lane serves it; see FAST_ROUTES)."""
    state: PaymentState = request.state
    raw = request.body
    verify_signature(
        request.headers.get("psp-signature"),
        raw,
        secret=state.webhook_secret,
        tolerance_s=state.config.psp_webhook_tolerance_s,
        now=time.time(),
    )
    try:
        event = CallbackEvent.model_validate_json(raw)
    except ValidationError as exc:
        errors = [
            {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_input=False)
        ]
        raise ValidationProblem("the event is not valid", extra={"errors": errors}) from None
    outcome = await events.process_event(state, event)
    return FastReply(200, _CALLBACK_REPLIES[outcome])


FAST_ROUTES = [FastRoute("POST", "/api/v1/payments/callbacks/psp", callback)]
