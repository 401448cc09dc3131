"""POST /api/v1/events on the fast lane: request ids, limits, metrics, errors."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from services.stats.stream import EventStream
from tests.stats.conftest import JSON, body, event
from tests.support.problems import assert_problem


async def test_request_id_is_echoed_or_made(ingest_only: httpx.AsyncClient) -> None:
    raw = body([event(1)])
    echoed = await ingest_only.post(
        "/api/v1/events", content=raw, headers={**JSON, "X-Request-ID": "abc-123"}
    )
    assert echoed.status_code == 202
    assert echoed.headers["x-request-id"] == "abc-123"
    assert echoed.headers["content-type"] == "application/json"
    assert echoed.json() == {"accepted": 1}
    made = await ingest_only.post(
        "/api/v1/events", content=raw, headers={**JSON, "X-Request-ID": "not sane!"}
    )
    assert len(made.headers["x-request-id"]) == 32
    refused = await ingest_only.post("/api/v1/events", content=b"[]", headers=JSON)
    assert_problem(refused, 422, "validation-error")
    assert refused.headers["x-request-id"]


async def test_requests_are_counted_by_route_and_status(ingest_only: httpx.AsyncClient) -> None:
    def count(text: str, status: str) -> float:
        prefix = (
            'shopstack_http_requests_total{method="POST",route="/api/v1/events",'
            f'service="stats",status="{status}"}} '
        )
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    before = (await ingest_only.get("/metrics")).text
    await ingest_only.post("/api/v1/events", content=body([event(1)]), headers=JSON)
    await ingest_only.post("/api/v1/events", content=b"[1]", headers=JSON)
    after = (await ingest_only.get("/metrics")).text
    assert count(after, "202") == count(before, "202") + 1
    assert count(after, "422") == count(before, "422") + 1
    assert (
        'shopstack_http_request_duration_seconds_count{method="POST",route="/api/v1/events"'
        in after
    )


async def test_a_declared_oversize_closes_the_connection(
    ingest_only: httpx.AsyncClient,
) -> None:
    too_big = await ingest_only.post(
        "/api/v1/events", content=b"[]", headers={**JSON, "Content-Length": "2000000"}
    )
    assert_problem(too_big, 413, "payload-too-large")
    assert too_big.headers["connection"] == "close"


async def test_an_unexpected_error_is_a_logged_500_problem(
    ingest_only: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    async def broken(self: EventStream, payload: str, count: int) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(EventStream, "admit", broken)
    resp = await ingest_only.post("/api/v1/events", content=body([event(1)]), headers=JSON)
    doc = assert_problem(resp, 500, "internal-error")
    assert "boom" not in resp.text
    assert doc["detail"] == "an unexpected error occurred"
    assert any("unhandled error" in r.getMessage() for r in caplog.records)


async def test_other_methods_and_paths_still_reach_fastapi(ingest_only: httpx.AsyncClient) -> None:
    assert_problem(await ingest_only.get("/api/v1/events"), 405, "method-not-allowed")
    assert (await ingest_only.get("/healthz")).json() == {"status": "ok"}
    schema = (await ingest_only.get("/openapi.json")).json()
    items = schema["paths"]["/api/v1/events"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]["items"]
    assert set(items["required"]) == {"event_id", "type", "product_id", "user_id", "ts"}
    assert items["properties"]["event_id"]["format"] == "uuid"
    assert items["additionalProperties"] is False
