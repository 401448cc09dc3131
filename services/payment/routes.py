"""Payment HTTP routes: parse, call the domain, shape the reply (and replay it)."""

from __future__ import annotations

import re
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
from services.common.fastlane import (
    FastReply,
    FastRequest,
    FastRoute,
    framework_reply,
    parse_body,
)
from services.common.identity import Caller, caller_from, current_caller
from services.common.openapi import RATE_LIMITED, inline_schema, link
from services.payment import domain, events, idempotency
from services.payment.idempotency import REPLAYED_HEADER, KeyClaim, StoredResponse
from services.payment.schemas import KEY_PATTERN, CallbackEvent, CallbackReply, Payment, PaymentIn
from services.payment.state import PaymentState
from services.payment.webhooks import MAX_HEADER_CHARS, verify_signature

PAYMENTS_PATH = "/api/v1/payments"
router = APIRouter(prefix=PAYMENTS_PATH, tags=["payments"])
_KEY = re.compile(KEY_PATTERN)

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


def stored_reply(stored: StoredResponse, *, replayed: bool = False) -> FastReply:
    headers = {k: v for k, v in stored.headers.items() if k != "content-type"}
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    content_type = stored.headers.get("content-type", "application/json")
    return FastReply(stored.status, stored.body, headers, content_type.encode())


_CALLBACK_DOC: dict[str, Any] = {
    "parameters": [
        {
            "name": "PSP-Signature",
            "in": "header",
            "required": True,
            "description": (
                't=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>, one v1 per '
                "secret the provider signs with (at most 8); t within "
                "SHOPSTACK_PSP_WEBHOOK_TOLERANCE_S of now. Anything else: 400 bad-signature."
            ),
            "schema": {
                "type": "string",
                "maxLength": MAX_HEADER_CHARS,
                "pattern": r"^t=[0-9]{1,12}(,v1=[0-9a-f]{64}){1,8}$",
            },
        }
    ],
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": inline_schema(CallbackEvent)}},
    },
}


@router.post(
    "",
    status_code=201,
    response_model=Payment,
    responses={
        201: {
            "description": "Created (or, with Idempotent-Replayed: true, the first reply)",
            "links": {
                "GetPayment": link(
                    PAYMENTS_PATH + "/{payment_id}",
                    "get",
                    "the payment",
                    parameters={"payment_id": "$response.body#/id"},
                )
            },
        },
        404: _PROBLEM,
        409: _PROBLEM,
        422: _PROBLEM,
        503: {"description": "provider or catalog unavailable (Retry-After)", **_PROBLEM},
        **RATE_LIMITED,
    },
)
async def create_payment(
    request: Request,
    caller: CallerDep,
    data: PaymentIn,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Pay an order (the amount comes from the order). Safe to retry with an Idempotency-Key."""
    return await framework_reply(create, request)


async def create(request: FastRequest) -> FastReply:
    """The payment creation route itself (the fast lane serves it; see FAST_ROUTES)."""
    state: PaymentState = request.state
    caller = caller_from(request.headers)
    key = request.headers.get("idempotency-key")
    if key is not None and not _KEY.match(key):
        error = {"loc": ["header", "Idempotency-Key"], "msg": "1..255 printable ASCII characters"}
        error["type"] = "string_pattern_mismatch"
        raise ValidationProblem("the request is not valid", extra={"errors": [error]})
    data = parse_body(PaymentIn, request.body)
    if key is None:
        body = await domain.create_payment(
            state=state, caller=caller, order_id=data.order_id, claim=None
        )
        return FastReply(201, body)
    begun = await idempotency.begin(
        state.db,
        user_id=caller.user_id,
        key=key,
        fingerprint=idempotency.fingerprint("POST", PAYMENTS_PATH, data.model_dump(mode="json")),
        lock_s=state.config.payment_idempotency_lock_s,
    )
    if isinstance(begun, StoredResponse):
        return stored_reply(begun, replayed=True)
    return await _run_claimed(state, caller, data, begun)


async def _run_claimed(
    state: PaymentState, caller: Caller, data: PaymentIn, claim: KeyClaim
) -> FastReply:
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
        return stored_reply(stored)
    # Any other error leaves the key locked: after the lock timeout a retry resumes the
    # same payment id, which the provider's own idempotency makes safe.
    return FastReply(201, body)


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
    openapi_extra=_CALLBACK_DOC,
)
async def psp_callback(request: Request) -> Response:
    """Provider webhook, signed with PSP-Signature; a repeated event id is a no-op."""
    return await framework_reply(callback, request)


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


FAST_ROUTES = [
    FastRoute("POST", PAYMENTS_PATH, create),
    FastRoute("POST", PAYMENTS_PATH + "/callbacks/psp", callback),
]
