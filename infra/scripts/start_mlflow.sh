#!/usr/bin/env bash
# Start an MLflow tracking + model-registry server (sqlite store, served artifacts) for a team.
#
#   infra/scripts/start_mlflow.sh [--host 127.0.0.1] [--port 5000] [--store DIR] [--foreground]
#   infra/scripts/start_mlflow.sh --stop [--port 5000] [--store DIR]
#
# Binds to loopback unless --host says otherwise. The store defaults to data/mlflow-server (kept apart from
# the embedded data/mlflow of `sla run`). Then: export MLFLOW_TRACKING_URI=http://HOST:PORT
# No credential is read or written; the server has no authentication, so keep it on loopback or a
# trusted network.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_server.sh"

HOST=127.0.0.1
PORT=5000
STORE="${SLA_DATA_DIR:-$ROOT/data}/mlflow-server"
FOREGROUND=0
STOP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --store) STORE="$2"; shift 2 ;;
    --foreground) FOREGROUND=1; shift ;;
    --stop) STOP=1; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

mkdir -p "$STORE/artifacts"
STORE="$(cd "$STORE" && pwd)"
PIDFILE="$STORE/mlflow-$PORT.pid"
LOG="$STORE/mlflow-$PORT.log"
if [[ $STOP == 1 ]]; then stop_server "$PIDFILE" "mlflow server on port $PORT"; exit 0; fi

MLFLOW="$(find_bin mlflow)"
[[ -n "$MLFLOW" ]] || { echo "ERROR: mlflow not found; run \`make setup\`" >&2; exit 1; }
if is_running "$PIDFILE"; then
  echo "mlflow server already running (pid $(cat "$PIDFILE")); export MLFLOW_TRACKING_URI=http://$HOST:$PORT"
  exit 0
fi
warn_if_exposed "$HOST"
# Without this MLflow 3 starts 10-15 job-runner processes that survive TERM to the main pid.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
ARGS=(server --backend-store-uri "sqlite:///$STORE/mlflow.db" --artifacts-destination "$STORE/artifacts"
      --host "$HOST" --port "$PORT" --workers 1)
if [[ $FOREGROUND == 1 ]]; then exec "$MLFLOW" "${ARGS[@]}"; fi

setsid nohup "$MLFLOW" "${ARGS[@]}" >"$LOG" 2>&1 < /dev/null &
echo $! >"$PIDFILE"
wait_healthy "http://$HOST:$PORT/health" "$PIDFILE" "$LOG" "${SLA_SERVER_START_TIMEOUT:-90}"
echo "mlflow server on http://$HOST:$PORT (pid $(cat "$PIDFILE"), store $STORE, log $LOG)"
echo "export MLFLOW_TRACKING_URI=http://$HOST:$PORT"
