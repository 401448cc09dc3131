"""Pooled keep-alive forwarding to the upstream services.

One aiohttp session per upstream with an explicit connection limit and an idle
expiry shorter than the upstream's keep-alive. A request is resent once when the
upstream closed its connection before any byte of the reply, and only when that is
safe: an idempotent method, or a POST that carries an Idempotency-Key. The resend
goes out on a new connection, never on another pooled one: an upstream that is
restarting closes all its idle connections at once, so the next pooled socket is
often just as dead (SHD-6).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from services.common.errors import UpstreamUnavailable

log = logging.getLogger("shopstack.gateway.proxy")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: recomputed by the client, or set only by the gateway.
DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "x-user-id",
    "x-user-role",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
}
# x-request-id: the gateway adds its own (the same id, which it forwarded upstream).
DROP_RESPONSE = HOP_BY_HOP | {"content-length", "server", "date", "x-request-id"}
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# The connection broke before the reply began. (A failed connect is a ClientOSError too;
# forward() does not resend that one: a new connection would fail the same way at once.)
CLOSED_UNDER_US = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientConnectionResetError,
)
# Parsed upstream URLs kept per path (the write routes reuse a handful of paths).
URL_CACHE_ENTRIES = 1024
URL_CACHE_MAX_PATH = 256


@dataclass(frozen=True)
class UpstreamReply:
    status: int
    headers: list[tuple[str, str]]  # lower-case names, hop-by-hop removed
    body: bytes


def connection_tokens(headers: list[tuple[str, str]]) -> set[str]:
    """Header names a Connection header marks as hop-by-hop (names lower-case)."""
    named: set[str] = set()
    for key, value in headers:
        if key == "connection":
            named.update(t.strip().lower() for t in value.split(","))
    return named


def request_headers(raw: list[tuple[str, str]], extra: dict[str, str]) -> list[tuple[str, str]]:
    """Client headers minus hop-by-hop and identity headers, plus the gateway's own."""
    drop = DROP_REQUEST | connection_tokens(raw)
    out = [(k, v) for k, v in raw if k not in drop]
    out.extend(extra.items())
    return out


def response_headers(raw: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """Upstream response headers minus hop-by-hop ones."""
    items = [(k.lower(), v) for k, v in raw.items()]
    drop = DROP_RESPONSE | connection_tokens(items)
    return [(k, v) for k, v in items if k not in drop]


class Upstream:
    """A named upstream with its own keep-alive pool."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        pool_size: int,
        idle_s: float,
        connect_timeout_s: float,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self._urls: dict[str, URL] = {}
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._connector = aiohttp.TCPConnector(
            limit=pool_size,
            limit_per_host=pool_size,
            keepalive_timeout=idle_s,
            enable_cleanup_closed=False,
            ttl_dns_cache=300,
        )
        self.session = self._session(self._connector)
        # Resends only: one new connection per request, closed after its reply.
        self._fresh = self._session(
            aiohttp.TCPConnector(
                limit=pool_size,
                limit_per_host=pool_size,
                force_close=True,
                enable_cleanup_closed=False,
                ttl_dns_cache=300,
            )
        )

    @staticmethod
    def _session(connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        # aiohttp would resend an idempotent request once by itself, on the next pooled
        # socket; forward() resends on a new connection instead (no attribute to set this).
        session._retry_connection = False
        return session

    async def close(self) -> None:
        await self.session.close()
        await self._fresh.close()

    def url(self, path_qs: str) -> URL | str:
        """The upstream URL of a path, parsed once per path (as aiohttp would parse it).

        A path yarl refuses is returned as the string, so aiohttp reports it as before.
        """
        url = self._urls.get(path_qs)
        if url is not None:
            return url
        full = self.base_url + path_qs
        try:
            url = URL(full)
        except ValueError:
            return full
        if len(path_qs) <= URL_CACHE_MAX_PATH:
            if len(self._urls) >= URL_CACHE_ENTRIES:
                self._urls.clear()
            self._urls[path_qs] = url
        return url

    def timeout(self, total_s: float) -> aiohttp.ClientTimeout:
        """One (immutable) timeout object per route timeout."""
        timeout = self._timeouts.get(total_s)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(
                total=total_s, connect=self.connect_timeout_s, sock_connect=self.connect_timeout_s
            )
            self._timeouts[total_s] = timeout
        return timeout

    async def forward(
        self,
        method: str,
        path_qs: str,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        timeout_s: float,
        may_retry: bool,
    ) -> UpstreamReply:
        """Send one request upstream and return the whole reply; problems map to 502/504.

        `may_retry` marks a POST that may be resent (it carries an Idempotency-Key);
        idempotent methods may be resent anyway.
        """
        timeout = self.timeout(timeout_s)
        url = self.url(path_qs)
        attempts = 2 if may_retry or method in IDEMPOTENT_METHODS else 1
        session = self.session
        for attempt in range(1, attempts + 1):
            try:
                async with session.request(
                    method,
                    url,
                    headers=headers,
                    data=body if body else None,
                    allow_redirects=False,
                    timeout=timeout,
                ) as resp:
                    payload = await resp.read()
                    return UpstreamReply(resp.status, response_headers(resp.headers), payload)
            except CLOSED_UNDER_US as exc:
                # The upstream closed the connection before any byte of the reply (a
                # pooled socket it was closing): resend once, if safe, on a new one.
                if attempt < attempts and not isinstance(exc, aiohttp.ClientConnectorError):
                    log.info(
                        "upstream closed the connection; resending",
                        extra=self._ctx(exc, method, path_qs),
                    )
                    session = self._fresh
                    continue
                log.warning("upstream connection failed", extra=self._ctx(exc, method, path_qs))
                raise UpstreamUnavailable(
                    f"{self.name} is unavailable", status=502, retry_after_s=1
                ) from None
            except TimeoutError as exc:
                log.warning("upstream timed out", extra=self._ctx(exc, method, path_qs))
                raise UpstreamUnavailable(
                    f"{self.name} did not answer in time", status=504
                ) from None
            except aiohttp.ClientError as exc:
                log.warning("upstream error", extra=self._ctx(exc, method, path_qs))
                raise UpstreamUnavailable(
                    f"{self.name} is unavailable", status=502, retry_after_s=1
                ) from None
        raise AssertionError("unreachable")

    def _ctx(self, exc: BaseException, method: str, path: str) -> dict[str, str]:
        return {"upstream": self.name, "method": method, "path": path, "error": repr(exc)}
