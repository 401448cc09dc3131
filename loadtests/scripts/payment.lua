-- Scenario 2, payments over short connections: one distinct (token, fresh reserved
-- order) pair per request, POST /api/v1/payments. args: <pairs file> <threads>
-- Lines: token TAB order_id TAB client address. A thread that runs out of pairs
-- starts again from its first (marked "wrapped": those requests pay an order already paid).
local reqs = {}
local next_index = 1

function init(args)
  local lines = my_share(read_lines(args[1]), tid, tonumber(args[2]) or 1)
  for _, line in ipairs(lines) do
    local token, order_id, client = line:match("^([^\t]+)\t([^\t]+)\t([^\t]+)$")
    local body = '{"order_id":"' .. order_id .. '"}'
    table.insert(reqs, wrk.format("POST", "/api/v1/payments", with_headers({
      ["Authorization"] = "Bearer " .. token,
      ["Content-Type"] = "application/json",
      ["Idempotency-Key"] = "lt-" .. order_id,
      ["X-Forwarded-For"] = client,
    }), body))
  end
end

function request()
  if next_index > #reqs then
    next_index = 1
    mark("wrapped")
  end
  local r = reqs[next_index]
  next_index = next_index + 1
  return r
end
