-- Scenario payment-status, short connections: the owner polling a payment of theirs,
-- GET /api/v1/payments/{id} with that owner's token. args: <payments file> <threads>
-- Lines: token TAB payment id TAB client address. A thread cycles through its share:
-- asking again for the same payment is what a checkout page does (no "wrapped" mark).
local reqs = {}
local next_index = 1

function init(args)
  local lines = my_share(read_lines(args[1]), tid, tonumber(args[2]) or 1)
  for _, line in ipairs(lines) do
    local token, payment_id, client = line:match("^([^\t]+)\t([^\t]+)\t([^\t]+)$")
    table.insert(reqs, wrk.format("GET", "/api/v1/payments/" .. payment_id, with_headers({
      ["Accept"] = "application/json",
      ["Authorization"] = "Bearer " .. token,
      ["X-Forwarded-For"] = client,
    })))
  end
end

function request()
  local r = reqs[next_index]
  next_index = next_index % #reqs + 1
  return r
end
