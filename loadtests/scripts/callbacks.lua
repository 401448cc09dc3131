-- Scenario 4b, unique provider callbacks: each request a distinct, pre-signed event,
-- POST /api/v1/payments/callbacks/psp. args: <events file> <threads>
-- Lines: PSP-Signature value TAB raw JSON body. Replies are told apart by body:
-- "processed" (first delivery) or "duplicate" (an event sent before); "sent" counts
-- requests written (wrk drops the replies still in flight when the time is up).
local reqs = {}
local next_index = 1

function init(args)
  local lines = my_share(read_lines(args[1]), tid, tonumber(args[2]) or 1)
  for _, line in ipairs(lines) do
    local signature, body = line:match("^([^\t]+)\t(.+)$")
    table.insert(reqs, wrk.format("POST", "/api/v1/payments/callbacks/psp", with_headers({
      ["Content-Type"] = "application/json",
      ["PSP-Signature"] = signature,
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
  mark("sent")
  return r
end

function on_response(status, headers, body)
  if status == 200 then
    if body:find('"processed"', 1, true) then mark("processed")
    elseif body:find('"duplicate"', 1, true) then mark("duplicate") end
  end
end
