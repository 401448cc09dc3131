"""Stats HTTP routes: parse, call the domain, shape the reply."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from services.common.app import JSONResponse
from services.common.errors import problem_body
from services.common.fastlane import FastReply, FastRequest, FastRoute, framework_reply
from services.common.openapi import RATE_LIMITED, link
from services.stats import domain
from services.stats.schemas import (
    MAX_EVENTS,
    MAX_ID,
    Accepted,
    Metric,
    ProductStats,
    TimeRange,
    TopStats,
    event_json_schema,
)
from services.stats.state import StatsState

router = APIRouter(prefix="/api/v1", tags=["stats"])


def _problem(status: int, code: str, detail: str) -> dict[str, Any]:
    example = problem_body(status, code, None, detail)
    return {"content": {"application/problem+json": {"example": example}}}


_EVENTS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_EVENTS,
                    "items": event_json_schema(),
                }
            }
        },
    }
}


async def stats_state(request: Request) -> StatsState:
    state: StatsState = request.state.app_state
    return state


State = Annotated[StatsState, Depends(stats_state)]
Window = Query(ge=1, le=3600, description="Seconds of event time, ending now")


@router.post(
    "/events",
    status_code=202,
    response_model=Accepted,
    openapi_extra=_EVENTS_BODY,
    responses={
        202: {
            "links": {
                "GetProductStats": link(
                    "/api/v1/stats/products/{product_id}",
                    "get",
                    "the counts of the first event's product",
                    parameters={"product_id": "$request.body#/0/product_id"},
                )
            }
        },
        413: _problem(413, "payload-too-large", "request body exceeds 1048576 bytes"),
        422: _problem(422, "validation-error", "invalid events at index 3"),
        503: _problem(503, "overloaded", "the event backlog is over its budget"),
        **RATE_LIMITED,
    },
)
async def post_events(request: Request) -> Response:
    """Accept 1..1000 events whole (202), or none of them."""
    return await framework_reply(ingest, request)


async def ingest(request: FastRequest) -> FastReply:
    """The events route itself (the fast lane serves it; see FAST_ROUTES)."""
    state: StatsState = request.state
    settings = state.stats_settings
    accepted = await domain.ingest(
        stream=state.stream,
        body=request.body,
        ts_range=TimeRange(
            time.time_ns() // 1000,
            max_future_s=settings.stats_max_future_s,
            max_age_s=settings.stats_max_age_s,
        ),
        retry_after_s=settings.stats_retry_after_s,
    )
    return FastReply(202, b'{"accepted":%d}' % accepted)


FAST_ROUTES = [FastRoute("POST", "/api/v1/events", ingest)]


@router.get("/stats/products/{product_id}", response_model=ProductStats)
async def product_stats(
    state: State,
    product_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    window: Annotated[int, Window] = 60,
) -> Response:
    """Counts of one product over the last `window` seconds of event time."""
    doc = await domain.product_stats(
        aggregates=state.aggregates,
        tiers=state.tiers,
        product_id=product_id,
        window_s=window,
        now_s=int(time.time()),
    )
    return JSONResponse(doc)


@router.get("/stats/top", response_model=TopStats)
async def top_products(
    state: State,
    metric: Metric = Metric.VIEWS,
    window: Annotated[int, Window] = 300,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> Response:
    """The products with the most `metric` over the last `window` seconds."""
    doc = await domain.top_products(
        aggregates=state.aggregates,
        tiers=state.tiers,
        metric=metric.value,
        window_s=window,
        limit=limit,
        now_s=int(time.time()),
    )
    return JSONResponse(doc)
