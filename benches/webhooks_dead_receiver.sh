#!/usr/bin/env bash
# Issue 8: "A dead or slow receiver never slows decisions and never grows memory
# without bound (the outbox lives in the store)." Measures exactly that, in one run:
#
#   benches/webhooks_dead_receiver.sh                 # ~3.5 min with the defaults
#   NO_BUILD=1 SOAK_SECONDS=120 benches/webhooks_dead_receiver.sh
#
# Same setup as benches/webhooks.sh (its templates are used in place): nginx as the
# rule API answering {"status":"noncompliant"} (webhooks/upstream-nginx.conf.template),
# verdict (release build, SQLite in the temp dir, default config) with
# webhooks/policies.json.template, so every decision is a deny, and wrk with
# webhooks/deny.lua (every answer checked to be a 200 deny). Phases, back to back:
#
#   baseline  BASELINE_SECONDS of wrk, no webhook;
#   healthy   reference: HEALTHY_SECONDS (default BASELINE_SECONDS; 0 skips) with
#             webhook "ok" to a receiver nginx answering 200 (webhooks/receiver-nginx
#             .conf.template), then waits for its outbox to drain and deletes it: what
#             a webhook costs decisions when its receiver is fine;
#   dead      webhook {"id":"dead","url":"http://127.0.0.1:<closed port>/hook",
#             "events":["decision.denied"],"max_attempts":8} (connection refused),
#             SOAK_SECONDS of wrk;
#   hang      "dead" deleted (its pending rows then fail as "deleted"), webhook
#             {"id":"hang",...,"timeout_ms":5000} to webhooks/hang_receiver.py, which
#             accepts, reads and never answers; SOAK_SECONDS of wrk;
#   drain     no load; "hang" is PUT to point at the receiver nginx, the hanging
#             receiver is stopped, and the outbox is polled until nothing is pending
#             or DRAIN_TIMEOUT.
#
# Every SAMPLE_SECONDS (and at the start and end of each phase) it records verdict's
# VmRSS, verdict_webhook_outbox_depth, verdict's deny counter, the phase's webhook
# delivery counters (verdict_webhook_deliveries_total by state: delivered, retry,
# failed — attempts, not events), the size of the data dir, verdict's CPU time and,
# when sqlite3 is installed, the pending rows per webhook read from the database.
# It prints, and writes to benches/results/webhooks-dead-receiver-latest.md
# (RESULTS=path elsewhere), a table per phase, the series, the drain outcome, the
# final state of the outbox, verdict's WARN/ERROR lines and the raw samples.
#
# Nothing asserts on timing (the machine is shared); it exits non-zero if verdict
# exits or stops answering, or if any decision answer is not a 200 deny (or wrk has
# socket errors).
#
# Environment: THREADS (2), CONNECTIONS (32), BASELINE_SECONDS (20), HEALTHY_SECONDS
# (= BASELINE_SECONDS), SOAK_SECONDS (60), SAMPLE_SECONDS (5), DRAIN_TIMEOUT (300 s),
# VERDICT_BIN (a binary; no build), NO_BUILD=1 (use ${CARGO_TARGET_DIR:-target}/release/verdict as it is), KEEP=1 (keep
# the temp dir: verdict.log, wrk output, receiver logs, database, samples.tsv).
# Needs wrk, nginx, curl, python3, awk; sqlite3 optional.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"
WH=$HERE/webhooks

whole() {
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a whole number (seconds), not \`$2\`"
  echo "$2"
}
THREADS=$(whole THREADS "${THREADS:-2}")
CONNECTIONS=$(whole CONNECTIONS "${CONNECTIONS:-32}")
BASELINE_SECONDS=$(whole BASELINE_SECONDS "${BASELINE_SECONDS:-20}")
SOAK_SECONDS=$(whole SOAK_SECONDS "${SOAK_SECONDS:-60}")
HEALTHY_SECONDS=$(whole HEALTHY_SECONDS "${HEALTHY_SECONDS:-$BASELINE_SECONDS}")
SAMPLE_SECONDS=$(whole SAMPLE_SECONDS "${SAMPLE_SECONDS:-5}")
DRAIN_TIMEOUT=$(whole DRAIN_TIMEOUT "${DRAIN_TIMEOUT:-300}")
[ "$SAMPLE_SECONDS" -gt 0 ] || die "SAMPLE_SECONDS must be > 0"
KEEP=${KEEP:-0}
RESULTS=${RESULTS:-$HERE/results/webhooks-dead-receiver-latest.md}
need wrk curl awk sed python3
find_nginx >/dev/null
HAVE_SQLITE=0
if command -v sqlite3 >/dev/null 2>&1; then HAVE_SQLITE=1; fi

if [ -z "${VERDICT_BIN:-}" ]; then
  VERDICT_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/verdict
  if [ "${NO_BUILD:-0}" != 1 ]; then
    need cargo
    log "building verdict (release) into ${CARGO_TARGET_DIR:-$ROOT/target}"
    (cd "$ROOT" && cargo build --release --bin verdict) || die "cargo build failed"
  fi
fi
[ -x "$VERDICT_BIN" ] || die "no verdict binary at $VERDICT_BIN"

TMP=$(mktemp -d -t verdict-dead-receiver.XXXXXX)
on_exit() {
  local rc=$?
  stop_all
  if [ "$KEEP" = 1 ]; then log "temp dir kept: $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# forget PID: a process this script already reaped is no longer stop_all's business.
forget() {
  local keep=() p
  for p in "${BG_PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  BG_PIDS=("${keep[@]}")
}

LOAD_BEFORE=$(uptime)
log "load before: ${LOAD_BEFORE##*average: }"

# --- services --------------------------------------------------------------------
start_nginx "$WH/upstream-nginx.conf.template" "$TMP/api"
mkdir -p "$TMP/policies" "$TMP/data"
sed "s|{{UPSTREAM}}|http://127.0.0.1:$NGINX_PORT|g" "$WH/policies.json.template" >"$TMP/policies/bench.json"
PROXY_TOKEN=dr-proxy-$RANDOM$RANDOM
ADMIN_TOKEN=dr-admin-$RANDOM$RANDOM
export VERDICT_PROXY_TOKEN=$PROXY_TOKEN VERDICT_ADMIN_TOKEN=$ADMIN_TOKEN BENCH_TOKEN=$PROXY_TOKEN
start_verdict "$VERDICT_BIN" "$TMP/data" "$TMP/policies" "$TMP/verdict.log"
BASE=http://127.0.0.1:$VERDICT_PORT
DB=$TMP/data/verdict.db
log "verdict pid $VERDICT_PID on $BASE; rule API nginx on port $NGINX_PORT"

# api METHOD PATH [JSON]: an admin call to verdict; prints the answer body.
api() {
  local extra=()
  [ $# -lt 3 ] || extra=(-H 'Content-Type: application/json' --data "$3")
  curl -fsS -X "$1" -H "Authorization: Bearer $ADMIN_TOKEN" "${extra[@]}" "$BASE$2" || die "$1 $2 failed"
}

first=$(curl -fsS -H "Authorization: Bearer $PROXY_TOKEN" -H 'Content-Type: application/json' "$BASE/v1/decisions" \
  --data '{"application":"payroll","username":"alice@example.com","groups":["g-1001"],"remote_ip":"203.0.113.7","device_id":"dev-42"}') ||
  die "POST /v1/decisions failed"
[[ $first == *'"decision":"deny"'* ]] || die "the benchmark decision is not a deny: $first"

# --- sampling ----------------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)
SAMPLES=$TMP/samples.tsv
printf 'phase\tt_s\trss_kib\toutbox_depth\tdenies\tdelivered\tretry\tfailed\tdata_dir_kib\tcpu_s\tpending_by_webhook\n' >"$SAMPLES"

alive() { kill -0 "$VERDICT_PID" 2>/dev/null || die "verdict (pid $VERDICT_PID) is gone; last log lines: $(tail -n 5 "$TMP/verdict.log")"; }

# probe HOOK: reads /metrics into M_DEPTH M_DENY and HOOK's M_DEL M_RETRY M_FAIL.
probe() {
  local row
  row=$(curl -fsS --max-time 10 "$BASE/metrics" | awk -v want="webhook=\"$1\"" '
    $1 == "verdict_webhook_outbox_depth" {depth = $2}
    index($1, "verdict_decisions_total{") == 1 && index($1, "decision=\"deny\"") {deny += $2}
    index($1, "verdict_webhook_deliveries_total{") == 1 && index($1, want) {
      st = $1; sub(/.*state="/, "", st); sub(/".*/, "", st); n[st] += $2 }
    END {printf "%d %d %d %d %d\n", depth, deny, n["delivered"], n["retry"], n["failed"]}') ||
    die "GET /metrics failed (verdict not answering?)"
  read -r M_DEPTH M_DENY M_DEL M_RETRY M_FAIL <<<"$row"
}

# pending_split: "dead:123,hang:45" (pending rows per webhook in the database), "0"
# when none, "-" without sqlite3.
pending_split() {
  [ "$HAVE_SQLITE" = 1 ] || {
    echo -
    return
  }
  sqlite3 -cmd '.timeout 5000' "$DB" "SELECT coalesce(group_concat(webhook_id || ':' || n, ','), '0') FROM
    (SELECT webhook_id, count(*) AS n FROM webhook_deliveries WHERE state = 'pending' GROUP BY webhook_id)" 2>/dev/null || echo '?'
}

# sample PHASE T_S HOOK: one row of $SAMPLES (also left in S_* for the caller).
sample() {
  alive
  probe "$3"
  S_RSS=$(rss_kib "$VERDICT_PID")
  S_DISK=$(du -sk "$TMP/data" | cut -f1)
  S_CPU=$(awk -v hz="$CLK_TCK" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$VERDICT_PID/stat")
  S_SPLIT=$(pending_split)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$S_RSS" "$M_DEPTH" "$M_DENY" "$M_DEL" "$M_RETRY" \
    "$M_FAIL" "$S_DISK" "$S_CPU" "$S_SPLIT" >>"$SAMPLES"
  log "$(printf '%-8s t=%-5s rss %s KiB  depth %s  denies %s  %s: delivered %s retry %s failed %s  data %s KiB  pending %s' \
    "$1" "$2" "$S_RSS" "$M_DEPTH" "$M_DENY" "${3:-no hook}" "$M_DEL" "$M_RETRY" "$M_FAIL" "$S_DISK" "$S_SPLIT")"
}

elapsed_s() { awk -v a="$1" -v b="$(date +%s%N)" 'BEGIN {printf "%.1f", (b - a) / 1e9}'; }

# load PHASE SECONDS HOOK: wrk against POST /v1/decisions for SECONDS, sampled every
# SAMPLE_SECONDS; appends "phase rps p50 p99 requests denied" to $TMP/phases.txt.
load() {
  local phase=$1 secs=$2 hook=$3 out=$TMP/wrk-$1.txt t0 k=1 wpid rc=0 rps p50 p99 req den oth bad
  t0=$(date +%s%N)
  sample "$phase" 0.0 "$hook"
  spawn "$out" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${secs}s" --timeout 5s --latency -s "$WH/deny.lua" "$BASE/v1/decisions"
  wpid=$SPAWNED
  while kill -0 "$wpid" 2>/dev/null; do
    sleep 0.2
    if [ $((($(date +%s%N) - t0) / 1000000000)) -ge $((k * SAMPLE_SECONDS)) ] && [ $((k * SAMPLE_SECONDS)) -lt "$secs" ]; then
      sample "$phase" "$(elapsed_s "$t0")" "$hook"
      k=$((k + 1))
    fi
  done
  wait "$wpid" || rc=$?
  forget "$wpid"
  [ "$rc" = 0 ] || die "wrk exited with $rc: $(cat "$out")"
  sample "$phase" "$(elapsed_s "$t0")" "$hook"
  read -r rps p50 p99 req den oth bad <<<"$(awk '
    /^Requests\/sec:/ {rps = $2}
    $1 == "50%" {p50 = $2}
    $1 == "99%" {p99 = $2}
    / requests in / {req = $1}
    /^denied:/ {den = $2}
    /^not denied:/ {oth = $3}
    /Non-2xx or 3xx responses:/ {bad += $NF}
    /Socket errors:/ {gsub(/,/, ""); bad += $4 + $6 + $8 + $10}
    END {print (rps == "" ? "-" : rps), (p50 == "" ? "-" : p50), (p99 == "" ? "-" : p99), req + 0, den + 0, (oth == "" ? "-" : oth), bad + 0}' "$out")"
  if [ "$rps" = - ] || [ "$oth" != 0 ] || [ "$bad" != 0 ]; then
    cat "$out" >&2
    die "$phase: not every decision answer was a 200 deny (not denied: $oth, non-2xx + socket errors: $bad)"
  fi
  echo "$phase $rps $(wrk_to_ms "$p50") $(wrk_to_ms "$p99") $req $den" >>"$TMP/phases.txt"
  log "$phase: $rps req/s, p50 $p50, p99 $p99, $den denies, all 200 deny"
}

# settle PHASE HOOK TIMEOUT: no load; polls every second until nothing is pending
# (counted in the database when sqlite3 is there, and the gauge reads 0 too),
# sampling every SAMPLE_SECONDS; SETTLED = seconds it took, "-" after TIMEOUT.
settle() {
  local t0 el left next=$SAMPLE_SECONDS
  t0=$(date +%s%N)
  SETTLED=-
  sample "$1" 0.0 "$2"
  while :; do
    sleep 1
    alive
    probe "$2"
    el=$(elapsed_s "$t0")
    left=$M_DEPTH
    if [ "$HAVE_SQLITE" = 1 ]; then
      left=$(sqlite3 -cmd '.timeout 5000' "$DB" "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'" 2>/dev/null || echo "$M_DEPTH")
    fi
    if [ "$left" = 0 ] && [ "$M_DEPTH" = 0 ]; then
      SETTLED=$el
      sample "$1" "$el" "$2"
      return 0
    fi
    if awk -v e="$el" -v t="$3" 'BEGIN {exit !(e >= t)}'; then
      sample "$1" "$el" "$2"
      log "$1: still $left pending after ${3}s"
      return 0
    fi
    if awk -v e="$el" -v n="$next" 'BEGIN {exit !(e >= n)}'; then
      sample "$1" "$el" "$2"
      next=$((next + SAMPLE_SECONDS))
    fi
  done
}

# --- 1. baseline -------------------------------------------------------------------
: >"$TMP/phases.txt"
log "baseline: ${BASELINE_SECONDS}s, no webhook"
load baseline "$BASELINE_SECONDS" ""

# --- 1b. reference: a healthy receiver ---------------------------------------------
# What an outbox row and its delivery cost when the receiver is fine, so that the
# dead and hanging phases can be told apart from the price of having a webhook at all.
start_nginx "$WH/receiver-nginx.conf.template" "$TMP/receiver"
RECEIVER_URL=http://127.0.0.1:$NGINX_PORT/hook
if [ "$HEALTHY_SECONDS" -gt 0 ]; then
  api POST /v1/webhooks "{\"id\":\"ok\",\"url\":\"$RECEIVER_URL\",\"events\":[\"decision.denied\"]}" >/dev/null
  [[ $(api POST /v1/webhooks/ok/test) == *'"delivered":true'* ]] || die "the receiver nginx did not take the test call"
  log "healthy: ${HEALTHY_SECONDS}s, webhook ok -> receiver nginx (reference)"
  load healthy "$HEALTHY_SECONDS" ok
  settle healthy-drain ok 120
  api DELETE /v1/webhooks/ok >/dev/null
fi

# --- 2. dead receiver (connection refused) -----------------------------------------
CLOSED=$(free_port)
api POST /v1/webhooks "{\"id\":\"dead\",\"url\":\"http://127.0.0.1:$CLOSED/hook\",\"events\":[\"decision.denied\"],\"max_attempts\":8}" >/dev/null
DEAD_TEST=$(api POST /v1/webhooks/dead/test | tr -d '\n' | cut -c1-300)
log "dead receiver on closed port $CLOSED; test call: $DEAD_TEST"
load dead "$SOAK_SECONDS" dead
DEAD_SPLIT=$S_SPLIT

# --- 3. hanging receiver -----------------------------------------------------------
api DELETE /v1/webhooks/dead >/dev/null
for try in 1 2 3 4 5; do
  HANG_PORT=$(free_port)
  spawn "$TMP/hang-receiver.log" python3 "$WH/hang_receiver.py" "$HANG_PORT"
  HANG_PID=$SPAWNED
  if wait_port "$HANG_PID" "$HANG_PORT" hang-receiver "$TMP/hang-receiver.log"; then break; fi
  [ "$try" -lt 5 ] || die "the hanging receiver did not start"
done
HANG_SPEC='"id":"hang","events":["decision.denied"],"timeout_ms":5000'
api POST /v1/webhooks "{$HANG_SPEC,\"url\":\"http://127.0.0.1:$HANG_PORT/hook\"}" >/dev/null
HANG_TEST=$(api POST /v1/webhooks/hang/test | tr -d '\n' | cut -c1-300)
log "hanging receiver on port $HANG_PORT (pid $HANG_PID); test call: $HANG_TEST"
load hang "$SOAK_SECONDS" hang
HANG_SPLIT=$S_SPLIT

# --- 4. recovery -------------------------------------------------------------------
RECV0=$(wc -l <"$TMP/receiver/hooks.log" 2>/dev/null || echo 0)
probe hang
D_DEL0=$M_DEL D_RETRY0=$M_RETRY D_FAIL0=$M_FAIL
api PUT /v1/webhooks/hang "{$HANG_SPEC,\"url\":\"$RECEIVER_URL\"}" >/dev/null
stop_pid "$HANG_PID" 5
forget "$HANG_PID"
log "webhook hang now points at the receiver nginx; hanging receiver stopped; draining (up to ${DRAIN_TIMEOUT}s)"
settle drain hang "$DRAIN_TIMEOUT"
DRAINED=$SETTLED
D_DEL=$((M_DEL - D_DEL0)) D_RETRY=$((M_RETRY - D_RETRY0)) D_FAIL=$((M_FAIL - D_FAIL0))
log "drain: ${DRAINED}s; hang attempts during the drain: delivered $D_DEL, retry $D_RETRY, failed $D_FAIL"
sleep 1.5 # the receiver nginx flushes its log within 1 s
RECEIVED=$(($(wc -l <"$TMP/receiver/hooks.log") - RECV0))
RECEIVED_IDS=$(tail -n +"$((RECV0 + 1))" "$TMP/receiver/hooks.log" | awk '{print $3}' | sort -u | wc -l)
HANG_STATS=$(tail -n 1 "$TMP/hang-receiver.log")
OUTBOX="(sqlite3 not installed)"
if [ "$HAVE_SQLITE" = 1 ]; then
  OUTBOX=$(sqlite3 -cmd '.timeout 5000' "$DB" "SELECT '| ' || webhook_id || ' | ' || state || ' | ' || count(*) || ' | ' ||
      sum(attempts) || ' | ' || max(attempts) || ' | ' || coalesce(substr(replace(last_error, '|', '/'), 1, 90), '') || ' |'
    FROM webhook_deliveries GROUP BY webhook_id, state, substr(last_error, 1, 24) ORDER BY webhook_id, state, count(*) DESC" 2>&1)
fi
alive
RSS_FINAL=$(rss_kib "$VERDICT_PID")
LOAD_AFTER=$(uptime)
stop_pid "$VERDICT_PID" 10
forget "$VERDICT_PID"
VERDICT_EXIT=$STOP_STATUS
log "verdict stopped: exit status $VERDICT_EXIT; load after: ${LOAD_AFTER##*average: }"
sed 's/\x1b\[[0-9;]*m//g' "$TMP/verdict.log" | awk '$2 == "WARN" || $2 == "ERROR" {$1 = ""; print substr($0, 2)}' |
  sed -E 's/(event_id|webhook_id)=[^ ]+/\1=…/g' | cut -c1-220 | sort | uniq -c | sort -rn >"$TMP/log-problems.txt" || true
LOG_LINES=$(awk '{s += $1} END {print s + 0}' "$TMP/log-problems.txt")

# --- report ------------------------------------------------------------------------
# col PHASE FIELD: FIELD (1-based, as in $SAMPLES) of PHASE's rows, comma-separated.
col() { awk -F'\t' -v p="$1" -v f="$2" '$1 == p {printf "%s%s", s, $f; s = ", "}' "$SAMPLES"; }
# edge PHASE FIELD first|last|max
edge() {
  awk -F'\t' -v p="$1" -v f="$2" -v w="$3" '$1 == p {if (!n++) a = $f; z = $f; if ($f + 0 > m) m = $f}
    END {print (w == "first" ? a : (w == "last" ? z : m))}' "$SAMPLES"
}
B_RPS=$(awk '$1 == "baseline" {print $2}' "$TMP/phases.txt")
B_P99=$(awk '$1 == "baseline" {print $4}' "$TMP/phases.txt")
mkdir -p "$(dirname "$RESULTS")"
{
  echo "# verdict: decisions and memory with a dead, then a hanging webhook receiver"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted changes in src/')"
  echo "- machine: $(nproc) cores, shared by wrk, nginx, the receivers, verdict and whatever else runs; load average before \`${LOAD_BEFORE##*average: }\`, after \`${LOAD_AFTER##*average: }\` (1, 5, 15 min)"
  echo "- wrk -t$THREADS -c$CONNECTIONS --latency, POST /v1/decisions (benches/webhooks/deny.lua): every answer a 200 deny (checked); verdict release build, SQLite, default config (webhook worker poll_ms 1000, concurrency 32, backoff 1 s doubling)"
  echo "- dead: \`{\"id\":\"dead\",\"url\":\"http://127.0.0.1:<closed>/hook\",\"events\":[\"decision.denied\"],\"max_attempts\":8}\`; test call: \`$DEAD_TEST\`"
  echo "- hang: \`{$HANG_SPEC,\"url\":\"http://127.0.0.1:<hanging>/hook\"}\` (python asyncio server that reads and never answers; \"dead\" deleted just before); test call: \`$HANG_TEST\`"
  echo
  echo "| phase | seconds | req/s | × baseline | p50 ms | p99 ms | p99 × baseline | verdict CPU µs/decision | verdict RSS MiB start → end (max) | outbox depth start → end | data dir MiB start → end | webhook attempts: delivered / retry / failed |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"
  while read -r ph rps p50 p99 _ _; do
    case $ph in baseline) secs=$BASELINE_SECONDS ;; healthy) secs=$HEALTHY_SECONDS ;; *) secs=$SOAK_SECONDS ;; esac
    awk -v ph="$ph" -v s="$secs" -v r="$rps" -v br="$B_RPS" -v p50="$p50" -v p99="$p99" -v bp="$B_P99" \
      -v r0="$(edge "$ph" 3 first)" -v r1="$(edge "$ph" 3 last)" -v rm="$(edge "$ph" 3 max)" \
      -v cpu="$(edge "$ph" 10 first) $(edge "$ph" 10 last) $(edge "$ph" 5 first) $(edge "$ph" 5 last)" \
      -v d0="$(edge "$ph" 4 first)" -v d1="$(edge "$ph" 4 last)" -v k0="$(edge "$ph" 9 first)" -v k1="$(edge "$ph" 9 last)" \
      -v att="$(($(edge "$ph" 6 last) - $(edge "$ph" 6 first))) / $(($(edge "$ph" 7 last) - $(edge "$ph" 7 first))) / $(($(edge "$ph" 8 last) - $(edge "$ph" 8 first)))" \
      'BEGIN {split(cpu, c, " "); us = (c[4] > c[3]) ? (c[2] - c[1]) * 1e6 / (c[4] - c[3]) : 0
        printf "| %s | %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.0f | %.1f → %.1f (%.1f) | %s → %s | %.0f → %.0f | %s |\n",
        ph, s, r, r / br, p50, p99, p99 / bp, us, r0 / 1024, r1 / 1024, rm / 1024, d0, d1, k0 / 1024, k1 / 1024, (ph == "baseline" ? "-" : att)}'
  done <"$TMP/phases.txt"
  echo
  echo "Series (one value per sample: start, every ${SAMPLE_SECONDS}s, end; times in \`samples\` below):"
  echo
  for ph in baseline healthy healthy-drain dead hang drain; do
    grep -q "^$ph"$'\t' "$SAMPLES" || continue
    echo "- $ph: RSS KiB $(col $ph 3); outbox depth $(col $ph 4); pending rows by webhook $(col $ph 11 | sed 's/, /; /g')"
  done
  echo
  echo "Drain (no load; \"hang\" re-pointed to a receiver nginx answering 200): $([ "$DRAINED" = - ] && echo "**not drained within ${DRAIN_TIMEOUT}s**" || echo "nothing pending after **${DRAINED}s**"); attempts for \"hang\" meanwhile: delivered $D_DEL, retry $D_RETRY, failed $D_FAIL; the receiver logged $RECEIVED calls for it ($RECEIVED_IDS distinct event ids). verdict RSS after the drain: $RSS_FINAL KiB. Pending rows at the end of the dead phase: $DEAD_SPLIT; at the end of the hang phase: $HANG_SPLIT. Hanging receiver's last report: \`$HANG_STATS\`."
  echo
  echo "Outbox at the end (rows by webhook, state and first characters of last_error; \"deleted\" rows fail without an attempt and without a counter):"
  echo
  echo "| webhook | state | rows | attempts | max attempts | last_error |"
  echo "| --- | --- | ---: | ---: | ---: | --- |"
  echo "$OUTBOX"
  echo
  echo "verdict exit status on SIGTERM: $VERDICT_EXIT. Its log had $LOG_LINES WARN/ERROR lines$([ "$LOG_LINES" = 0 ] || echo '; by message (count, ids elided):')"
  echo
  if [ "$LOG_LINES" != 0 ]; then head -n 8 "$TMP/log-problems.txt" | sed 's/^/    /'; fi
  echo
  echo "## Raw samples"
  echo
  echo "denies, delivered, retry, failed: counters since verdict started (delivery counters of the phase's webhook); cpu_s: verdict's CPU time since it started."
  echo
  echo '```'
  column -t -s $'\t' "$SAMPLES" 2>/dev/null || cat "$SAMPLES"
  echo '```'
} >"$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"
echo
cat "$RESULTS"
log "written to $RESULTS"
[ "$VERDICT_EXIT" = 0 ] || die "verdict exited with status $VERDICT_EXIT on SIGTERM"
