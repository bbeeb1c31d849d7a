-- wrk script for benches/forward_auth_vs_json.sh. VERDICT_BENCH_MODE picks the path:
--   json     POST /v1/decisions with the JSON context in VERDICT_BENCH_BODY
--   forward  GET /v1/forward-auth with the same context as headers
-- (VERDICT_BENCH_TOKEN is the proxy token). Both modes check every answer the same
-- way: an answer that is not an allow (for JSON, a 200 with "decision":"deny" is
-- one) is counted, and `done` prints "not allowed: N" with a sample, so that a run
-- whose rule failed under load is not mistaken for a fast one.
local mode = os.getenv("VERDICT_BENCH_MODE")
wrk.headers["Authorization"] = "Bearer " .. os.getenv("VERDICT_BENCH_TOKEN")
if mode == "json" then
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = os.getenv("VERDICT_BENCH_BODY")
else
  wrk.method = "GET"
  wrk.headers["X-Verdict-Application"] = "payroll"
  wrk.headers["X-Forwarded-User"] = "alice@example.com"
  wrk.headers["X-Forwarded-Groups"] = "g-1001,g-1002"
  wrk.headers["X-Real-IP"] = "203.0.113.7"
  wrk.headers["User-Agent"] = "wrk"
  wrk.headers["X-Device-Id"] = "dev-42"
  wrk.headers["Accept-Language"] = "en-US"
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  denied = 0
  sample = ""
end

function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"decision":"allow"', 1, true) then
    denied = denied + 1
    if sample == "" then
      sample = status .. " " .. string.sub(body, 1, 300)
    end
  end
end

function done(summary, latency, requests)
  local n, s = 0, ""
  for _, t in ipairs(threads) do
    n = n + t:get("denied")
    if s == "" then s = t:get("sample") end
  end
  io.write(string.format("not allowed: %d\n", n))
  if n > 0 then io.write("sample: " .. s .. "\n") end
end
