#!/usr/bin/env bash
# Start a Prefect server (API + UI + scheduler) for schedules, deployments and a shared run history.
#
#   infra/scripts/start_prefect.sh [--host 127.0.0.1] [--port 4200] [--home DIR] [--foreground]
#   infra/scripts/start_prefect.sh --stop [--port 4200] [--home DIR]
#
# Binds to loopback unless --host says otherwise. PREFECT_HOME defaults to data/prefect-server (kept apart
# from the ephemeral data/prefect of `sla run`). Then: export PREFECT_API_URL=http://HOST:PORT/api
# Stop processes that serve deployments (`sla deploy`) before stopping the server.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_server.sh"

HOST=127.0.0.1
PORT=4200
HOME_DIR="${SLA_DATA_DIR:-$ROOT/data}/prefect-server"
FOREGROUND=0
STOP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --home) HOME_DIR="$2"; shift 2 ;;
    --foreground) FOREGROUND=1; shift ;;
    --stop) STOP=1; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

mkdir -p "$HOME_DIR"
HOME_DIR="$(cd "$HOME_DIR" && pwd)"
PIDFILE="$HOME_DIR/prefect-$PORT.pid"
LOG="$HOME_DIR/prefect-$PORT.log"
if [[ $STOP == 1 ]]; then stop_server "$PIDFILE" "prefect server on port $PORT"; exit 0; fi

PREFECT="$(find_bin prefect)"
[[ -n "$PREFECT" ]] || { echo "ERROR: prefect not found; run \`make setup\`" >&2; exit 1; }
if is_running "$PIDFILE"; then
  echo "prefect server already running (pid $(cat "$PIDFILE")); export PREFECT_API_URL=http://$HOST:$PORT/api"
  exit 0
fi
warn_if_exposed "$HOST"
export PREFECT_HOME="$HOME_DIR"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
# The server must not talk to itself through a client URL left over from the caller's shell.
unset PREFECT_API_URL
ARGS=(server start --host "$HOST" --port "$PORT" --analytics-off)
if [[ $FOREGROUND == 1 ]]; then exec "$PREFECT" "${ARGS[@]}"; fi

setsid nohup "$PREFECT" "${ARGS[@]}" >"$LOG" 2>&1 < /dev/null &
echo $! >"$PIDFILE"
wait_healthy "http://$HOST:$PORT/api/health" "$PIDFILE" "$LOG" "${SLA_SERVER_START_TIMEOUT:-90}"
echo "prefect server on http://$HOST:$PORT (pid $(cat "$PIDFILE"), home $HOME_DIR, log $LOG)"
echo "export PREFECT_API_URL=http://$HOST:$PORT/api"
