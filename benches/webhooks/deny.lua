-- wrk script for benches/webhooks.sh: POST one decision request (SPEC §3) for
-- application `payroll` with the proxy token in BENCH_TOKEN, and check every answer.
-- The policy denies every request whose rule ran (the API says "noncompliant"); its
-- `on_error` is `allow`, so a rule error would show here as an answer that is not a
-- deny. `done` prints "denied: N" (200 answers saying "decision":"deny") and
-- "not denied: M" with a sample of the first one.
local token = os.getenv("BENCH_TOKEN") or ""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. token
wrk.body = '{"application":"payroll","username":"alice@example.com",'
  .. '"groups":["g-1001","g-1002"],"remote_ip":"203.0.113.7","device_id":"dev-42",'
  .. '"user_agent":"wrk"}'

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  denied = 0
  other = 0
  sample = ""
end

function response(status, headers, body)
  if status == 200 and string.find(body, '"decision":"deny"', 1, true) then
    denied = denied + 1
  else
    other = other + 1
    if sample == "" then
      sample = status .. " " .. string.sub(body, 1, 300)
    end
  end
end

function done(summary, latency, requests)
  local d, o, s = 0, 0, ""
  for _, t in ipairs(threads) do
    d = d + t:get("denied")
    o = o + t:get("other")
    if s == "" then s = t:get("sample") end
  end
  io.write(string.format("denied: %d\nnot denied: %d\n", d, o))
  if o > 0 then io.write("sample: " .. s .. "\n") end
end
