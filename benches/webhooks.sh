#!/usr/bin/env bash
# Decision throughput with one webhook subscribed to every denied decision against
# none, measured in one run (issue 8; SPEC §10).
#
#   benches/webhooks.sh                     # RUNS=3 DURATION=10 WARMUP=3, ~3 min
#   NO_BUILD=1 VERDICT_BIN=/path/to/verdict RUNS=5 benches/webhooks.sh
#
# Needs: cargo (unless NO_BUILD=1), wrk, nginx, curl, awk (sqlite3 optional, for the
# cross-check of the outbox and the activity log). On Debian: apt-get install -y wrk
# nginx curl sqlite3.
#
# Starts, all on loopback ports inside one temp dir (removed at exit; KEEP=1 keeps it):
#   - the rule API: nginx answering {"status":"noncompliant"} to everything
#     (benches/webhooks/upstream-nginx.conf.template);
#   - the webhook receiver: a second nginx whose POST /hook answers 200 `ok` and logs
#     each call's X-Verdict-Event-Id (benches/webhooks/receiver-nginx.conf.template);
#   - verdict (release build; SQLite in the temp dir, the default config: activity log
#     durable before each answer, webhook worker poll_ms 1000, concurrency 32) with
#     benches/webhooks/policies.json.template: application `payroll` -> rule
#     `bench-deny` (one uncached POST to the API; equals $.status "compliant", so every
#     decision is a deny; on_error `allow`, so a rule error would not pass as a deny).
# Then wrk (benches/webhooks/deny.lua: POST /v1/decisions, same context every time,
# every answer checked to be a 200 deny) runs WARMUP seconds of each configuration,
# then RUNS rounds that alternate:
#   none     no webhook;
#   webhook  one webhook {"id":"bench","url":"http://127.0.0.1:<receiver>/hook",
#            "events":["decision.denied"]}, created with POST /v1/webhooks before the
#            run; after the run the script waits until the outbox has drained
#            (verdict_webhook_outbox_depth 0 in /metrics, and the delivered counter
#            caught up with the denied decisions), reads the newest delivery
#            (GET /v1/webhooks/bench/deliveries?limit=1), then deletes the webhook.
# It prints, and writes to benches/results/webhooks-latest.md (RESULTS=path to write
# elsewhere), the medians of requests/s, p50 and p99, the ratios webhook/none, and per
# run: the denies wrk saw, verdict's deny counter, the deliveries verdict counted
# (delivered / retry / failed), the calls the receiver logged (and distinct event
# ids), the drain times and verdict's CPU per decision. Mismatches are reported, not
# fatal; an answer that is not a 200 deny (or a wrk socket error) voids the run and
# stops the script. Nothing asserts on timing: the machine is shared.
#
# Environment: THREADS (2), CONNECTIONS (32), DURATION (10, seconds; "10s" accepted),
# WARMUP (3), RUNS (3), DRAIN_TIMEOUT (600 s per drain), VERDICT_BIN (a verdict binary;
# implies no build), NO_BUILD=1 (use ${CARGO_TARGET_DIR:-target}/release/verdict as
# it is), KEEP=1 (keep the temp dir: verdict.log, wrk output, receiver log, database).

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"
WH=$HERE/webhooks

# seconds NAME VALUE: "10" or "10s" -> 10.
seconds() {
  local v=${2%s}
  [[ $v =~ ^[0-9]+$ ]] || die "$1 must be a number of seconds, not \`$2\`"
  echo "$v"
}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}
DURATION=$(seconds DURATION "${DURATION:-10}")
WARMUP=$(seconds WARMUP "${WARMUP:-3}")
RUNS=${RUNS:-3}
DRAIN_TIMEOUT=$(seconds DRAIN_TIMEOUT "${DRAIN_TIMEOUT:-600}")
KEEP=${KEEP:-0}
RESULTS=${RESULTS:-$HERE/results/webhooks-latest.md}
PROXY_TOKEN=bench-proxy-$RANDOM$RANDOM
ADMIN_TOKEN=bench-admin-$RANDOM$RANDOM

need wrk curl awk sed
find_nginx >/dev/null

# --- build -----------------------------------------------------------------------
cd "$ROOT"
if [ -n "${VERDICT_BIN:-}" ]; then
  log "using VERDICT_BIN=$VERDICT_BIN (no build)"
else
  VERDICT_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/verdict
  if [ "${NO_BUILD:-0}" != 1 ]; then
    need cargo
    log "cargo build --release --bin verdict (target dir ${CARGO_TARGET_DIR:-$ROOT/target})"
    cargo build --release --bin verdict
  fi
fi
[ -x "$VERDICT_BIN" ] || die "$VERDICT_BIN missing (build it, or set VERDICT_BIN)"

TMP=$(mktemp -d -t verdict-webhooks-bench.XXXXXX)
cleanup() {
  local rc=$?
  stop_all
  if [ "$KEEP" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

LOAD_BEFORE=$(uptime)
log "load before: $LOAD_BEFORE"

# --- services --------------------------------------------------------------------
start_nginx "$WH/upstream-nginx.conf.template" "$TMP/api"
UPSTREAM="http://127.0.0.1:$NGINX_PORT"
start_nginx "$WH/receiver-nginx.conf.template" "$TMP/receiver"
HOOK_URL="http://127.0.0.1:$NGINX_PORT/hook"
HOOK_LOG=$TMP/receiver/hooks.log
log "rule API on $UPSTREAM, webhook receiver on $HOOK_URL"

mkdir -p "$TMP/policies" "$TMP/data" "$TMP/wrk"
sed "s|{{UPSTREAM}}|$UPSTREAM|g" "$WH/policies.json.template" >"$TMP/policies/bench.json"
export VERDICT_PROXY_TOKEN=$PROXY_TOKEN VERDICT_ADMIN_TOKEN=$ADMIN_TOKEN
start_verdict "$VERDICT_BIN" "$TMP/data" "$TMP/policies" "$TMP/verdict.log"
BASE="http://127.0.0.1:$VERDICT_PORT"
log "verdict on $BASE (pid $VERDICT_PID)"

# admin METHOD PATH [BODY]: an admin call; prints the answer, fails on non-2xx.
admin() {
  local args=(-fsS -X "$1" -H "Authorization: Bearer $ADMIN_TOKEN")
  if [ $# -ge 3 ]; then args+=(-H 'Content-Type: application/json' --data "$3"); fi
  curl "${args[@]}" "$BASE$2"
}
HOOK_SPEC="{\"id\":\"bench\",\"url\":\"$HOOK_URL\",\"events\":[\"decision.denied\"]}"
create_hook() { admin POST /v1/webhooks "$HOOK_SPEC" >/dev/null || die "POST /v1/webhooks failed"; }
delete_hook() { admin DELETE /v1/webhooks/bench >/dev/null || die "DELETE /v1/webhooks/bench failed"; }

# Before measuring: one decision is a 200 deny, and the receiver answers the test call.
BODY='{"application":"payroll","username":"alice@example.com","groups":["g-1001","g-1002"],"remote_ip":"203.0.113.7","device_id":"dev-42","user_agent":"wrk"}'
answer=$(curl -fsS -H "Authorization: Bearer $PROXY_TOKEN" -H 'Content-Type: application/json' \
  --data "$BODY" "$BASE/v1/decisions") || die "POST /v1/decisions failed"
[[ $answer == *'"decision":"deny"'* ]] || die "the benchmark decision is not a deny: $answer"
create_hook
answer=$(admin POST /v1/webhooks/bench/test) || die "POST /v1/webhooks/bench/test failed"
[[ $answer == *'"delivered":true'* ]] || die "the receiver did not take the test call: $answer"
delete_hook
sleep 1.2 # the receiver's log of the test call is flushed before the first count
log "decisions deny; the receiver takes the test call"

# --- measurement helpers -----------------------------------------------------------
now_ms() { echo $(($(date +%s%N) / 1000000)); }
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
scrape() { curl -fsS "$BASE/metrics" >"$TMP/metrics.prom" || die "GET /metrics failed"; }
# msum NAME [LABEL...]: sum of the series NAME in the last scrape whose labels contain
# every LABEL (e.g. 'state="delivered"'); 0 when there is none yet.
msum() {
  local name=$1
  shift
  awk -v name="$name" -v want="$*" 'BEGIN {n = split(want, w, " ")}
    $1 == name || index($1, name "{") == 1 {
      ok = 1; for (i = 1; i <= n; i++) if (index($0, w[i]) == 0) ok = 0
      if (ok) s += $NF }
    END {printf "%.0f\n", s}' "$TMP/metrics.prom"
}
# counters: a fresh scrape into C_DENY (deny decisions), C_DEL / C_RETRY / C_FAIL
# (deliveries of webhook `bench` by result) and C_DEPTH (outbox depth).
counters() {
  scrape
  C_DENY=$(msum verdict_decisions_total 'decision="deny"')
  C_DEL=$(msum verdict_webhook_deliveries_total 'webhook="bench"' 'state="delivered"')
  C_RETRY=$(msum verdict_webhook_deliveries_total 'webhook="bench"' 'state="retry"')
  C_FAIL=$(msum verdict_webhook_deliveries_total 'webhook="bench"' 'state="failed"')
  C_DEPTH=$(msum verdict_webhook_outbox_depth)
}
hook_lines() { if [ -f "$HOOK_LOG" ]; then wc -l <"$HOOK_LOG"; else echo 0; fi; }

# wrk_once SECONDS OUT: one wrk run; voids the benchmark unless every answer was a
# 200 deny; sets W_RPS W_P50 W_P99 (ms) W_REQUESTS W_DENIED.
wrk_once() {
  local secs=$1 out=$2 rps p50 p99 requests denied other non2xx errors
  BENCH_TOKEN=$PROXY_TOKEN wrk -t"$THREADS" -c"$CONNECTIONS" -d"${secs}s" --timeout 5s --latency \
    -s "$WH/deny.lua" "$BASE/v1/decisions" >"$out" 2>&1 || die "wrk failed: $(cat "$out")"
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
  p50=$(wrk_to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
  p99=$(wrk_to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
  requests=$(awk '/requests in/ {print $1}' "$out")
  denied=$(awk '/^denied:/ {print $2}' "$out")
  other=$(awk '/^not denied:/ {print $3}' "$out")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
  errors=$(awk '/Socket errors:/ {gsub(/,/, ""); print $4 + $6 + $8 + $10}' "$out")
  if [ -z "$rps" ] || [ -z "$denied" ]; then die "could not parse wrk output $out: $(cat "$out")"; fi
  if [ "${other:-1}" != 0 ] || [ "${non2xx:-0}" != 0 ] || [ "${errors:-0}" != 0 ]; then
    cat "$out" >&2
    log "verdict's log (last lines):"
    tail -n 5 "$TMP/verdict.log" >&2 || true
    die "not every answer was a 200 deny (or wrk had socket errors): the run is void"
  fi
  W_RPS=$rps W_P50=$p50 W_P99=$p99 W_REQUESTS=${requests:-0} W_DENIED=$denied
}

# drain DENIES0 DELIVERED0 FAILED0 T_END: after a webhook run, polls /metrics every
# 0.2 s until the outbox depth reads 0 (the gauge is refreshed about every poll_ms, so
# not before 1.2 s after the run) and delivered + failed since the run started cover
# verdict's denies since then; gives up after the depth has read 0 for 5 s without
# that (a mismatch) or after DRAIN_TIMEOUT. Sets CAUGHT and ZERO: ms after the end of
# the wrk run ("-" when never reached).
drain() {
  local d0=$1 del0=$2 f0=$3 t_end=$4 caught=- zero=- el deny del fail depth
  while :; do
    counters
    deny=$C_DENY del=$C_DEL fail=$C_FAIL depth=$C_DEPTH
    el=$(($(now_ms) - t_end))
    if [ "$caught" = - ] && [ $((del - del0 + fail - f0)) -ge $((deny - d0)) ]; then caught=$el; fi
    if [ "$depth" = 0 ]; then
      [ "$zero" != - ] || zero=$el
    else
      zero=-
    fi
    if [ "$zero" != - ] && [ "$el" -ge 1200 ]; then
      [ "$caught" = - ] || break
      if [ $((el - zero)) -ge 5000 ]; then
        log "outbox depth 0 for 5 s, but delivered + failed ($((del - del0 + fail - f0))) < denies ($((deny - d0)))"
        break
      fi
    fi
    if [ "$el" -ge $((DRAIN_TIMEOUT * 1000)) ]; then
      log "the outbox did not drain within ${DRAIN_TIMEOUT}s (depth $depth)"
      break
    fi
    sleep 0.2
  done
  CAUGHT=$caught ZERO=$zero
}

# measure CONFIG LABEL SECONDS: one round of CONFIG (none | webhook); LABEL is the run
# number or "warmup". Appends a row to $RAW (measured runs only).
RAW=$TMP/runs.tsv
: >"$RAW"
measure() {
  local config=$1 label=$2 secs=$3 out="$TMP/wrk/$1-$2.txt"
  local d0 del0 r0 f0 h0 h1 c0 c1 t_end distinct cpu cpu_d last during cpu_drain=0
  CAUGHT=- ZERO=-
  if [ "$config" = webhook ]; then create_hook; fi
  counters
  d0=$C_DENY del0=$C_DEL r0=$C_RETRY f0=$C_FAIL
  h0=$(hook_lines)
  c0=$(cpu_ticks "$VERDICT_PID")
  wrk_once "$secs" "$out"
  t_end=$(now_ms)
  c1=$(cpu_ticks "$VERDICT_PID")
  counters
  during=$((C_DEL - del0)) # delivered while wrk ran
  if [ "$config" = webhook ]; then
    drain "$d0" "$del0" "$f0" "$t_end"
    cpu_drain=$(($(cpu_ticks "$VERDICT_PID") - c1))
    last=$(admin GET '/v1/webhooks/bench/deliveries?limit=1' | tr -d '\n' | cut -c1-600) ||
      die "GET /v1/webhooks/bench/deliveries failed"
    echo "$label $last" >>"$TMP/last-deliveries.txt"
    delete_hook
  fi
  sleep 1.2 # the receiver flushes its log within 1 s
  counters
  h1=$(hook_lines)
  distinct=0
  if [ "$h1" -gt "$h0" ]; then distinct=$(tail -n +"$((h0 + 1))" "$HOOK_LOG" | awk '{print $3}' | sort -u | wc -l); fi
  cpu=$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$W_REQUESTS" 'BEGIN {printf "%.1f", (n > 0 ? t / hz * 1e6 / n : 0)}')
  cpu_d=$(awk -v t="$cpu_drain" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", t / hz}')
  log "$(printf '%-7s %-6s %9.1f req/s  p50 %s ms  p99 %s ms  denied %s (verdict %s)  delivered %s retry %s failed %s  receiver %s (%s ids)  drain %s/%s ms  cpu %s us/req, %s s draining (%s delivered during the run)' \
    "$config" "$label" "$W_RPS" "$W_P50" "$W_P99" "$W_DENIED" $((C_DENY - d0)) $((C_DEL - del0)) $((C_RETRY - r0)) \
    $((C_FAIL - f0)) $((h1 - h0)) "$distinct" "$CAUGHT" "$ZERO" "$cpu" "$cpu_d" "$during")"
  if [ "$label" != warmup ]; then
    # config run rps p50 p99 requests denied verdict_denies delivered retry failed
    # receiver_calls receiver_ids caught_ms zero_ms cpu_us_per_req cpu_drain_s depth_after
    # delivered_during_run
    echo "$config $label $W_RPS $W_P50 $W_P99 $W_REQUESTS $W_DENIED $((C_DENY - d0)) $((C_DEL - del0))" \
      "$((C_RETRY - r0)) $((C_FAIL - f0)) $((h1 - h0)) $distinct $CAUGHT $ZERO $cpu $cpu_d $C_DEPTH $during" >>"$RAW"
  fi
}

if [ "$WARMUP" -gt 0 ]; then
  log "warm-up: ${WARMUP}s of each configuration"
  measure none warmup "$WARMUP"
  measure webhook warmup "$WARMUP"
fi
for run in $(seq 1 "$RUNS"); do
  log "run $run/$RUNS: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s"
  measure none "$run" "$DURATION"
  measure webhook "$run" "$DURATION"
done

LOAD_AFTER=$(uptime)
log "load after: $LOAD_AFTER"

# --- cross-checks ------------------------------------------------------------------
RECEIVER_ALL=$(hook_lines)
RECEIVER_IDS=$(awk '{print $3}' "$HOOK_LOG" 2>/dev/null | sort -u | wc -l)
RECEIVER_NON200=$(awk '$2 != 200' "$HOOK_LOG" 2>/dev/null | wc -l)
DB_CHECK="(sqlite3 not installed)"
if command -v sqlite3 >/dev/null 2>&1 && [ -f "$TMP/data/verdict.db" ]; then
  DB_CHECK=$(sqlite3 "$TMP/data/verdict.db" \
    "select 'activity: ' || (select count(*) from activity where decision = 'deny') || ' denies, ' ||
       (select count(*) from activity where decision <> 'deny') || ' other; outbox rows of bench: ' ||
       coalesce((select group_concat(state || ' ' || c || ' (' || a || ' attempts)', ', ') from
         (select state, count(*) as c, sum(attempts) as a from webhook_deliveries where webhook_id = 'bench' group by state)), 'none') ||
       '; distinct event ids ' || (select count(distinct event_id) from webhook_deliveries where webhook_id = 'bench')" 2>&1 || true)
fi
# WARN and ERROR lines of verdict's log, without colours and timestamps, counted.
sed 's/\x1b\[[0-9;]*m//g' "$TMP/verdict.log" | grep -E '^[^ ]+ +(WARN|ERROR) ' | sed -E 's/^[^ ]+ +//' >"$TMP/log-problems.txt" || true
LOG_PROBLEMS=$(wc -l <"$TMP/log-problems.txt")
LOG_SAMPLE=$(sort "$TMP/log-problems.txt" | uniq -c | sort -rn | head -n 5 | cut -c1-300 | sed 's/^/    /')

# --- summary -----------------------------------------------------------------------
# median CONFIG COLUMN (1-based, as in $RAW)
median() {
  awk -v n="$1" -v c="$2" '$1 == n && $c != "-" {print $c}' "$RAW" | sort -g |
    awk '{v[NR] = $1} END {if (NR == 0) {print "nan"; exit} if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.3f", m}'
}
total() { awk -v n="$1" -v c="$2" '$1 == n {s += $c} END {printf "%.0f", s}' "$RAW"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "nan" || b == "nan" || b <= 0) print "n/a"; else printf "%.2f", a / b}'; }

N_RPS=$(median none 3) N_P50=$(median none 4) N_P99=$(median none 5)
W_RPS=$(median webhook 3) W_P50=$(median webhook 4) W_P99=$(median webhook 5)
W_DENIED=$(total webhook 7) W_VDENIES=$(total webhook 8) W_DELIVERED=$(total webhook 9)
W_RETRY=$(total webhook 10) W_FAILED=$(total webhook 11) W_RECEIVED=$(total webhook 12) W_IDS=$(total webhook 13)
N_DELIVERED=$(total none 9)
if [ "$W_DELIVERED" = "$W_VDENIES" ] && [ "$W_FAILED" = 0 ]; then
  MATCH="match: every denied decision verdict counted produced one delivered event"
else
  MATCH="**MISMATCH**: $W_VDENIES denies counted by verdict, $W_DELIVERED delivered, $W_FAILED failed"
fi

mkdir -p "$(dirname "$RESULTS")"
{
  echo "# verdict: decision throughput with one webhook on every deny vs none"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted changes in src/')"
  echo "- machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), shared with wrk, both nginx and whatever else runs (other builds and tests: noisy; compare the ratio, not absolute numbers across runs)"
  echo "- load before: \`${LOAD_BEFORE##*load average: }\`, after: \`${LOAD_AFTER##*load average: }\` (1, 5, 15 min)"
  echo "- wrk: -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency, POST /v1/decisions (application \`payroll\`, one uncached rule whose API answers \`noncompliant\`: every answer a 200 deny, checked); $RUNS alternating rounds after ${WARMUP}s warm-up of each; medians over the rounds"
  echo "- verdict: release build, SQLite in the temp dir, default config (activity log and outbox fsynced before each answer; webhook worker poll_ms 1000, concurrency 32)"
  echo "- webhook: \`${HOOK_SPEC//$HOOK_URL/http://127.0.0.1:<receiver>/hook}\`, receiver nginx answering 200 \`ok\`; created before each webhook run, deleted after its outbox drained"
  echo
  echo "| configuration | req/s | p50 ms | p99 ms | req/s per run |"
  echo "| --- | ---: | ---: | ---: | --- |"
  for c in none webhook; do
    printf '| %s | %.0f | %.2f | %.2f | %s |\n' "$([ $c = none ] && echo 'no webhook' || echo 'one webhook (decision.denied)')" \
      "$(median $c 3)" "$(median $c 4)" "$(median $c 5)" "$(awk -v n=$c '$1 == n {printf "%s%.0f", sep, $3; sep = ", "}' "$RAW")"
  done
  echo
  echo "webhook / none: requests/s **$(ratio "$W_RPS" "$N_RPS")×**, p50 $(ratio "$W_P50" "$N_P50")×, p99 $(ratio "$W_P99" "$N_P99")×"
  echo
  echo "Deliveries over the $RUNS webhook runs: wrk saw $W_DENIED denies; verdict counted $W_VDENIES deny decisions; delivered $W_DELIVERED, retried $W_RETRY, failed $W_FAILED; the receiver logged $W_RECEIVED calls with $W_IDS distinct event ids — $MATCH. (No-webhook runs delivered $N_DELIVERED.) verdict may count a few more denies than wrk saw: requests in flight when wrk stops are decided but not counted by wrk."
  echo
  echo "Drain after each webhook run, from the end of wrk: when delivered + failed caught up with verdict's denies (polled every 0.2 s), and when \`verdict_webhook_outbox_depth\` first read 0 (the gauge is refreshed about once a second). The rate is what was delivered after the run over the catch-up time; the CPU per delivery is verdict's CPU time during the drain (nothing else runs then) over those deliveries."
  echo
  echo "| run | denies | delivered during the run | after it | caught up after | depth 0 read after | drain rate /s | verdict CPU µs per delivery |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  awk '$1 == "webhook" {after = $9 - $19
    ca = ($14 == "-") ? "not reached" : sprintf("%.1f s", $14 / 1000); z = ($15 == "-") ? "not reached" : sprintf("%.1f s", $15 / 1000)
    rate = ($14 == "-" || $14 <= 0) ? "-" : sprintf("%.0f", after / ($14 / 1000))
    cpu = (after > 0) ? sprintf("%.0f", $17 * 1e6 / after) : "-"
    printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $2, $8, $19, after, ca, z, rate, cpu}' "$RAW"
  echo
  echo "## Per run"
  echo
  echo "| config | run | req/s | p50 ms | p99 ms | wrk requests | wrk denies | verdict denies | delivered | retry | failed | receiver calls (ids) | verdict CPU µs/req during wrk | verdict CPU s draining |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  awk '{printf "| %s | %s | %.0f | %.2f | %.2f | %s | %s | %s | %s | %s | %s | %s (%s) | %s | %s |\n",
      $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $16, $17}' "$RAW"
  echo
  echo "Newest delivery after each webhook run (\`GET /v1/webhooks/bench/deliveries?limit=1\`, cut to 600 characters):"
  echo
  if [ -s "$TMP/last-deliveries.txt" ]; then sed 's/^/    /' "$TMP/last-deliveries.txt"; fi
  echo
  echo "Cross-checks at the end: database $DB_CHECK; receiver log $RECEIVER_ALL calls (warm-up and test call included), $RECEIVER_IDS distinct event ids, $RECEIVER_NON200 not answered 200. verdict's log: $LOG_PROBLEMS WARN/ERROR lines$([ "$LOG_PROBLEMS" = 0 ] || printf '; most frequent:\n\n%s' "$LOG_SAMPLE")"
} >"$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"
echo
cat "$RESULTS"
echo
log "written to $RESULTS"
