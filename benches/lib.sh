# shellcheck shell=bash disable=SC2034
# Helpers shared by benches/run.sh and benches/soak.sh (sourced, not run).
#
# Processes started through `spawn` are remembered in BG_PIDS and stopped by
# `stop_all` (SIGTERM, then SIGKILL after 5 s); each script traps EXIT to call it.
# Lessons from tests/support/nginx.rs: nginx runs with `daemon off`, every file it
# writes under its prefix, and `user root;` when we are root (its workers would
# otherwise switch to `nobody` and fail to enter a prefix that is not
# world-searchable).

BG_PIDS=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

need() {
  local cmd
  for cmd in "$@"; do
    command -v "$cmd" >/dev/null 2>&1 || die "\`$cmd\` not found (apt-get install -y $cmd)"
  done
}

find_nginx() {
  local p
  for p in "$(command -v nginx 2>/dev/null || true)" /usr/sbin/nginx /usr/local/sbin/nginx /usr/local/nginx/sbin/nginx; do
    if [ -n "$p" ] && [ -x "$p" ]; then
      echo "$p"
      return 0
    fi
  done
  die "nginx not found (apt-get install -y nginx)"
}

# Whether something accepts connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A loopback port nothing listens on now (another process may still take it before
# we bind; callers retry their start).
free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
    if ! port_open "$p"; then
      echo "$p"
      return 0
    fi
  done
  die "no free port found"
}

# spawn LOGFILE CMD...: starts CMD in the background, stdout+stderr to LOGFILE;
# sets SPAWNED to its pid and remembers it for stop_all.
spawn() {
  local logfile=$1
  shift
  "$@" >"$logfile" 2>&1 </dev/null &
  SPAWNED=$!
  BG_PIDS+=("$SPAWNED")
}

# wait_port PID PORT NAME LOGFILE: waits (up to 20 s) until PORT accepts
# connections while PID is alive; returns 1 if PID died (its log is shown).
wait_port() {
  local pid=$1 port=$2 name=$3 logfile=$4
  for _ in $(seq 1 400); do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited at start; its output:"
      sed 's/^/    /' "$logfile" >&2 || true
      return 1
    fi
    if port_open "$port"; then
      return 0
    fi
    sleep 0.05
  done
  die "$name did not listen on port $port within 20 s (see $logfile)"
}

# stop_pid PID [SECONDS]: SIGTERM, wait up to SECONDS (default 5), then SIGKILL.
# Sets STOP_STATUS to the exit status (or "killed"). Not in a subshell: `wait`
# needs the process to be a child of this shell.
stop_pid() {
  local pid=$1 grace=${2:-5} rc=0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((grace * 20))); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      STOP_STATUS=killed
      return 0
    fi
  fi
  wait "$pid" 2>/dev/null || rc=$?
  STOP_STATUS=$rc
}

stop_all() {
  local pid
  for pid in "${BG_PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      stop_pid "$pid" 5
    fi
  done
  BG_PIDS=()
}

# start_nginx TEMPLATE PREFIX: renders TEMPLATE ({{LISTEN}}, {{PREFIX}}) into
# PREFIX/nginx.conf, starts nginx on a free port; sets NGINX_PORT and NGINX_PID.
start_nginx() {
  local template=$1 prefix=$2 nginx globals port
  nginx=$(find_nginx)
  mkdir -p "$prefix"
  globals="daemon off;"
  if [ "$(id -u)" = 0 ]; then globals="$globals user root;"; fi
  for _ in 1 2 3 4 5; do
    port=$(free_port)
    sed -e "s|{{LISTEN}}|127.0.0.1:$port|g" -e "s|{{PREFIX}}|$prefix|g" "$template" >"$prefix/nginx.conf"
    spawn "$prefix/stderr.log" "$nginx" -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" -g "$globals"
    if wait_port "$SPAWNED" "$port" nginx "$prefix/stderr.log"; then
      NGINX_PORT=$port
      NGINX_PID=$SPAWNED
      return 0
    fi
  done
  die "nginx did not start (see $prefix/error.log)"
}

# start_verdict BIN DATA_DIR POLICIES_DIR LOGFILE: starts `verdict serve` on a free
# port with the tokens in VERDICT_*_TOKEN; waits for /readyz. Sets VERDICT_PORT and
# VERDICT_PID.
start_verdict() {
  local bin=$1 data=$2 policies=$3 logfile=$4 port
  for _ in 1 2 3 4 5; do
    port=$(free_port)
    spawn "$logfile" "$bin" serve --listen "127.0.0.1:$port" --data-dir "$data" --policies "$policies"
    if wait_port "$SPAWNED" "$port" verdict "$logfile"; then
      VERDICT_PORT=$port
      VERDICT_PID=$SPAWNED
      curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || die "verdict is not ready (see $logfile)"
      return 0
    fi
  done
  die "verdict did not start (see $logfile)"
}

# rss_kib PID: VmRSS of PID in KiB (empty if gone).
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || true; }

# wrk_to_ms VALUE: wrk's "850.00us" / "1.20ms" / "2.00s" / "1.00m" in milliseconds.
wrk_to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000; else if (u == "h") n *= 3600000
    printf "%.3f", n }'
}
