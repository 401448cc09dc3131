-- Calibration: the scenarios' load shapes against the bare hello app.
-- args: <GET|POST>. POST sends a body the size of a payment request.
local req

function init(args)
  local method = args[1] or "GET"
  if method == "POST" then
    req = wrk.format("POST", "/", with_headers({["Content-Type"] = "application/json"}),
                     '{"order_id":"00000000-0000-4000-8000-000000000000"}')
  else
    req = wrk.format("GET", "/", with_headers({["Accept"] = "application/json"}))
  end
end

function request()
  return req
end
