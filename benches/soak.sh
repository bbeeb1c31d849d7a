#!/usr/bin/env bash
# verdict soak test (issue #6, point 7): sustained load while the API misbehaves.
#
#   benches/soak.sh                      # 60 s
#   SOAK_SECONDS=600 benches/soak.sh     # 10 min
#
# Needs: cargo, wrk, python3, curl, sqlite3 (apt-get install -y wrk python3 curl sqlite3).
# Not part of the default test run.
#
# Starts in a fresh temp dir (removed at exit; KEEP_TMP=1 keeps it):
#   - benches/soak/upstream.py, a small standard-library HTTP API whose behaviour is
#     switched through a mode file;
#   - verdict (release build; BUILD=0 skips the build) with one rule calling it
#     (benches/soak/policies.json.template: timeout TIMEOUT_MS, on_error deny,
#     uncached) for application `soak`;
#   - wrk (THREADS, CONNECTIONS, --timeout 10s) for SOAK_SECONDS with
#     benches/soak/soak.lua, which writes the decision_id of every answered
#     decision to a file and keeps the largest latency_ms the answers report.
# Every PHASE_SECONDS the API moves on: healthy -> slow (answers after SLOW_SECONDS,
# beyond the rule's timeout) -> 503 -> refused (the process is stopped) -> healthy ...
# verdict's RSS is sampled every second. verdict's circuit breaker gets a config file
# with `cooldown_s = BREAKER_COOLDOWN_S` (default 2; empty = verdict's default, 30 s)
# and `failures = BREAKER_FAILURES` (default 5), so that every phase exercises its
# failure mode repeatedly (a probe every cool-down) instead of mostly failing fast,
# and a healthy phase closes the circuit again.
#
# Then verdict gets SIGTERM (it must exit 0 after flushing) and the summary says:
#   - verdict was alive and answering /healthz at the end of the load;
#   - RSS before the load, 5 s into it, at its end, and the largest sample;
#   - every decision_id answered to wrk is in the activity table (sqlite3 on
#     TMP/data/verdict.db after the clean exit);
#   - the largest decision latency, as the answers report it (latency_ms) and as
#     wrk saw it (including queueing and the durable activity write), against the
#     rule timeout + MARGIN_MS;
#   - decisions per phase outcome (allow, timed out, HTTP 503, refused, circuit open).
# Exit status: 0 when every check holds, 1 otherwise.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"

SOAK_SECONDS=${SOAK_SECONDS:-60}
PHASE_SECONDS=${PHASE_SECONDS:-10}
CONNECTIONS=${CONNECTIONS:-16}
THREADS=${THREADS:-2}
TIMEOUT_MS=${TIMEOUT_MS:-500}
SLOW_SECONDS=${SLOW_SECONDS:-3}
MARGIN_MS=${MARGIN_MS:-250}
BREAKER_COOLDOWN_S=${BREAKER_COOLDOWN_S-2}
BREAKER_FAILURES=${BREAKER_FAILURES:-5}
BUILD=${BUILD:-1}
KEEP_TMP=${KEEP_TMP:-0}
RESULTS=${RESULTS:-$HERE/results/soak-latest.md}
TOKEN=soak-proxy-token

need wrk python3 curl sqlite3 awk sort comm

cd "$ROOT"
if [ "$BUILD" = 1 ]; then
  log "building release: verdict"
  cargo build --release --bin verdict
fi
VERDICT_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/verdict
[ -x "$VERDICT_BIN" ] || die "$VERDICT_BIN missing (run without BUILD=0)"

TMP=$(mktemp -d -t verdict-soak.XXXXXX)
cleanup() {
  local rc=$?
  stop_all
  if [ "$KEEP_TMP" = 1 ]; then
    log "kept $TMP"
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

LOAD_BEFORE=$(uptime)
log "load before: $LOAD_BEFORE"

# --- upstream --------------------------------------------------------------------
MODE_FILE=$TMP/upstream.mode
echo healthy >"$MODE_FILE"
UPSTREAM_PID=
start_upstream() {
  spawn "$TMP/upstream.log" python3 "$HERE/soak/upstream.py" "$UPSTREAM_PORT" "$MODE_FILE" "$SLOW_SECONDS"
  UPSTREAM_PID=$SPAWNED
  wait_port "$UPSTREAM_PID" "$UPSTREAM_PORT" upstream "$TMP/upstream.log"
}
stop_upstream() {
  if [ -n "$UPSTREAM_PID" ]; then
    stop_pid "$UPSTREAM_PID" 2
    UPSTREAM_PID=
  fi
}
for _ in 1 2 3 4 5; do
  UPSTREAM_PORT=$(free_port)
  if start_upstream; then break; fi
  UPSTREAM_PID=
done
[ -n "$UPSTREAM_PID" ] || die "the upstream did not start"
UPSTREAM="http://127.0.0.1:$UPSTREAM_PORT"
log "upstream on $UPSTREAM (pid $UPSTREAM_PID)"

# --- verdict ---------------------------------------------------------------------
mkdir -p "$TMP/policies" "$TMP/data" "$TMP/ids"
sed -e "s|{{UPSTREAM}}|$UPSTREAM|g" -e "s|{{TIMEOUT_MS}}|$TIMEOUT_MS|g" \
  "$HERE/soak/policies.json.template" >"$TMP/policies/soak.json"
{
  echo "[circuit_breaker]"
  echo "failures = $BREAKER_FAILURES"
  if [ -n "$BREAKER_COOLDOWN_S" ]; then echo "cooldown_s = $BREAKER_COOLDOWN_S"; fi
} >"$TMP/verdict.toml"
export VERDICT_CONFIG=$TMP/verdict.toml
export VERDICT_PROXY_TOKEN=$TOKEN
start_verdict "$VERDICT_BIN" "$TMP/data" "$TMP/policies" "$TMP/verdict.log"
log "verdict on 127.0.0.1:$VERDICT_PORT (pid $VERDICT_PID)"
answer=$(curl -sS -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  --data '{"application":"soak","username":"alice@example.com","groups":["g-1001"],"remote_ip":"203.0.113.7","device_id":"dev-42"}' \
  "http://127.0.0.1:$VERDICT_PORT/v1/decisions")
[[ $answer == *'"decision":"allow"'* ]] || die "verdict did not allow against the healthy API: $answer"

RSS_IDLE=$(rss_kib "$VERDICT_PID")

# --- load and phases -------------------------------------------------------------
spawn "$TMP/wrk.txt" env SOAK_TOKEN="$TOKEN" SOAK_IDS_DIR="$TMP/ids" \
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"${SOAK_SECONDS}s" --timeout 10s --latency \
  -s "$HERE/soak/soak.lua" "http://127.0.0.1:$VERDICT_PORT/v1/decisions"
WRK_PID=$SPAWNED
log "wrk: -t$THREADS -c$CONNECTIONS -d${SOAK_SECONDS}s against verdict; phases of ${PHASE_SECONDS}s"

PHASES=(healthy slow 503 refused)
START=$EPOCHREALTIME
elapsed() { awk -v s="$START" -v n="$EPOCHREALTIME" 'BEGIN {printf "%.1f", n - s}'; }
echo "t_s phase rss_kib" >"$TMP/rss.txt"
PHASE_LOG=()
phase_index=0
while kill -0 "$WRK_PID" 2>/dev/null; do
  phase=${PHASES[$((phase_index % ${#PHASES[@]}))]}
  case $phase in
    refused) stop_upstream ;;
    *)
      echo "$phase" >"$MODE_FILE"
      if [ -z "$UPSTREAM_PID" ]; then start_upstream || die "could not restart the upstream"; fi
      ;;
  esac
  PHASE_LOG+=("$(elapsed)s $phase")
  log "t=$(elapsed)s upstream: $phase"
  for _ in $(seq 1 "$PHASE_SECONDS"); do
    kill -0 "$WRK_PID" 2>/dev/null || break
    sleep 1
    echo "$(elapsed) $phase $(rss_kib "$VERDICT_PID")" >>"$TMP/rss.txt"
  done
  phase_index=$((phase_index + 1))
done
wait "$WRK_PID" || true

# --- checks ----------------------------------------------------------------------
ALIVE=no
if kill -0 "$VERDICT_PID" 2>/dev/null && curl -fsS "http://127.0.0.1:$VERDICT_PORT/healthz" >/dev/null; then
  ALIVE=yes
fi
RSS_END=$(rss_kib "$VERDICT_PID")
RSS_5S=$(awk 'NR > 1 && $1 >= 5 {print $3; exit}' "$TMP/rss.txt")
RSS_MAX=$(awk 'NR > 1 && $3 > m {m = $3} END {print m + 0}' "$TMP/rss.txt")
CIRCUIT=$(curl -fsS "http://127.0.0.1:$VERDICT_PORT/metrics" 2>/dev/null | grep -E '^verdict_circuit_state' | tr '\n' ' ' || true)
LOAD_AFTER=$(uptime)

log "stopping verdict (SIGTERM)"
stop_pid "$VERDICT_PID" 40
EXIT_STATUS=$STOP_STATUS

SOAK_LINE=$(grep '^SOAK ' "$TMP/wrk.txt" || true)
[ -n "$SOAK_LINE" ] || die "wrk did not finish: $(cat "$TMP/wrk.txt")"
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" <<<"$SOAK_LINE"; }
ANSWERED=$(field answered)
ALLOWED=$(field allowed)
NON200=$(field non200)
MAX_SERVER=$(field max_server_latency_ms)
MAX_CLIENT=$(field max_client_latency_ms)
SOCKET_ERRORS=$(awk '/Socket errors:/ {gsub(/,/, ""); print $4 + $6 + $8 + $10}' "$TMP/wrk.txt")
RPS=$(awk '/^Requests\/sec:/ {print $2}' "$TMP/wrk.txt")

DB=$TMP/data/verdict.db
sort -u "$TMP"/ids/ids-*.txt >"$TMP/answered.txt"
sqlite3 "$DB" 'select decision_id from activity' | sort -u >"$TMP/logged.txt"
IDS_ANSWERED=$(wc -l <"$TMP/answered.txt")
IDS_LOGGED=$(wc -l <"$TMP/logged.txt")
MISSING=$(comm -23 "$TMP/answered.txt" "$TMP/logged.txt" | wc -l)
BREAKDOWN=$(sqlite3 -separator ' | ' "$DB" "
  select case when decision = 'allow' then 'allow'
              when reason like '%circuit open%' then 'deny: circuit open'
              when reason like '%timed out%' then 'deny: timed out'
              when reason like '%HTTP 503%' then 'deny: HTTP 503'
              when reason like '%connection refused%' then 'deny: connection refused'
              else 'deny: ' || substr(replace(reason, 'policy soak: rule soak-posture failed: ', ''), 1, 80) end as kind,
         count(*), printf('%.1f', max(latency_ms))
  from activity where application = 'soak' group by kind order by count(*) desc")
OVER_DEADLINE=$(sqlite3 "$DB" "select count(*) from activity where latency_ms > $TIMEOUT_MS + $MARGIN_MS")
DEADLINE=$((TIMEOUT_MS + MARGIN_MS))

check() { if [ "$1" = 1 ]; then echo "ok"; else echo "**FAILED**"; fi; }
C_ALIVE=$([ "$ALIVE" = yes ] && echo 1 || echo 0)
C_EXIT=$([ "$EXIT_STATUS" = 0 ] && echo 1 || echo 0)
C_LOGGED=$([ "$MISSING" = 0 ] && [ "$IDS_ANSWERED" -gt 0 ] && echo 1 || echo 0)
C_SERVER=$(awk -v m="$MAX_SERVER" -v d="$DEADLINE" 'BEGIN {print (m <= d) ? 1 : 0}')
C_CLIENT=$(awk -v m="$MAX_CLIENT" -v d="$DEADLINE" 'BEGIN {print (m <= d) ? 1 : 0}')
C_ERRORS=$([ "${NON200:-0}" = 0 ] && [ "${SOCKET_ERRORS:-0}" = 0 ] && echo 1 || echo 0)
RSS_GROWTH=$(awk -v a="${RSS_5S:-0}" -v b="${RSS_END:-0}" 'BEGIN {printf "%+.1f", (a > 0 ? (b - a) * 100 / a : 0)}')

mib() { awk -v k="${1:-0}" 'BEGIN {printf "%.1f MiB", k / 1024}'; }
mkdir -p "$(dirname "$RESULTS")"
{
  echo "# verdict soak"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted changes in src/')"
  echo "- ran ${SOAK_SECONDS} s: wrk -t$THREADS -c$CONNECTIONS, $(printf '%.0f' "${RPS:-0}") decisions/s on average; rule timeout ${TIMEOUT_MS} ms, slow API answers after ${SLOW_SECONDS} s; circuit breaker: $BREAKER_FAILURES failures, cool-down ${BREAKER_COOLDOWN_S:-30 (default)} s"
  echo "- phases: ${PHASE_LOG[*]}"
  echo "- load before: \`${LOAD_BEFORE##*load average: }\`, after: \`${LOAD_AFTER##*load average: }\`"
  echo
  echo "| check | result | |"
  echo "| --- | --- | --- |"
  echo "| verdict alive and answering /healthz at the end | $ALIVE | $(check "$C_ALIVE") |"
  echo "| exit status after SIGTERM | $EXIT_STATUS | $(check "$C_EXIT") |"
  echo "| answered decisions in the activity log | $((IDS_ANSWERED - MISSING)) of $IDS_ANSWERED answered ($MISSING missing; $IDS_LOGGED entries in the log) | $(check "$C_LOGGED") |"
  echo "| non-200 answers, socket errors | ${NON200:-0}, ${SOCKET_ERRORS:-0} | $(check "$C_ERRORS") |"
  echo "| largest decision latency, as answered (latency_ms) | ${MAX_SERVER} ms (deadline ${TIMEOUT_MS} + ${MARGIN_MS} ms; $OVER_DEADLINE entries over it) | $(check "$C_SERVER") |"
  echo "| largest latency seen by wrk (queueing + durable write included) | ${MAX_CLIENT} ms | $(check "$C_CLIENT") |"
  echo "| RSS idle / 5 s into load / end / largest sample | $(mib "$RSS_IDLE") / $(mib "$RSS_5S") / $(mib "$RSS_END") / $(mib "$RSS_MAX") (end vs 5 s: ${RSS_GROWTH}%) | |"
  echo
  echo "Decisions by outcome (activity log), with the largest latency_ms of each:"
  echo
  echo "| outcome | decisions | max latency_ms |"
  echo "| --- | ---: | ---: |"
  while IFS= read -r line; do
    [ -n "$line" ] && echo "| $line |"
  done <<<"$BREAKDOWN"
  echo
  echo "Answers with a decision_id seen by wrk: $ANSWERED ($ALLOWED allowed). Circuit state at the end: ${CIRCUIT:-(not exported)}"
  echo
  echo "RSS samples (KiB, one a second):"
  echo
  echo '```'
  awk 'NR > 1 {printf "%s %s %s\n", $1, $2, $3}' "$TMP/rss.txt" | paste -sd ' ' | fold -s -w 110
  echo '```'
} >"$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"
echo
cat "$RESULTS"
echo
log "written to $RESULTS"
[ "$C_ALIVE$C_EXIT$C_LOGGED$C_SERVER$C_CLIENT$C_ERRORS" = 111111 ]
