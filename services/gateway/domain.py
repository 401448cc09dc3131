"""Gateway use cases: log a user in."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from redis.exceptions import RedisError

from services.common.errors import Problem, RateLimited, Unauthorized, UpstreamUnavailable
from services.gateway import storage
from services.gateway.passwords import Passwords
from services.gateway.ratelimit import Bucket, RateLimiter
from services.gateway.tokens import TokenService

log = logging.getLogger("shopstack.gateway.login")

BAD_CREDENTIALS = "invalid username or password"


async def login(
    *,
    pool: asyncpg.Pool,
    passwords: Passwords,
    tokens: TokenService,
    limiter: RateLimiter,
    ip_bucket: Bucket,
    failure_bucket: Bucket,
    username: str,
    password: str,
    client_ip: str,
) -> str:
    """Verify credentials and return an access token.

    Unknown user and wrong password give the same answer at the same cost.
    Every attempt spends from the client's bucket; failures spend from the
    username's bucket too, so guessing one account is throttled however many
    addresses it comes from. Without Redis, login fails closed.

    The Redis calls share one budget (the limiter's timeout), counted from the
    start: a slow Redis cannot hold a login much past it. A failure is always
    sent; past the budget the login stops waiting for its answer.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        decision = await limiter.take_then_peek(
            (f"login-ip:{client_ip}", ip_bucket), (f"login-fail:{username}", failure_bucket)
        )
    except RedisError as exc:
        log.error("rate limiter unavailable; refusing logins", extra={"error": str(exc)})
        raise UpstreamUnavailable("login is unavailable right now", retry_after_s=1) from None
    if not decision.allowed:
        raise RateLimited("too many login attempts", retry_after_s=decision.retry_after_s)

    row = await storage.fetch_user(pool, username)
    ok = await passwords.verify(row["password_hash"] if row else None, password)
    if not ok or row is None:
        budget = limiter.timeout_s
        left = None if budget is None else max(0.0, budget - (loop.time() - started))
        try:
            await limiter.take(f"login-fail:{username}", failure_bucket, timeout_s=left)
        except RedisError:
            log.warning("a failed login was not confirmed by Redis", extra={"username": username})
        raise Unauthorized(BAD_CREDENTIALS)
    if passwords.needs_rehash(row["password_hash"]):
        try:
            await storage.update_password_hash(pool, row["id"], await passwords.hash(password))
        except (asyncpg.PostgresError, Problem):
            log.warning("password rehash failed", extra={"user_id": row["id"]})
    return tokens.issue(user_id=row["id"], username=row["username"], role=row["role"])
