#!/usr/bin/env bash
# Decisions per second of two verdict replicas sharing one PostgreSQL database against
# one replica on SQLite (issue #7, point 8).
#
#   benches/replicas.sh                      # RUNS=3 DURATION=10 CONNECTIONS=32
#   PG_SERVER=postgres://postgres@127.0.0.1:5432 RUNS=5 benches/replicas.sh
#
# Needs: cargo, wrk, nginx, curl, psql (and sqlite3 for the SQLite activity count).
#
# What it does, all on this machine:
#   1. builds `verdict` in release mode (BUILD=0 skips it);
#   2. starts nginx answering {"status":"compliant","score":90}
#      (benches/floor/upstream-nginx.conf.template), creates a fresh database
#      `verdict_bench_<random>` on PG_SERVER (dropped at exit), and starts
#      - `sqlite`: one verdict on SQLite in its own data dir,
#      - `a` and `b`: two verdicts with `--database-url` on that database and
#        `--replica-name a` / `b`, each with its own data dir (one VERDICT_SECRET_KEY),
#      all with the same policies: application `bench-norules` -> a policy with no rules
#      (the decision costs only parsing, the engine and the durable activity entry) and
#      application `bench` -> rule `bench-posture` (one POST to nginx, uncached) from
#      benches/floor/bench-policies.json.template. The activity log is durable before
#      every answer: SQLite WAL with synchronous=FULL, PostgreSQL with
#      synchronous_commit=on (the header shows the server's fsync setting);
#   3. measures, WARMUP seconds of warm-up each, then RUNS rounds interleaving:
#        sqlite-norules / sqlite-rule  one wrk (-t THREADS -c CONNECTIONS) on `sqlite`
#        pg1-norules                   the same wrk on replica `a` alone
#        pg2-norules / pg2-rule        two wrk at once, one per replica, each with
#                                      half the threads and connections; requests/s
#                                      summed, latencies the worse of the two
#      (TARGETS selects a subset);
#   4. prints the medians over the rounds (requests/s, p50, p99, CPU per request of
#      verdict and of PostgreSQL) and writes them to benches/results/replicas-latest.md
#      (RESULTS=path elsewhere), with the activity rows each store holds afterwards.
#
# The machine's cores are shared by wrk, nginx, PostgreSQL and every verdict: on 2
# cores two replicas compete for the same CPU, so this shows what the shared store
# costs, not how replicas on separate machines scale.

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
PG_SERVER=${PG_SERVER:-postgres://postgres@127.0.0.1:5432}
PG_SERVER=${PG_SERVER%/}
TARGETS=${TARGETS:-sqlite-norules pg1-norules pg2-norules sqlite-rule pg2-rule}
RESULTS=${RESULTS:-$HERE/results/replicas-latest.md}
TOKEN=bench-proxy-token

need wrk curl awk sed psql
find_nginx >/dev/null
[ $((CONNECTIONS % 2)) = 0 ] || die "CONNECTIONS must be even (split over two replicas)"
[ $((THREADS % 2)) = 0 ] || die "THREADS must be even (split over two replicas)"

cd "$ROOT"
if [ "$BUILD" = 1 ]; then
  log "building release: verdict"
  cargo build --release --bin verdict
fi
VERDICT_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/verdict
[ -x "$VERDICT_BIN" ] || die "$VERDICT_BIN missing (run without BUILD=0)"

psql_admin() { psql -v ON_ERROR_STOP=1 -qAt "$PG_SERVER/postgres" "$@"; }
psql_admin -c 'SELECT 1' >/dev/null || die "PostgreSQL does not answer at $PG_SERVER"
DB=verdict_bench_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
DB_URL="$PG_SERVER/$DB"

TMP=$(mktemp -d -t verdict-replicas.XXXXXX)
cleanup() {
  local rc=$?
  stop_all
  psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  if [ "$KEEP_TMP" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

psql_admin -c "CREATE DATABASE $DB" >/dev/null
log "database $DB on $PG_SERVER"
LOAD_BEFORE=$(uptime)
log "load before: $LOAD_BEFORE"

# --- services --------------------------------------------------------------------
start_nginx "$HERE/floor/upstream-nginx.conf.template" "$TMP/nginx"
UPSTREAM="http://127.0.0.1:$NGINX_PORT"
log "nginx upstream on $UPSTREAM"

mkdir -p "$TMP/policies"
sed "s|{{UPSTREAM}}|$UPSTREAM|g" "$HERE/floor/bench-policies.json.template" >"$TMP/policies/bench.json"
cat >"$TMP/policies/norules.json" <<'EOF'
{"rules": [], "policies": [{"id": "bench-norules", "applications": ["bench-norules"], "rules": []}]}
EOF

export VERDICT_PROXY_TOKEN=$TOKEN
declare -A PORT VPID
start_verdict "$VERDICT_BIN" "$TMP/sqlite-data" "$TMP/policies" "$TMP/sqlite.log"
PORT[sqlite]=$VERDICT_PORT VPID[sqlite]=$VERDICT_PID
export VERDICT_DATABASE_URL=$DB_URL
export VERDICT_SECRET_KEY=bench-shared-secret-key
for r in a b; do
  export VERDICT_REPLICA_NAME=$r
  start_verdict "$VERDICT_BIN" "$TMP/$r-data" "$TMP/policies" "$TMP/$r.log"
  PORT[$r]=$VERDICT_PORT VPID[$r]=$VERDICT_PID
done
unset VERDICT_DATABASE_URL VERDICT_SECRET_KEY VERDICT_REPLICA_NAME
for r in sqlite a b; do log "verdict $r on 127.0.0.1:${PORT[$r]} (pid ${VPID[$r]})"; done
PG_FSYNC=$(psql_admin -c 'SHOW fsync')

body_for() {
  printf '{"application":"%s","username":"alice@example.com","groups":["g-1001","g-1002"],"remote_ip":"203.0.113.7","device_id":"dev-42","user_agent":"wrk"}' "$1"
}
for r in sqlite a b; do
  for app in bench-norules bench; do
    answer=$(curl -sS -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
      --data "$(body_for "$app")" "http://127.0.0.1:${PORT[$r]}/v1/decisions")
    [[ $answer == *'"decision":"allow"'* ]] || die "verdict $r did not allow $app: $answer"
  done
done
log "every replica allows both applications"

# --- measurements ----------------------------------------------------------------
read -r -a NAMES <<<"$TARGETS"
declare -A LABEL APP REPLICAS
LABEL=([sqlite-norules]="1 replica, SQLite — no rules" [pg1-norules]="1 replica, PostgreSQL — no rules"
  [pg2-norules]="2 replicas, PostgreSQL — no rules" [sqlite-rule]="1 replica, SQLite — one rule (nginx)"
  [pg2-rule]="2 replicas, PostgreSQL — one rule (nginx)")
APP=([sqlite-norules]=bench-norules [pg1-norules]=bench-norules [pg2-norules]=bench-norules
  [sqlite-rule]=bench [pg2-rule]=bench)
REPLICAS=([sqlite-norules]=sqlite [pg1-norules]=a [pg2-norules]="a b" [sqlite-rule]=sqlite [pg2-rule]="a b")
for name in "${NAMES[@]}"; do [ -n "${APP[$name]:-}" ] || die "unknown target \`$name\` in TARGETS"; done

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {
  local pid total=0 t
  for pid in "$@"; do
    t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + t))
  done
  echo "$total"
}
pg_pids() { pgrep -u postgres -x postgres 2>/dev/null || pgrep -x postgres 2>/dev/null || true; }

# parse_wrk FILE -> "rps p50_ms p99_ms non2xx socket_errors requests"
parse_wrk() {
  local f=$1 rps p50 p99 non2xx errors requests
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$f")
  p50=$(wrk_to_ms "$(awk '$1 == "50%" {print $2}' "$f")")
  p99=$(wrk_to_ms "$(awk '$1 == "99%" {print $2}' "$f")")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$f")
  errors=$(awk '/Socket errors:/ {gsub(/,/, ""); print $4 + $6 + $8 + $10}' "$f")
  requests=$(awk '/requests in/ {print $1}' "$f")
  [ -n "$rps" ] || die "could not parse wrk output $f: $(cat "$f")"
  echo "$rps $p50 $p99 ${non2xx:-0} ${errors:-0} ${requests:-0}"
}

# measure NAME SECONDS OUT_PREFIX -> "rps p50 p99 non2xx errors requests verdict_cpu_us pg_cpu_us"
measure() {
  local name=$1 secs=$2 out=$3 r n threads conns pids=() wrk_pids=() pgp
  read -r -a reps <<<"${REPLICAS[$name]}"
  n=${#reps[@]}
  threads=$((THREADS / n)) conns=$((CONNECTIONS / n))
  for r in "${reps[@]}"; do pids+=("${VPID[$r]}"); done
  mapfile -t pgp < <(pg_pids)
  local v0 p0 v1 p1
  v0=$(cpu_ticks "${pids[@]}") p0=$(cpu_ticks "${pgp[@]}")
  for r in "${reps[@]}"; do
    BENCH_APP=${APP[$name]} BENCH_TOKEN=$TOKEN wrk -t"$threads" -c"$conns" -d"${secs}s" --timeout 5s --latency \
      -s "$HERE/floor/decision.lua" "http://127.0.0.1:${PORT[$r]}/v1/decisions" >"$out.$r.txt" 2>&1 &
    wrk_pids+=($!)
  done
  for p in "${wrk_pids[@]}"; do wait "$p"; done
  v1=$(cpu_ticks "${pids[@]}") p1=$(cpu_ticks "${pgp[@]}")
  local sum_rps=0 p50=0 p99=0 non2xx=0 errors=0 requests=0 a b c d e f
  for r in "${reps[@]}"; do
    read -r a b c d e f <<<"$(parse_wrk "$out.$r.txt")"
    sum_rps=$(awk -v x="$sum_rps" -v y="$a" 'BEGIN {printf "%.2f", x + y}')
    p50=$(awk -v x="$p50" -v y="$b" 'BEGIN {print (y > x ? y : x)}')
    p99=$(awk -v x="$p99" -v y="$c" 'BEGIN {print (y > x ? y : x)}')
    non2xx=$((non2xx + d)) errors=$((errors + e)) requests=$((requests + f))
  done
  awk -v rps="$sum_rps" -v p50="$p50" -v p99="$p99" -v n2="$non2xx" -v er="$errors" -v req="$requests" \
    -v vt=$((v1 - v0)) -v pt=$((p1 - p0)) -v hz="$CLK_TCK" 'BEGIN {
      printf "%s %s %s %d %d %d %.1f %.1f\n", rps, p50, p99, n2, er, req,
        (req > 0 ? vt / hz * 1e6 / req : 0), (req > 0 ? pt / hz * 1e6 / req : 0) }'
}

mkdir -p "$TMP/wrk"
RAW="$TMP/results.tsv" # name run rps p50 p99 non2xx errors requests verdict_cpu pg_cpu
: >"$RAW"
if [ "$WARMUP" -gt 0 ]; then
  for name in "${NAMES[@]}"; do
    log "warm-up ${WARMUP}s: $name"
    measure "$name" "$WARMUP" "$TMP/wrk/$name-warmup" >/dev/null
  done
fi
for run in $(seq 1 "$RUNS"); do
  for name in "${NAMES[@]}"; do
    read -r rps p50 p99 non2xx errors requests vcpu pcpu <<<"$(measure "$name" "$DURATION" "$TMP/wrk/$name-$run")"
    echo "$name $run $rps $p50 $p99 $non2xx $errors $requests $vcpu $pcpu" >>"$RAW"
    log "run $run/$RUNS $(printf '%-15s' "$name") $(printf '%10.1f' "$rps") req/s  p50 $p50 ms  p99 $p99 ms  verdict ${vcpu} us/req  postgres ${pcpu} us/req  non-2xx $non2xx  errors $errors"
  done
done
LOAD_AFTER=$(uptime)
log "load after: $LOAD_AFTER"

# --- summary ---------------------------------------------------------------------
median() {
  awk -v n="$1" -v c="$2" '$1 == n {print $c}' "$RAW" | sort -g |
    awk '{v[NR] = $1} END {if (NR == 0) {print "nan"; exit} if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.3f", m}'
}
total() { awk -v n="$1" -v c="$2" '$1 == n {s += $c} END {print s + 0}' "$RAW"; }
runs_of() { awk -v n="$1" '$1 == n {printf "%s%.0f", sep, $3; sep = ", "}' "$RAW"; }
ratio() {
  local a b
  a=$(median "$1" 3) b=$(median "$2" 3)
  if [ "$a" = nan ] || [ "$b" = nan ]; then echo n/a; else awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f×", a / b}'; fi
}

PG_ROWS=$(psql -qAt "$DB_URL" -c "SELECT coalesce(sum(c), 0) || ' rows (' || coalesce(string_agg(replica || ' ' || c, ', '), '') || ')' FROM (SELECT replica, count(*) AS c FROM activity GROUP BY replica ORDER BY replica) t" 2>&1 || true)
SQLITE_ROWS="(sqlite3 not installed)"
if command -v sqlite3 >/dev/null 2>&1; then
  SQLITE_ROWS="$(sqlite3 "$TMP/sqlite-data/verdict.db" 'select count(*) from activity' 2>&1 || true) rows"
fi

mkdir -p "$(dirname "$RESULTS")"
{
  echo "# verdict: two replicas on PostgreSQL against one on SQLite"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted changes in src/')"
  echo "- machine: $(nproc) cores shared by wrk, nginx, PostgreSQL and every verdict; $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
  echo "- PostgreSQL $(psql_admin -c 'SHOW server_version' | awk '{print $1}') on 127.0.0.1 (fsync=$PG_FSYNC; verdict sets synchronous_commit=on), SQLite WAL synchronous=FULL; data dirs on $(df -T "$TMP" | awk 'NR == 2 {print $2}')"
  echo "- load before: \`${LOAD_BEFORE##*load average: }\`, after: \`${LOAD_AFTER##*load average: }\` (1, 5, 15 min)"
  echo "- wrk: $THREADS threads and $CONNECTIONS connections in all per target (two replicas: two wrk at once, $((THREADS / 2)) thread(s) and $((CONNECTIONS / 2)) connections each), ${DURATION}s, $RUNS interleaved rounds after ${WARMUP}s warm-up each; medians over the rounds"
  echo
  echo "| target | decisions/s | p50 ms | p99 ms | verdict CPU µs/decision | PostgreSQL CPU µs/decision | non-2xx | socket errors | decisions/s per round |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
  for name in "${NAMES[@]}"; do
    printf '| %s | %.0f | %.2f | %.2f | %.1f | %.1f | %d | %d | %s |\n' "${LABEL[$name]}" "$(median "$name" 3)" \
      "$(median "$name" 4)" "$(median "$name" 5)" "$(median "$name" 9)" "$(median "$name" 10)" \
      "$(total "$name" 6)" "$(total "$name" 7)" "$(runs_of "$name")"
  done
  echo
  echo "Two replicas on PostgreSQL / one on SQLite: no rules **$(ratio pg2-norules sqlite-norules)**, one rule **$(ratio pg2-rule sqlite-rule)**; one replica on PostgreSQL / SQLite, no rules: $(ratio pg1-norules sqlite-norules)."
  echo
  echo "Two replicas: requests/s summed over both wrk processes, p50/p99 the higher of the two. CPU per decision: CPU time of the verdict process(es) measured, and of all PostgreSQL server processes, during the round, divided by the requests wrk counted (PostgreSQL's is ~0 for SQLite targets, up to other activity on the server). Activity rows afterwards (measured rounds, warm-up and checks): PostgreSQL $PG_ROWS; SQLite $SQLITE_ROWS."
} >"$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"
echo
cat "$RESULTS"
echo
log "written to $RESULTS"
