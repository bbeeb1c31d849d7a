#!/usr/bin/env bash
# verdict benchmark against its floor (issue #6, point 6).
#
#   benches/run.sh                          # RUNS=3 DURATION=10 CONNECTIONS=32
#   RUNS=5 DURATION=20 CONNECTIONS=64 benches/run.sh
#
# Needs: cargo, wrk, nginx, curl (sqlite3 optional, for the activity-log check).
# On Debian: apt-get install -y wrk nginx curl sqlite3.
#
# What it does, all on this machine, in one run:
#   1. builds `verdict` and the floor (examples/floor.rs) in release mode
#      (BUILD=0 skips this and uses what target/release holds);
#   2. starts, in a fresh temp dir (removed at exit; KEEP_TMP=1 keeps it):
#      - nginx answering every request with {"status":"compliant","score":90}
#        (benches/floor/upstream-nginx.conf.template; keep-alive, one worker, no logs),
#      - verdict (`serve --listen 127.0.0.1:P --data-dir TMP/data --policies
#        TMP/policies`) with benches/floor/bench-policies.json.template: application
#        `bench` -> rule `bench-posture` (one POST to nginx, cache_ttl_s 0) and
#        application `bench-cached` -> the same rule with cache_ttl_s 300. The
#        activity log is durable before each answer (SQLite, synchronous=FULL,
#        group commit) exactly as in production,
#      - the floor (examples/floor.rs) calling the same nginx;
#   3. drives every target with the same wrk settings (THREADS, CONNECTIONS,
#      DURATION, and benches/floor/decision.lua for the POST body and bearer token),
#      WARMUP seconds of warm-up each, then RUNS rounds that interleave the targets
#      (so a burst of load from elsewhere hits all of them alike):
#        api            GET nginx directly
#        floor          floor, POST /v1/decisions (parse, one call, reply)
#        verdict        verdict, application `bench` (uncached rule)
#        floor-nocall   floor, POST /v1/decisions-nocall (parse and reply)
#        verdict-cached verdict, application `bench-cached` (cache hits once the
#                       decision cache exists; until then it measures uncached)
#   4. prints the medians over the rounds of requests/s, p50 and p99 (ms), the
#      server's CPU time per request, and the ratios against the targets of the
#      issue (verdict uncached >= 0.8x floor throughput and p99 <= 1.5x floor's;
#      verdict cached >= 0.8x the no-call floor), and writes the same table to
#      benches/results/latest.md (RESULTS=path to write elsewhere).
#
# Diagnostics (not for the targets): TARGETS="verdict verdict-cached" measures a
# subset; DATA_DIR_PARENT=/dev/shm puts verdict's data dir on tmpfs, where fsync is
# free, to show what the durable activity log costs (the table says which file
# system the data dir was on); SYNCHRONOUS=normal runs verdict with `[activity_log]
# synchronous = "normal"` (no fsync per batch: survives kill -9, not power loss).
#
# Every answer is checked once before the measurements (allow, and `cached` for the
# cached row); wrk's non-2xx and socket-error counts are in the table. All processes
# it started are stopped at exit (trap).

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"

RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-2}
WARMUP=${WARMUP:-2}
BUILD=${BUILD:-1}
KEEP_TMP=${KEEP_TMP:-0}
TARGETS=${TARGETS:-api floor verdict floor-nocall verdict-cached}
DATA_DIR_PARENT=${DATA_DIR_PARENT:-}
SYNCHRONOUS=${SYNCHRONOUS:-full}
RESULTS=${RESULTS:-$HERE/results/latest.md}
TOKEN=bench-proxy-token

need wrk curl awk sed
find_nginx >/dev/null

cd "$ROOT"
if [ "$BUILD" = 1 ]; then
  log "building release: verdict and examples/floor"
  cargo build --release --bin verdict --example floor
fi
BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
VERDICT_BIN=$BIN_DIR/verdict
FLOOR_BIN=$BIN_DIR/examples/floor
[ -x "$VERDICT_BIN" ] || die "$VERDICT_BIN missing (run without BUILD=0)"
[ -x "$FLOOR_BIN" ] || die "$FLOOR_BIN missing (run without BUILD=0)"

TMP=$(mktemp -d -t verdict-bench.XXXXXX)
DATA_DIR=$TMP/data
if [ -n "$DATA_DIR_PARENT" ]; then DATA_DIR=$(mktemp -d -p "$DATA_DIR_PARENT" verdict-bench-data.XXXXXX); fi
mkdir -p "$DATA_DIR"
cleanup() {
  local rc=$?
  stop_all
  if [ "$KEEP_TMP" = 1 ]; then
    log "kept $TMP $DATA_DIR"
  else
    rm -rf "$TMP" "$DATA_DIR"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

LOAD_BEFORE=$(uptime)
log "load before: $LOAD_BEFORE"

# How long a synchronous 8 KiB write takes where verdict keeps its database: every
# group commit of the activity log waits for one (SQLite WAL, synchronous=FULL).
FSYNC_MS=$( (dd if=/dev/zero of="$DATA_DIR/fsync.probe" bs=8k count=200 oflag=dsync 2>&1 || true) |
  awk '/copied/ {for (i = 1; i <= NF; i++) if ($i ~ /^s,?$/) {printf "%.2f", $(i - 1) * 1000 / 200; exit}}')
rm -f "$DATA_DIR/fsync.probe"
log "synchronous 8 KiB write on the data dir: ${FSYNC_MS:-?} ms"

# --- the three services ----------------------------------------------------------
start_nginx "$HERE/floor/upstream-nginx.conf.template" "$TMP/nginx"
UPSTREAM="http://127.0.0.1:$NGINX_PORT"
NGINX_WORKER=$(pgrep -P "$NGINX_PID" | head -n 1 || true)
log "nginx upstream on $UPSTREAM (master $NGINX_PID, worker ${NGINX_WORKER:-?})"

mkdir -p "$TMP/policies" "$DATA_DIR"
sed "s|{{UPSTREAM}}|$UPSTREAM|g" "$HERE/floor/bench-policies.json.template" >"$TMP/policies/bench.json"
export VERDICT_PROXY_TOKEN=$TOKEN
case $SYNCHRONOUS in
  full) ;; # verdict's default: no config file
  normal)
    printf '[activity_log]\nsynchronous = "normal"\n' >"$TMP/verdict.toml"
    export VERDICT_CONFIG=$TMP/verdict.toml
    ;;
  *) die "SYNCHRONOUS must be full or normal, not \`$SYNCHRONOUS\`" ;;
esac
start_verdict "$VERDICT_BIN" "$DATA_DIR" "$TMP/policies" "$TMP/verdict.log"
log "verdict on 127.0.0.1:$VERDICT_PORT (pid $VERDICT_PID)"

for _ in 1 2 3 4 5; do
  FLOOR_PORT=$(free_port)
  spawn "$TMP/floor.log" "$FLOOR_BIN" "127.0.0.1:$FLOOR_PORT" "$UPSTREAM"
  FLOOR_PID=$SPAWNED
  if wait_port "$FLOOR_PID" "$FLOOR_PORT" floor "$TMP/floor.log"; then break; fi
  FLOOR_PID=
done
[ -n "$FLOOR_PID" ] || die "the floor did not start"
log "floor on 127.0.0.1:$FLOOR_PORT (pid $FLOOR_PID)"

# --- targets ---------------------------------------------------------------------
read -r -a NAMES <<<"$TARGETS"
declare -A LABEL URL APP PID
for name in "${NAMES[@]}"; do
  case $name in api | floor | verdict | floor-nocall | verdict-cached) ;; *) die "unknown target \`$name\` in TARGETS" ;; esac
done
LABEL=([api]="API direct (GET nginx)" [floor]="floor, uncached" [verdict]="verdict, uncached"
  [floor-nocall]="floor, no call" [verdict-cached]="verdict, cache hit")
URL=([api]="$UPSTREAM/v1/devices/dev-42/check?user=alice%40example.com"
  [floor]="http://127.0.0.1:$FLOOR_PORT/v1/decisions"
  [verdict]="http://127.0.0.1:$VERDICT_PORT/v1/decisions"
  [floor-nocall]="http://127.0.0.1:$FLOOR_PORT/v1/decisions-nocall"
  [verdict-cached]="http://127.0.0.1:$VERDICT_PORT/v1/decisions")
APP=([api]="" [floor]=bench [verdict]=bench [floor-nocall]=bench [verdict-cached]=bench-cached)
PID=([api]="${NGINX_WORKER:-$NGINX_PID}" [floor]="$FLOOR_PID" [verdict]="$VERDICT_PID"
  [floor-nocall]="$FLOOR_PID" [verdict-cached]="$VERDICT_PID")

body_for() {
  printf '{"application":"%s","username":"alice@example.com","groups":["g-1001","g-1002"],"remote_ip":"203.0.113.7","device_id":"dev-42","user_agent":"wrk"}' "$1"
}

# One request to each target: it must allow (and say whether the cache hit).
CACHE_STATE="n/a"
for name in "${NAMES[@]}"; do
  if [ -z "${APP[$name]}" ]; then
    answer=$(curl -fsS "${URL[$name]}")
    [[ $answer == *'"compliant"'* ]] || die "upstream answered: $answer"
    continue
  fi
  for _ in 1 2; do # the second one is a cache hit where there is a cache
    answer=$(curl -sS -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
      --data "$(body_for "${APP[$name]}")" "${URL[$name]}")
  done
  [[ $answer == *'"decision":"allow"'* ]] || die "$name did not allow: $answer"
  if [ "$name" = verdict-cached ]; then
    if [[ $answer == *'"cached":true'* ]]; then
      CACHE_STATE="hits (answers say \"cached\": true)"
    else
      CACHE_STATE="NOT hitting: answers say \"cached\": false, so this row measures uncached decisions"
    fi
  fi
done
log "all targets allow; verdict cache: $CACHE_STATE"

# --- measurements ----------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

mkdir -p "$TMP/wrk"
RAW="$TMP/results.tsv" # name run rps p50 p99 max non2xx errors requests cpu_us_per_req
: >"$RAW"

# wrk_run NAME SECONDS OUTFILE
wrk_run() {
  local name=$1 secs=$2 out=$3
  local args=(-t"$THREADS" -c"$CONNECTIONS" -d"${secs}s" --timeout 5s --latency)
  if [ -n "${APP[$name]}" ]; then
    BENCH_APP=${APP[$name]} BENCH_TOKEN=$TOKEN wrk "${args[@]}" -s "$HERE/floor/decision.lua" "${URL[$name]}" >"$out" 2>&1
  else
    wrk "${args[@]}" "${URL[$name]}" >"$out" 2>&1
  fi
}

# parse_wrk FILE -> "rps p50_ms p99_ms max_ms non2xx socket_errors requests"
parse_wrk() {
  local f=$1 rps p50 p99 max non2xx errors requests
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$f")
  p50=$(wrk_to_ms "$(awk '$1 == "50%" {print $2}' "$f")")
  p99=$(wrk_to_ms "$(awk '$1 == "99%" {print $2}' "$f")")
  max=$(wrk_to_ms "$(awk '$1 == "Latency" && NF >= 4 {print $4; exit}' "$f")")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$f")
  errors=$(awk '/Socket errors:/ {gsub(/,/, ""); print $4 + $6 + $8 + $10}' "$f")
  requests=$(awk '/requests in/ {print $1}' "$f")
  [ -n "$rps" ] || die "could not parse wrk output $f: $(cat "$f")"
  echo "$rps $p50 $p99 $max ${non2xx:-0} ${errors:-0} ${requests:-0}"
}

if [ "$WARMUP" -gt 0 ]; then
  for name in "${NAMES[@]}"; do
    log "warm-up ${WARMUP}s: $name"
    wrk_run "$name" "$WARMUP" "$TMP/wrk/$name-warmup.txt"
  done
fi

for run in $(seq 1 "$RUNS"); do
  for name in "${NAMES[@]}"; do
    out="$TMP/wrk/$name-$run.txt"
    before=$(cpu_ticks "${PID[$name]}")
    wrk_run "$name" "$DURATION" "$out"
    after=$(cpu_ticks "${PID[$name]}")
    read -r rps p50 p99 max non2xx errors requests <<<"$(parse_wrk "$out")"
    cpu=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$requests" 'BEGIN {printf "%.1f", (n > 0 ? t / hz * 1e6 / n : 0)}')
    echo "$name $run $rps $p50 $p99 $max $non2xx $errors $requests $cpu" >>"$RAW"
    log "run $run/$RUNS $(printf '%-15s' "$name") $(printf '%10.1f' "$rps") req/s  p50 ${p50} ms  p99 ${p99} ms  cpu ${cpu} us/req  non-2xx $non2xx  errors $errors"
  done
done

LOAD_AFTER=$(uptime)
log "load after: $LOAD_AFTER"

# --- summary ---------------------------------------------------------------------
# median NAME COLUMN (columns as in $RAW, 1-based)
median() {
  awk -v n="$1" -v c="$2" '$1 == n {print $c}' "$RAW" | sort -g |
    awk '{v[NR] = $1} END {if (NR == 0) {print "nan"; exit} if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.3f", m}'
}
total() { awk -v n="$1" -v c="$2" '$1 == n {s += $c} END {print s + 0}' "$RAW"; }
runs_of() { awk -v n="$1" '$1 == n {printf "%s%.0f", sep, $3; sep = ", "}' "$RAW"; }

declare -A RPS P50 P99
for name in api floor verdict floor-nocall verdict-cached; do
  RPS[$name]=$(median "$name" 3)
  P50[$name]=$(median "$name" 4)
  P99[$name]=$(median "$name" 5)
done

# ratio A B -> A/B with 2 decimals ("n/a" when a target was not measured)
ratio() {
  if [ "$1" = nan ] || [ "$2" = nan ]; then echo n/a; else awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}'; fi
}
fmt_ratio() { if [ "$1" = n/a ]; then echo n/a; else echo "$1×"; fi; }
# verdict_of VALUE OP LIMIT -> met / missed
verdict_of() {
  if [ "$1" = n/a ]; then echo "not measured"; else awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {ok = (op == ">=") ? v >= l : v <= l; print (ok ? "met" : "**missed**")}'; fi
}

R_TPUT=$(ratio "${RPS[verdict]}" "${RPS[floor]}")
R_P99=$(ratio "${P99[verdict]}" "${P99[floor]}")
R_CACHED=$(ratio "${RPS[verdict-cached]}" "${RPS[floor-nocall]}")
R_CACHED_P99=$(ratio "${P99[verdict-cached]}" "${P99[floor-nocall]}")

ACTIVITY="(sqlite3 not installed)"
if command -v sqlite3 >/dev/null 2>&1 && [ -f "$DATA_DIR/verdict.db" ]; then
  ACTIVITY=$(sqlite3 "$DATA_DIR/verdict.db" "select coalesce(sum(c), 0) || ' entries (' || coalesce(group_concat(decision || ' ' || c, ', '), '') || ')' from (select decision, count(*) as c from activity group by decision)" 2>&1 || true)
fi
ANSWERED=$(($(total verdict 9) + $(total verdict-cached 9)))


mkdir -p "$(dirname "$RESULTS")"
{
  echo "# verdict benchmark"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted changes in src/')"
  echo "- machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); verdict's data dir on $(df -T "$DATA_DIR" | awk 'NR == 2 {print $2}')"
  echo "- load before: \`${LOAD_BEFORE##*load average: }\`, after: \`${LOAD_AFTER##*load average: }\` (1, 5, 15 min)"
  echo "- wrk: -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency, $RUNS interleaved rounds after ${WARMUP}s warm-up each; medians over the rounds"
  echo "- synchronous 8 KiB write (dd oflag=dsync) on verdict's data dir: ${FSYNC_MS:-?} ms on average; each group commit of the activity log waits for one"
  echo "- verdict's activity log: \`[activity_log] synchronous = \"$SYNCHRONOUS\"\`$([ "$SYNCHRONOUS" = full ] && echo ' (the default: fsynced before each answer)' || echo ' (diagnostic: not fsynced per batch; survives kill -9, not power loss)')"
  echo "- verdict cache: $CACHE_STATE"
  echo
  echo "| target | req/s | p50 ms | p99 ms | server CPU µs/req | non-2xx | socket errors | req/s per round |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
  for name in "${NAMES[@]}"; do
    printf '| %s | %.0f | %.2f | %.2f | %.1f | %d | %d | %s |\n' "${LABEL[$name]}" "${RPS[$name]}" "${P50[$name]}" \
      "${P99[$name]}" "$(median "$name" 10)" "$(total "$name" 7)" "$(total "$name" 8)" "$(runs_of "$name")"
  done
  echo
  echo "| ratio | value | target | |"
  echo "| --- | ---: | --- | --- |"
  echo "| verdict uncached / floor uncached, throughput | $(fmt_ratio "$R_TPUT") | ≥ 0.80× | $(verdict_of "$R_TPUT" '>=' 0.8) |"
  echo "| verdict uncached / floor uncached, p99 | $(fmt_ratio "$R_P99") | ≤ 1.50× | $(verdict_of "$R_P99" '<=' 1.5) |"
  echo "| verdict cached / floor no-call, throughput | $(fmt_ratio "$R_CACHED") | ≥ 0.80× | $(verdict_of "$R_CACHED" '>=' 0.8) |"
  echo "| verdict cached / floor no-call, p99 | $(fmt_ratio "$R_CACHED_P99") | (none) | |"
  echo
  echo "Server CPU is the CPU time of the answering process (nginx's worker for the API row) during the round, divided by the requests wrk counted; verdict's includes its SQLite writer. verdict's activity log after the run: $ACTIVITY, for $ANSWERED decisions answered to wrk in the measured rounds (plus warm-up and checks)."
} >"$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"
echo
cat "$RESULTS"
echo
log "written to $RESULTS"
