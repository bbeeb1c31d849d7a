-- wrk script for benches/soak.sh: POST decisions for application `soak`, and for
-- every answer record its decision_id (one file per wrk thread, SOAK_IDS_DIR/ids-N.txt),
-- count the statuses, and keep the largest server-side latency_ms seen.
-- Environment: SOAK_TOKEN (proxy token), SOAK_IDS_DIR.
local token = os.getenv("SOAK_TOKEN") or ""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. token
wrk.body = '{"application":"soak","username":"alice@example.com","groups":["g-1001"],'
  .. '"remote_ip":"203.0.113.7","device_id":"dev-42","user_agent":"wrk-soak"}'

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

local out
answered, allowed, other, max_latency_ms = 0, 0, 0, 0

function init(args)
  out = assert(io.open((os.getenv("SOAK_IDS_DIR") or ".") .. "/ids-" .. tid .. ".txt", "w"))
  out:setvbuf("line")
end

function response(status, headers, body)
  if status ~= 200 then
    other = other + 1
    return
  end
  local id = body:match('"decision_id":"([^"]+)"')
  if id then
    out:write(id, "\n")
    answered = answered + 1
  end
  if body:find('"decision":"allow"', 1, true) then
    allowed = allowed + 1
  end
  -- The decision's own latency_ms is the answer's last field.
  local ms = tonumber(body:match('"latency_ms":([%d%.]+)}%s*$') or "0")
  if ms > max_latency_ms then
    max_latency_ms = ms
  end
end

function done(summary, latency, requests)
  local a, al, o, m = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("answered")
    al = al + t:get("allowed")
    o = o + t:get("other")
    m = math.max(m, t:get("max_latency_ms"))
  end
  io.write(string.format("SOAK answered=%d allowed=%d non200=%d max_server_latency_ms=%.2f max_client_latency_ms=%.2f\n",
    a, al, o, m, latency.max / 1000))
end
