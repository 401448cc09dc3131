"""Reading the Redis aggregates for a window (key layout: services.stats.buckets).

Each query is one script, so it reads a consistent set of buckets in one round trip.
A product query touches at most ~120 sorted-set scores per metric and one PFCOUNT
over the same buckets' HyperLogLogs (PFCOUNT of several keys counts their union).
A top query unions the window's per-bucket sorted sets (ZUNIONSTORE), keeps the
union for `stats_top_cache_s` so dashboards polling the same window share it, and
reads the first N.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from services.stats.buckets import Cover

_PRODUCT = """
local prefix, pid = ARGV[1], ARGV[2]
local ff, ft, cf, ct = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local sums = {v = 0, c = 0, p = 0}
local hlls = {}
local function read(tier, hll_tier, bucket)
    for m, _ in pairs(sums) do
        local score = redis.call('ZSCORE', prefix .. ':' .. tier .. ':' .. bucket .. ':' .. m, pid)
        if score then sums[m] = sums[m] + tonumber(score) end
    end
    hlls[#hlls + 1] = prefix .. ':' .. hll_tier .. ':' .. bucket .. ':' .. pid
end
for s = ff, ft do read('f', 'fu', string.format('%d', s)) end
for m = cf, ct do read('m', 'mu', string.format('%d', m)) end
local unique = 0
if #hlls > 0 then unique = redis.call('PFCOUNT', unpack(hlls)) end
return {sums.v, sums.c, sums.p, unique}
"""

_TOP = """
local prefix, metric = ARGV[1], ARGV[2]
local ff, ft, cf, ct = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local limit, cache_s = tonumber(ARGV[7]), tonumber(ARGV[8])
local dest = prefix .. ':top:' .. metric .. ':' .. table.concat(ARGV, ':', 3, 6)
if cache_s == 0 or redis.call('EXISTS', dest) == 0 then
    local keys = {}
    for s = ff, ft do keys[#keys + 1] = string.format('%s:f:%d:%s', prefix, s, metric) end
    for m = cf, ct do keys[#keys + 1] = string.format('%s:m:%d:%s', prefix, m, metric) end
    redis.call('ZUNIONSTORE', dest, #keys, unpack(keys))
    redis.call('EXPIRE', dest, math.max(cache_s, 1))
end
local top = redis.call('ZRANGE', dest, 0, limit - 1, 'REV', 'WITHSCORES')
if cache_s == 0 then redis.call('DEL', dest) end
return top
"""

METRIC_CODES = {"views": "v", "carts": "c", "purchases": "p"}


@dataclass(frozen=True)
class ProductCounts:
    views: int
    carts: int
    purchases: int
    unique_visitors: int


class Aggregates:
    """Window queries over the bucketed aggregates under one key prefix."""

    def __init__(self, redis: Redis, *, prefix: str, top_cache_s: int) -> None:
        self.prefix = prefix
        self.top_cache_s = top_cache_s
        self._product = redis.register_script(_PRODUCT)
        self._top = redis.register_script(_TOP)

    async def product(self, product_id: int, cover: Cover) -> ProductCounts:
        """Counts and unique visitors of one product over the covered buckets."""
        views, carts, purchases, unique = await self._product(
            args=[self.prefix, product_id, *cover.as_args()]
        )
        return ProductCounts(int(views), int(carts), int(purchases), int(unique))

    async def top(self, metric: str, cover: Cover, limit: int) -> list[tuple[int, int]]:
        """The `limit` products with the highest count of `metric`, highest first."""
        flat = await self._top(
            args=[
                self.prefix,
                METRIC_CODES[metric],
                *cover.as_args(),
                limit,
                self.top_cache_s,
            ]
        )
        return [(int(flat[i]), int(float(flat[i + 1]))) for i in range(0, len(flat), 2)]
