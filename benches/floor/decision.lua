-- wrk script: POST one decision request (SPEC §3) with a bearer token.
-- Environment: BENCH_APP (application, default "bench"), BENCH_TOKEN (proxy token;
-- sent to the floor too, which ignores it, so both get the same bytes).
local app = os.getenv("BENCH_APP") or "bench"
local token = os.getenv("BENCH_TOKEN") or ""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
wrk.body = '{"application":"' .. app .. '","username":"alice@example.com",'
  .. '"groups":["g-1001","g-1002"],"remote_ip":"203.0.113.7","device_id":"dev-42",'
  .. '"user_agent":"wrk"}'
