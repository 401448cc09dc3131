"""The one check that a reply is a clean RFC 9457 problem."""

from __future__ import annotations

from typing import Any

import httpx


def assert_problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert `resp` is problem+json with this status and `/problems/<code>`; return the doc."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    doc: dict[str, Any] = resp.json()
    assert doc["type"] == f"/problems/{code}"
    assert doc["status"] == status
    assert "Traceback" not in resp.text
    return doc
