-- Scenario 3, logins over short connections: POST /api/v1/auth/login cycling demo
-- users demo<first> .. demo<first+count-1>; each user sends its own
-- X-Forwarded-For address (believed only when the gateway trusts the load
-- generator as a proxy). args: <first user> <count of users> <threads>
local reqs = {}
local next_index = 1

local function address(n)
  local d = n % 256
  if d == 0 then d = 1 end
  return string.format("10.%d.%d.%d", math.floor(n / 65536) % 256, math.floor(n / 256) % 256, d)
end

function init(args)
  local first = tonumber(args[1]) or 1
  local count = tonumber(args[2]) or 100
  local nthreads = tonumber(args[3]) or 1
  for n = first + tid - 1, first + count - 1, nthreads do
    local body = '{"username":"demo' .. n .. '","password":"demo-password-' .. n .. '"}'
    table.insert(reqs, wrk.format("POST", "/api/v1/auth/login", with_headers({
      ["Content-Type"] = "application/json",
      ["X-Forwarded-For"] = address(n),
    }), body))
  end
end

function request()
  local r = reqs[next_index]
  next_index = next_index % #reqs + 1
  return r
end
