from __future__ import annotations

import httpx


def assert_problem(resp: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    doc: dict[str, object] = resp.json()
    assert doc["type"] == f"/problems/{code}"
    assert doc["status"] == status
    assert "Traceback" not in resp.text
    return doc


async def login(client: httpx.AsyncClient, username: str, password: str) -> str:
    resp = await client.post(
        "/api/v1/auth/login", json={"username": username, "password": password}
    )
    assert resp.status_code == 200, resp.text
    token: str = resp.json()["access_token"]
    return token
