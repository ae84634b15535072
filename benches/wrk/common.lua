-- Shared by the wrk scripts of benches/load.sh (loaded with dofile(os.getenv("WRK_LIB"))).
-- Gives every thread a number (`tid`), builds the 1 KiB POST body, counts response statuses when
-- asked (`count_statuses = true` before loading this file, or WRK_COUNT_STATUSES=1; every
-- scenario of load.sh does), and prints one machine-readable `BENCH ...` line from wrk's `done`
-- callback, which benches/load/parse.py reads (and checks against wrk's own summary).

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

-- A 1 KiB JSON body (exactly 1024 bytes).
local head = '{"sku":"bench","qty":1,"pad":"'
local tail = '"}'
body_1k = head .. string.rep("x", 1024 - #head - #tail) .. tail
assert(#body_1k == 1024)

c2xx, c3xx, c409, c4xx, c5xx, cother = 0, 0, 0, 0, 0, 0

if os.getenv("WRK_COUNT_STATUSES") == "1" then
  count_statuses = true
end

if count_statuses then
  function response(status, headers, body)
    if status >= 200 and status < 300 then
      c2xx = c2xx + 1
    elseif status == 409 then
      c409 = c409 + 1
    elseif status >= 500 and status < 600 then
      c5xx = c5xx + 1
    elseif status >= 400 and status < 500 then
      c4xx = c4xx + 1
    elseif status >= 300 and status < 400 then
      c3xx = c3xx + 1
    else
      cother = cother + 1
    end
  end
end

-- A raw request with a per-request Idempotency-Key: prefix .. key .. suffix (cheaper than
-- wrk.format per request). Call from init(), after wrk has set the Host header.
function keyed_request_parts(path)
  local prefix = "POST " .. path .. " HTTP/1.1\r\n"
    .. "Host: " .. wrk.headers["Host"] .. "\r\n"
    .. "Content-Type: application/json\r\n"
    .. "Content-Length: " .. #body_1k .. "\r\n"
    .. "Idempotency-Key: "
  local suffix = "\r\n\r\n" .. body_1k
  return prefix, suffix
end

function done(summary, latency, requests)
  local sums = { c2xx = 0, c3xx = 0, c409 = 0, c4xx = 0, c5xx = 0, cother = 0 }
  for _, t in ipairs(threads) do
    for name, _ in pairs(sums) do
      sums[name] = sums[name] + (tonumber(t:get(name)) or 0)
    end
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d err_connect=%d err_read=%d err_write=%d err_timeout=%d "
      .. "non2xx3xx=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d mean_us=%d status_counted=%d "
      .. "s2xx=%d s3xx=%d s409=%d s4xx=%d s5xx=%d sother=%d\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.timeout,
    e.status, math.floor(latency:percentile(50)), math.floor(latency:percentile(90)),
    math.floor(latency:percentile(99)), math.floor(latency.max), math.floor(latency.mean),
    count_statuses and 1 or 0,
    sums.c2xx, sums.c3xx, sums.c409, sums.c4xx, sums.c5xx, sums.cother))
end
