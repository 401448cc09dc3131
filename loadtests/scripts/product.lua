-- Scenario 1, product detail: GET /api/v1/products/{id}, ids drawn from a Zipf-like
-- law (id 1 the most popular). args: <count of ids> <exponent s>
-- (count 10 = the flash-sale set, 1000 = the long tail with the sale at its head).
local requests_by_rank = {}
local cdf = {}

function init(args)
  local count = tonumber(args[1]) or 10
  local s = tonumber(args[2]) or 1.1
  local total = 0
  for k = 1, count do total = total + 1 / (k ^ s) end
  local acc = 0
  for k = 1, count do
    acc = acc + (1 / (k ^ s)) / total
    cdf[k] = acc
    requests_by_rank[k] = wrk.format("GET", "/api/v1/products/" .. k,
                                     with_headers({["Accept"] = "application/json"}))
  end
  math.randomseed(os.time() * 1000 + tid)
end

local function draw()
  local u = math.random()
  local lo, hi = 1, #cdf
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo
end

function request()
  local rank = draw()
  mark("id" .. rank)
  return requests_by_rank[rank]
end
