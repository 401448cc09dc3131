-- Shared by every scenario script (the runner prepends it): per-thread counters of
-- statuses, marks and completions per wall-clock second, merged in done() and
-- printed as one JSON line that loadtests/parsers.py reads.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

statuses = {}
seconds = {}
marks = {}

function mark(name, n)
  marks[name] = (marks[name] or 0) + (n or 1)
end

-- Copy the command line's -H headers (e.g. Connection: close) under the script's own.
function with_headers(extra)
  local h = {}
  for k, v in pairs(wrk.headers) do h[k] = v end
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end

-- Split a file into its non-empty lines.
function read_lines(path)
  local out = {}
  local f = assert(io.open(path, "r"))
  for line in f:lines() do
    if #line > 0 then table.insert(out, line) end
  end
  f:close()
  return out
end

-- This thread's share of a list: items tid, tid + n, tid + 2n, ...
function my_share(items, tid, nthreads)
  local out = {}
  for i = tid, #items, nthreads do table.insert(out, items[i]) end
  return out
end

function response(status, headers, body)
  local s = os.time()
  seconds[s] = (seconds[s] or 0) + 1
  statuses[status] = (statuses[status] or 0) + 1
  if on_response then on_response(status, headers, body) end
end

local function encode(v)
  local t = type(v)
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return "null" end
    return string.format("%.17g", v)
  elseif t == "string" then
    return '"' .. v:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
  elseif t == "table" then
    local parts = {}
    for k, item in pairs(v) do
      table.insert(parts, encode(tostring(k)) .. ":" .. encode(item))
    end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  return "null"
end

local function merge(into, from)
  for k, v in pairs(from or {}) do into[k] = (into[k] or 0) + v end
end

function done(summary, latency, requests)
  local all = {statuses = {}, seconds = {}, marks = {}}
  for _, t in ipairs(threads) do
    merge(all.statuses, t:get("statuses"))
    merge(all.seconds, t:get("seconds"))
    merge(all.marks, t:get("marks"))
  end
  local p = {}
  for _, q in ipairs({50, 75, 90, 99, 99.9, 99.99}) do
    p[tostring(q)] = latency:percentile(q)
  end
  all.latency_us = {mean = latency.mean, stdev = latency.stdev, min = latency.min,
                    max = latency.max, percentiles = p}
  all.duration_us = summary.duration
  all.requests = summary.requests
  all.bytes = summary.bytes
  all.errors = summary.errors
  all.threads = #threads
  io.write("LOADTEST_JSON ", encode(all), "\n")
end
