"""Order routes (users, through the gateway) and the internal API for payment."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Path, Request, Response

from services.catalog import orders
from services.catalog.domain import serialize
from services.catalog.idempotency import SCOPE_CREATE_ORDER, request_hash, run_once
from services.catalog.schemas import (
    HoldRef,
    InternalOrder,
    Order,
    OrderIn,
    OrderOutcomeResults,
    OrderOutcomes,
    PaymentRef,
)
from services.catalog.state import CatalogState
from services.common.errors import PROBLEM_CONTENT_TYPE, Problem, problem_body
from services.common.fastlane import (
    FastHandler,
    FastReply,
    FastRequest,
    FastRoute,
    framework_reply,
    parse_body,
    path_uuid,
)
from services.common.identity import Caller, current_caller
from services.common.openapi import RATE_LIMITED, link

router = APIRouter(prefix="/api/v1", tags=["orders"])
internal_router = APIRouter(prefix="/internal/v1", tags=["internal"])

REPLAYED_HEADER = "Idempotent-Replayed"


def _problem(status: int, code: str, detail: str) -> dict[str, Any]:
    doc = problem_body(status, code, None, detail)
    return {"description": detail, "content": {PROBLEM_CONTENT_TYPE: {"example": doc}}}


_401 = _problem(401, "unauthorized", "authentication required")
_404 = _problem(404, "not-found", "order 0b0e... does not exist")
_422 = _problem(422, "validation-error", "the request is not valid")
_503 = _problem(503, "upstream-unavailable", "the inventory gate is unavailable")
_409_PAY = _problem(409, "order-not-payable", "order 0b0e... is held by another payment")


async def catalog_state(request: Request) -> CatalogState:
    state: CatalogState = request.state.app_state
    return state


State = Annotated[CatalogState, Depends(catalog_state)]
User = Annotated[Caller, Depends(current_caller)]
OrderIdPath = Annotated[UUID, Path(description="Order id")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Makes a retried POST safe: same key and body -> the first reply.",
    ),
]


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    media = PROBLEM_CONTENT_TYPE if status >= 400 else "application/json"
    return Response(body, status_code=status, media_type=media, headers=headers)


ORDER = "/api/v1/orders/{order_id}"
_ORDER_LINKS = {
    "GetOrder": link(ORDER, "get", "the order", parameters={"order_id": "$response.body#/id"}),
    "CancelOrder": link(
        ORDER + "/cancel", "post", "cancel it", parameters={"order_id": "$response.body#/id"}
    ),
}


@router.post(
    "/orders",
    status_code=201,
    response_model=Order,
    responses={
        201: {
            "description": "Reserved (or, with Idempotent-Replayed: true, the first reply)",
            "links": _ORDER_LINKS,
        },
        401: _401,
        404: _problem(404, "not-found", "product 7 does not exist"),
        409: _problem(
            409, "sold-out", "product 7 is sold out (also limit-exceeded, idempotency-in-progress)"
        ),
        413: _problem(413, "payload-too-large", "request body exceeds 1048576 bytes"),
        422: _problem(
            422, "validation-error", "the request is not valid (also idempotency-mismatch)"
        ),
        503: _503,
        **RATE_LIMITED,
    },
)
async def create_order(
    state: State, body: OrderIn, caller: User, idempotency_key: IdempotencyKey = None
) -> Response:
    inv = state.inventory
    if idempotency_key is None:
        row = await orders.place_order(
            inv=inv, user_id=caller.user_id, product_id=body.product_id, quantity=body.quantity
        )
        return _json(serialize(orders.order_document(row)), 201)

    async def action(order_id: UUID, is_retry: bool) -> tuple[int, bytes]:
        row = await orders.place_order(
            inv=inv,
            user_id=caller.user_id,
            product_id=body.product_id,
            quantity=body.quantity,
            order_id=order_id,
            is_retry=is_retry,
        )
        return 201, serialize(orders.order_document(row))

    async with orders.postgres_guard():
        reply = await run_once(
            pool=state.db,
            settings=inv.settings,
            user_id=caller.user_id,
            scope=SCOPE_CREATE_ORDER,
            key=idempotency_key,
            fingerprint=request_hash(body.model_dump()),
            action=action,
        )
    headers = {REPLAYED_HEADER: "true"} if reply.replayed else None
    return _json(reply.body, reply.status, headers)


@router.get("/orders/{order_id}", response_model=Order, responses={401: _401, 404: _404})
async def get_order(state: State, order_id: OrderIdPath, caller: User) -> Response:
    row = await orders.get_order(inv=state.inventory, user_id=caller.user_id, order_id=order_id)
    return _json(serialize(orders.order_document(row)))


@router.post(
    "/orders/{order_id}/cancel",
    response_model=Order,
    responses={
        401: _401,
        404: _404,
        409: _problem(409, "order-not-cancellable", "order 0b0e... is already paid"),
        **RATE_LIMITED,
    },
)
async def cancel_order(state: State, order_id: OrderIdPath, caller: User) -> Response:
    row = await orders.cancel_order(inv=state.inventory, user_id=caller.user_id, order_id=order_id)
    return _json(serialize(orders.order_document(row)))


# --- internal API for the payment service (not routed by the gateway) ---------


def _internal(row: Any) -> FastReply:
    return FastReply(200, serialize(orders.internal_order_document(row)))


async def internal_order(request: FastRequest) -> FastReply:
    """An order as the payment service sees it (amount, owner, status, hold)."""
    state: CatalogState = request.state
    return _internal(
        await orders.internal_get(inv=state.inventory, order_id=path_uuid(request, "order_id"))
    )


def _payment_step(
    step: Callable[..., Awaitable[Any]], body: type[PaymentRef] = PaymentRef
) -> FastHandler:
    """The handler of an internal call: the order from the path, the rest from the body
    (its fields are the step's keyword arguments)."""

    async def handler(request: FastRequest) -> FastReply:
        state: CatalogState = request.state
        order_id = path_uuid(request, "order_id")
        ref = parse_body(body, request.body)
        return _internal(await step(inv=state.inventory, order_id=order_id, **dict(ref)))

    return handler


hold = _payment_step(orders.hold_order, HoldRef)
paid = _payment_step(orders.mark_order_paid)
release = _payment_step(orders.release_hold)


async def outcomes(request: FastRequest) -> FastReply:
    """Many paid / release calls in one request and one transaction (the outbox relay's
    batch); each item is answered as its own call would be."""
    state: CatalogState = request.state
    batch = parse_body(OrderOutcomes, request.body)
    results = await orders.apply_payment_outcomes(
        inv=state.inventory,
        items=[(item.kind, item.order_id, item.payment_id) for item in batch.items],
    )
    docs = []
    for item, result in zip(batch.items, results, strict=True):
        doc: dict[str, Any] = {
            "order_id": str(item.order_id),
            "payment_id": str(item.payment_id),
            "kind": item.kind,
        }
        if isinstance(result, Problem):
            doc.update(status=result.status, order=None, problem=result.body())
        else:
            doc.update(status=200, order=orders.internal_order_document(result), problem=None)
        docs.append(doc)
    return FastReply(200, serialize({"results": docs}))


INTERNAL = "/internal/v1/orders/{order_id}"
OUTCOMES = "/internal/v1/order-outcomes"
FAST_ROUTES = [
    FastRoute("POST", OUTCOMES, outcomes),
    FastRoute("GET", INTERNAL, internal_order),
    FastRoute("POST", INTERNAL + "/hold", hold),
    FastRoute("POST", INTERNAL + "/paid", paid),
    FastRoute("POST", INTERNAL + "/release", release),
]
# The FastAPI routes below document these (OpenAPI) and serve them with the lane off.


@internal_router.get("/orders/{order_id}", response_model=InternalOrder, responses={404: _404})
async def internal_get_order(request: Request, order_id: OrderIdPath) -> Response:
    return await framework_reply(internal_order, request, order_id=order_id)


_SAME_ORDER = {"order_id": "$response.body#/id"}
_SAME_PAYMENT = {"payment_id": "$request.body#/payment_id"}
_HOLD_LINKS = {
    "GetInternalOrder": link(INTERNAL, "get", "the held order", parameters=_SAME_ORDER),
    "MarkPaid": link(
        INTERNAL + "/paid",
        "post",
        "the holding payment succeeded",
        parameters=_SAME_ORDER,
        request_body=_SAME_PAYMENT,
    ),
    "Release": link(
        INTERNAL + "/release",
        "post",
        "the holding payment failed",
        parameters=_SAME_ORDER,
        request_body=_SAME_PAYMENT,
    ),
}


@internal_router.post(
    "/orders/{order_id}/hold",
    response_model=InternalOrder,
    responses={200: {"links": _HOLD_LINKS}, 404: _404, 409: _409_PAY, 422: _422},
)
async def hold_order(request: Request, order_id: OrderIdPath, body: HoldRef) -> Response:
    return await framework_reply(hold, request, order_id=order_id)


@internal_router.post(
    "/orders/{order_id}/paid",
    response_model=InternalOrder,
    responses={
        200: {
            "links": {
                "GetInternalOrder": link(INTERNAL, "get", "the paid order", parameters=_SAME_ORDER)
            }
        },
        404: _404,
        409: _409_PAY,
        422: _422,
    },
)
async def paid_order(request: Request, order_id: OrderIdPath, body: PaymentRef) -> Response:
    return await framework_reply(paid, request, order_id=order_id)


@internal_router.post(
    "/orders/{order_id}/release",
    response_model=InternalOrder,
    responses={404: _404, 422: _422},
)
async def release_order(request: Request, order_id: OrderIdPath, body: PaymentRef) -> Response:
    return await framework_reply(release, request, order_id=order_id)


@internal_router.post(
    "/order-outcomes", response_model=OrderOutcomeResults, responses={422: _422, 503: _503}
)
async def order_outcomes(request: Request, body: OrderOutcomes) -> Response:
    return await framework_reply(outcomes, request)
