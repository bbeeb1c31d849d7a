#!/usr/bin/env bash
# Forward auth vs the JSON API, measured in one run (issue 5: "the forward-auth path is
# as fast as the JSON path").
#
#   bash benches/forward_auth_vs_json.sh            # needs wrk, nginx, curl, cargo
#
# Starts, all on loopback ports and inside one temp dir:
#   - an upstream API: nginx answering {"status":"compliant"} to everything
#     (benches/forward_auth/upstream-nginx.conf.template);
#   - verdict from `cargo build --release`, with a policy file holding one rule that
#     calls that API (uncached, so every decision makes one outbound call);
# then runs wrk (script benches/forward_auth/wrk.lua) against `POST /v1/decisions` and
# `GET /v1/forward-auth` (the same context as headers), alternating, RUNS times each,
# and prints the medians of requests/s, p50 and p99 and the ratio forward/json. Every
# answer must be an allow; a run with a deny or an error stops the script.
#
# Environment: THREADS (2), CONNECTIONS (32), DURATION (10s), RUNS (3), WARMUP (3s),
# NO_BUILD=1 to skip the cargo build,
# KEEP=1 to keep the temp dir (logs) afterwards.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
HERE=$ROOT/benches/forward_auth
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}
DURATION=${DURATION:-10s}
RUNS=${RUNS:-3}
WARMUP=${WARMUP:-3s}
TOKEN=bench-proxy-token-$RANDOM$RANDOM

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
for cmd in wrk curl cargo awk; do
  command -v "$cmd" >/dev/null 2>&1 || die "\`$cmd\` not found (apt-get install -y $cmd)"
done
NGINX=""
for p in "$(command -v nginx 2>/dev/null || true)" /usr/sbin/nginx /usr/local/sbin/nginx; do
  if [ -n "$p" ] && [ -x "$p" ]; then NGINX=$p && break; fi
done
[ -n "$NGINX" ] || die "nginx not found (apt-get install -y nginx)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/verdict-fa-bench.XXXXXX")
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ "${KEEP:-}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
    port_open "$p" || {
      echo "$p"
      return 0
    }
  done
  die "no free port"
}
# wait_port PID PORT NAME LOG
wait_port() {
  for _ in $(seq 1 400); do
    kill -0 "$1" 2>/dev/null || {
      sed 's/^/    /' "$4" >&2
      die "$3 exited at start"
    }
    port_open "$2" && return 0
    sleep 0.05
  done
  die "$3 did not listen on $2 within 20 s (see $4)"
}

# --- build ---------------------------------------------------------------------------
if [ "${NO_BUILD:-}" != 1 ]; then
  log "cargo build --release"
  cargo build --release --quiet
fi
BIN=$ROOT/target/release/verdict
[ -x "$BIN" ] || die "$BIN missing"

# --- upstream API --------------------------------------------------------------------
UP_PORT=$(free_port)
mkdir -p "$WORK/nginx"
GLOBALS="daemon off;"
[ "$(id -u)" = 0 ] && GLOBALS="$GLOBALS user root;"
sed -e "s|{{LISTEN}}|127.0.0.1:$UP_PORT|g" -e "s|{{PREFIX}}|$WORK/nginx|g" \
  "$HERE/upstream-nginx.conf.template" >"$WORK/nginx/nginx.conf"
"$NGINX" -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" -g "$GLOBALS" \
  >"$WORK/nginx/stderr.log" 2>&1 </dev/null &
PIDS+=($!)
wait_port "$!" "$UP_PORT" "upstream nginx" "$WORK/nginx/stderr.log"

# --- verdict -------------------------------------------------------------------------
mkdir -p "$WORK/policies" "$WORK/data"
cat >"$WORK/policies/bench.json" <<EOF
{
  "rules": [{
    "id": "posture",
    "method": "POST",
    "url": "http://127.0.0.1:$UP_PORT/v1/devices/%device_id%/check?user=%username%",
    "body": {"user": "%username%", "ip": "%remote_ip%", "groups": "%groups%",
             "lang": "%headers.Accept-Language%"},
    "response_actions": [{"type": "equals", "key": "\$.status", "value": "compliant"}],
    "cache_ttl_s": 0
  }],
  "policies": [{"id": "payroll-access", "applications": ["payroll"], "rules": ["posture"]}]
}
EOF
V_PORT=$(free_port)
VERDICT_PROXY_TOKEN=$TOKEN RUST_LOG=${RUST_LOG:-warn} "$BIN" serve --listen "127.0.0.1:$V_PORT" \
  --data-dir "$WORK/data" --policies "$WORK/policies" >"$WORK/verdict.log" 2>&1 </dev/null &
PIDS+=($!)
wait_port "$!" "$V_PORT" verdict "$WORK/verdict.log"
BASE=http://127.0.0.1:$V_PORT

# Both paths must allow before anything is measured (wrk counts non-2xx as errors).
JSON_BODY='{"application":"payroll","username":"alice@example.com","groups":["g-1001","g-1002"],"remote_ip":"203.0.113.7","user_agent":"wrk","device_id":"dev-42","headers":{"Accept-Language":"en-US"}}'
answer=$(curl -fsS -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d "$JSON_BODY" "$BASE/v1/decisions") || die "POST /v1/decisions failed"
case $answer in *'"decision":"allow"'*) ;; *) die "JSON path does not allow: $answer" ;; esac
code=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" \
  -H "X-Verdict-Application: payroll" -H "X-Forwarded-User: alice@example.com" \
  -H "X-Forwarded-Groups: g-1001,g-1002" -H "X-Real-IP: 203.0.113.7" -H "X-Device-Id: dev-42" \
  -H "Accept-Language: en-US" "$BASE/v1/forward-auth")
[ "$code" = 200 ] || die "forward-auth path answered $code, not 200"

# --- measure -------------------------------------------------------------------------
to_ms() {
  awk -v v="$1" 'BEGIN { n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
    printf "%.3f", n }'
}
# run NAME DURATION: one wrk run; appends "rps p50_ms p99_ms" to $WORK/NAME.txt.
# Every answer must be an allow (see wrk.lua), else the run is void and the script stops.
run() {
  local name=$1 duration=$2 out path=/v1/forward-auth
  [ "$name" = json ] && path=/v1/decisions
  out=$(VERDICT_BENCH_MODE=$name VERDICT_BENCH_TOKEN=$TOKEN VERDICT_BENCH_BODY=$JSON_BODY \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency -s "$HERE/wrk.lua" "$BASE$path")
  if grep -q "Non-2xx\|Socket errors" <<<"$out" || ! grep -q "^not allowed: 0$" <<<"$out"; then
    printf '%s\n' "$out" >&2
    log "verdict's log (last lines):"
    tail -n 5 "$WORK/verdict.log" >&2 || true
    die "$name: not every answer was an allow during the run; the numbers would be meaningless"
  fi
  local rps p50 p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  echo "$rps $p50 $p99" >>"$WORK/$name.txt"
  log "$name: $rps req/s, p50 $p50 ms, p99 $p99 ms"
}
median() { sort -g | awk '{a[NR] = $1} END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
col() { awk -v c="$2" '{print $c}' "$WORK/$1.txt" | median; }

log "warm-up ($WARMUP each)"
run json "$WARMUP" && run forward "$WARMUP"
: >"$WORK/json.txt"
: >"$WORK/forward.txt"
for i in $(seq 1 "$RUNS"); do
  log "run $i/$RUNS: $THREADS threads, $CONNECTIONS connections, $DURATION"
  run json "$DURATION"
  run forward "$DURATION"
done

J_RPS=$(col json 1) J_P50=$(col json 2) J_P99=$(col json 3)
F_RPS=$(col forward 1) F_P50=$(col forward 2) F_P99=$(col forward 3)
echo
echo "verdict forward auth vs JSON API — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, median of $RUNS runs each (alternating); one uncached rule calling a local nginx"
printf '%-28s %12s %10s %10s\n' path 'requests/s' 'p50 ms' 'p99 ms'
printf '%-28s %12s %10s %10s\n' "POST /v1/decisions" "$J_RPS" "$J_P50" "$J_P99"
printf '%-28s %12s %10s %10s\n' "GET /v1/forward-auth" "$F_RPS" "$F_P50" "$F_P99"
awk -v f="$F_RPS" -v j="$J_RPS" -v fp="$F_P50" -v jp="$J_P50" -v f9="$F_P99" -v j9="$J_P99" 'BEGIN {
  printf "ratio forward/json: requests/s %.3f, p50 %.3f, p99 %.3f\n", f / j, fp / jp, f9 / j9 }'
