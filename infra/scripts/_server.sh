#!/usr/bin/env bash
# Shared helpers for start_mlflow.sh and start_prefect.sh (sourced, not run).
# A server runs in its own session (setsid) so --stop can TERM its whole process group.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# The executable from the project's venv if there is one, else from PATH.
find_bin() {
  if [[ -x "$ROOT/.venv/bin/$1" ]]; then echo "$ROOT/.venv/bin/$1"; else command -v "$1" || true; fi
}

is_running() {  # pidfile -> 0 when its process is alive
  [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

warn_if_exposed() {  # host
  if [[ "$1" != "127.0.0.1" && "$1" != "localhost" && "$1" != "::1" ]]; then
    echo "WARNING: binding to $1 exposes the server beyond this machine; it has no authentication." >&2
    echo "         Put it behind a firewall or an authenticating proxy." >&2
  fi
}

# wait_healthy URL PIDFILE LOG SECONDS
wait_healthy() {
  local url="$1" pidfile="$2" log="$3" limit="$4" i
  for ((i = 0; i < limit * 4; i++)); do
    if curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then return 0; fi
    if ! is_running "$pidfile"; then
      echo "ERROR: the server exited during start-up; last lines of $log:" >&2
      tail -n 20 "$log" >&2
      rm -f "$pidfile"
      return 1
    fi
    sleep 0.25
  done
  echo "ERROR: no answer from $url after ${limit}s; see $log (still running, stop with --stop)" >&2
  return 1
}

# stop_server PIDFILE NAME: TERM the process group, wait up to 20 s, then KILL.
stop_server() {
  local pidfile="$1" name="$2" pid i
  if ! is_running "$pidfile"; then
    echo "$name is not running (no live pid in $pidfile)"
    rm -f "$pidfile"
    return 0
  fi
  pid="$(cat "$pidfile")"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for ((i = 0; i < 80; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$name did not stop after TERM; sending KILL" >&2
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"
  fi
  rm -f "$pidfile"
  echo "$name stopped (pid $pid)"
}
