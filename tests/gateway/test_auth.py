"""Login and tokens: argon2id, same answer for unknown users, throttling, JWT checks."""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import time
import warnings
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from argon2 import PasswordHasher
from jwt.warnings import InsecureKeyLengthWarning

from services.common.errors import Overloaded
from services.common.settings import DEV_SECRETS
from services.gateway.app import create_app
from services.gateway.passwords import Passwords
from tests.gateway.conftest import Echo, gateway_settings
from tests.gateway.helpers import login
from tests.support.asgi import client_for
from tests.support.problems import assert_problem
from tests.support.servers import free_port

SECRET = DEV_SECRETS["jwt_secret"]
CLAIMS = {"sub": "1", "role": "user", "iss": "shopstack", "aud": "shopstack-api"}


def forge(claims: dict[str, Any], *, key: str = SECRET, alg: str = "HS256") -> str:
    now = int(time.time())
    with warnings.catch_warnings():  # HS512 with the real (shorter) key is the attack here
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode({"iat": now, "exp": now + 300, **claims}, key, algorithm=alg)


def alg_none(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(time.time())
    return (
        part({"alg": "none", "typ": "JWT"})
        + "."
        + part({**claims, "iat": now, "exp": now + 300})
        + "."
    )


def tampered() -> str:
    header, payload, sig = forge(CLAIMS).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["role"] = "admin"
    new = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{new}.{sig}"


def no_exp() -> str:
    return jwt.encode({**CLAIMS, "iat": int(time.time())}, SECRET, algorithm="HS256")


BAD_TOKENS = {
    "alg-none": lambda: alg_none(CLAIMS),
    "wrong-secret": lambda: forge(CLAIMS, key="another-secret-another-secret-0123"),
    "hs512-not-allowed": lambda: forge(CLAIMS, alg="HS512"),
    "expired": lambda: jwt.encode(
        {**CLAIMS, "iat": int(time.time()) - 1000, "exp": int(time.time()) - 10}, SECRET
    ),
    "wrong-audience": lambda: forge({**CLAIMS, "aud": "someone-else"}),
    "wrong-issuer": lambda: forge({**CLAIMS, "iss": "evil"}),
    "missing-exp": no_exp,
    "tampered": tampered,
    "bad-role": lambda: forge({**CLAIMS, "role": "root"}),
    "garbage": lambda: "not.a.token",
}


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
async def test_bad_tokens_are_401(
    gateway_to_echo: httpx.AsyncClient, echo: Echo, name: str
) -> None:
    """SEC-4: each forged, expired or malformed token is refused before any upstream call."""
    token = BAD_TOKENS[name]()
    resp = await gateway_to_echo.get(
        "/api/v1/orders/x", headers={"Authorization": f"Bearer {token}"}
    )
    assert_problem(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert echo.seen == []


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "bearer "])
async def test_missing_or_malformed_authorization_is_401(
    gateway_to_echo: httpx.AsyncClient, header: str | None
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    resp = await gateway_to_echo.post("/api/v1/payments", headers=headers, json={})
    assert_problem(resp, 401, "unauthorized")


async def test_login_issues_a_short_lived_hs256_token(gateway_to_echo: httpx.AsyncClient) -> None:
    resp = await gateway_to_echo.post(
        "/api/v1/auth/login", json={"username": "demo2", "password": "demo-password-2"}
    )
    assert resp.status_code == 200
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert body["token_type"] == "bearer"
    assert 0 < body["expires_in"] <= 900
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "HS256"
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] <= 900
    assert claims["role"] == "user"
    assert claims["name"] == "demo2"


async def test_admin_token_carries_the_admin_role(
    gateway_to_echo: httpx.AsyncClient, echo: Echo
) -> None:
    token = await login(gateway_to_echo, "admin", DEV_SECRETS["admin_password"])
    await gateway_to_echo.get(
        "/api/v1/admin/products/1", headers={"Authorization": f"Bearer {token}"}
    )
    assert echo.seen[-1]["headers"]["x-user-role"] == "admin"


async def test_unknown_user_and_wrong_password_look_the_same(
    gateway_to_echo: httpx.AsyncClient,
) -> None:
    """SEC-2: same status and body, similar time (the dummy hash costs the same)."""

    async def attempt(username: str) -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        resp = await gateway_to_echo.post(
            "/api/v1/auth/login", json={"username": username, "password": "wrong-password"}
        )
        return resp, time.perf_counter() - started

    unknown = [await attempt(f"ghost{i}") for i in range(4)]
    wrong = [await attempt("demo3") for _ in range(4)]
    for resp, _ in unknown + wrong:
        assert_problem(resp, 401, "unauthorized")
    assert {r.content for r, _ in unknown} == {r.content for r, _ in wrong}
    t_unknown = statistics.median(t for _, t in unknown)
    t_wrong = statistics.median(t for _, t in wrong)
    assert 0.5 < t_unknown / t_wrong < 2.0


async def test_login_without_postgres_is_a_retryable_503(
    settings_kwargs: dict[str, Any], echo: Echo
) -> None:
    # Nothing listens on the port, and the pool opens no connection until one is needed.
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/shopstack"
    settings = gateway_settings(
        settings_kwargs, database_url=unreachable, db_pool_min=0, catalog_url=echo.url
    )
    async with client_for(create_app(settings)) as client:
        resp = await client.post(
            "/api/v1/auth/login", json={"username": "demo1", "password": "demo-password-1"}
        )
    assert_problem(resp, 503, "upstream-unavailable")
    assert resp.headers["retry-after"] == "1"


async def test_failed_logins_throttle_the_account(
    seeded: str, settings_kwargs: dict[str, Any], rds: Any
) -> None:
    """SEC-2: after the burst of failures the account answers 429, even to the right password."""
    settings = gateway_settings(settings_kwargs, login_failure_burst=3)
    await rds.delete("ratelimit:login-fail:demo1")
    async with client_for(create_app(settings)) as client:
        for _ in range(3):
            bad = await client.post(
                "/api/v1/auth/login", json={"username": "demo1", "password": "nope"}
            )
            assert bad.status_code == 401
        blocked = await client.post(
            "/api/v1/auth/login", json={"username": "demo1", "password": "demo-password-1"}
        )
    assert_problem(blocked, 429, "rate-limited")
    assert int(blocked.headers["retry-after"]) >= 1
    await rds.delete("ratelimit:login-fail:demo1")


async def test_login_fails_closed_without_redis(
    seeded: str, settings_kwargs: dict[str, Any]
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    settings = gateway_settings(settings_kwargs, redis_url=dead_redis, redis_timeout_s=0.3)
    async with client_for(create_app(settings)) as client:
        resp = await client.post(
            "/api/v1/auth/login", json={"username": "demo1", "password": "demo-password-1"}
        )
    assert_problem(resp, 503, "upstream-unavailable")


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b'{"username": "demo1"}',
        b'{"username": 1, "password": "x"}',
        b'{"username": "demo1", "password": "x", "role": "admin"}',
        b'{"username": "", "password": "x"}',
        b'{"username": "demo1\\u0000", "password": "x"}',  # IN-9: was a 500 (Postgres text)
        b'{"username": "demo\\n1", "password": "x"}',
        b"[]",
        b"\xff",
    ],
)
async def test_login_rejects_bad_bodies(gateway_to_echo: httpx.AsyncClient, body: bytes) -> None:
    resp = await gateway_to_echo.post(
        "/api/v1/auth/login", content=body, headers={"Content-Type": "application/json"}
    )
    assert_problem(resp, 422, "validation-error")


async def test_login_body_over_limit_is_413(gateway_to_echo: httpx.AsyncClient) -> None:
    resp = await gateway_to_echo.post(
        "/api/v1/auth/login", json={"username": "demo1", "password": "x" * 10_000}
    )
    assert_problem(resp, 413, "payload-too-large")


async def test_weak_hashes_are_upgraded_on_login(
    seeded: str, gateway_to_echo: httpx.AsyncClient
) -> None:
    """SEC-1: new hashes are argon2id at OWASP parameters; older ones are rehashed on login."""
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("legacy-pass")
    conn = await asyncpg.connect(seeded)
    try:
        await conn.execute(
            "INSERT INTO users (username, password_hash) VALUES ('legacy', $1) "
            "ON CONFLICT (username) DO UPDATE SET password_hash = EXCLUDED.password_hash",
            weak,
        )
        await login(gateway_to_echo, "legacy", "legacy-pass")
        stored = await conn.fetchval("SELECT password_hash FROM users WHERE username = 'legacy'")
        demo = await conn.fetchval("SELECT password_hash FROM users WHERE username = 'demo1'")
    finally:
        await conn.close()
    for phc in (stored, demo):
        assert phc.startswith("$argon2id$")
        params = dict(p.split("=") for p in phc.split("$")[3].split(","))
        assert int(params["m"]) >= 19_456
        assert int(params["t"]) >= 2


async def test_hashing_concurrency_is_bounded() -> None:
    """SEC-3: past the slots and the queue, logins are shed instead of piling up memory."""
    passwords = Passwords(time_cost=2, memory_kib=19_456, parallelism=1, concurrency=1, queue=1)
    stored = passwords.hash_sync("pw")
    results = await asyncio.gather(
        *(passwords.verify(stored, "pw") for _ in range(4)), return_exceptions=True
    )
    shed = [r for r in results if isinstance(r, Overloaded)]
    assert len(shed) == 2
    assert [r for r in results if r is True] == [True, True]
