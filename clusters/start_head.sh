#!/usr/bin/env bash
# Head start-up for the launcher configs (aws.yaml, local.yaml): start the cluster's MLflow
# tracking server unless it already runs, wait until it answers by the address the nodes use,
# then run the given command (`ray start --head ...`) with MLFLOW_TRACKING_URI exported, so
# that Ray jobs inherit it; login shells (`ray submit`) get it from ~/.bashrc.
#
#   bash start_head.sh [COMMAND ...]
#
# Settings (environment):
#   MLFLOW_ARTIFACTS  where the server stores artifacts (default ~/mlflow/artifacts; s3://... on AWS)
#   MLFLOW_HOST       address it listens on (default 0.0.0.0: rank 0 of a run may log from any node;
#                     127.0.0.1 on a one-machine cluster, then the URI uses 127.0.0.1 too)
#   MLFLOW_PORT       default 5000
#   MLFLOW_DIR        SQLite store, log and pid file (default ~/mlflow)
#   MLFLOW_WAIT_S     how long to wait for the server to answer (default 300)
#   MLFLOW_SERVER_ARGS  more `mlflow server` options, e.g. "--app-name basic-auth" (clusters/README.md)
#   HEAD_IP           the head's address as the nodes see it (default: the address Ray picks)
#
# Re-running it (`ray up` again) keeps a server that runs with the same settings and answers;
# one started with other settings is stopped (by its pid file) and started again.
set -euo pipefail

ARTIFACTS=${MLFLOW_ARTIFACTS:-$HOME/mlflow/artifacts}
BIND=${MLFLOW_HOST:-0.0.0.0}
PORT=${MLFLOW_PORT:-5000}
DIR=${MLFLOW_DIR:-$HOME/mlflow}
WAIT_S=${MLFLOW_WAIT_S:-300}
if [ -z "${HEAD_IP:-}" ]; then
  # The node IP `ray start` will advertise; workers reach the head by it.
  HEAD_IP=$(python -c 'import ray.util; print(ray.util.get_node_ip_address())' 2>/dev/null \
            || hostname -I | awk '{print $1}')
fi
if [ -z "$HEAD_IP" ]; then
  echo "error: could not find this head's IP address; set HEAD_IP" >&2
  exit 1
fi
case "$BIND" in
  127.*|localhost) URI_HOST=127.0.0.1 ;;
  *) URI_HOST=$HEAD_IP ;;
esac
URI=http://$URI_HOST:$PORT
# MLflow 3 answers 403 "Invalid Host header" to any Host it does not list (its default list has
# loopback and private ranges only): name the head's address, and loopback for the SSH tunnels
# (`ray attach -p 5000`, any local port).
ALLOWED="$HEAD_IP:$PORT,$HEAD_IP,localhost:*,localhost,127.0.0.1:*,127.0.0.1"

mkdir -p "$DIR"
PID_FILE=$DIR/server.pid
SETTINGS_FILE=$DIR/server.settings
SETTINGS="--host $BIND --port $PORT --backend-store-uri sqlite:///$DIR/mlflow.db"
SETTINGS="$SETTINGS --artifacts-destination $ARTIFACTS --allowed-hosts $ALLOWED ${MLFLOW_SERVER_ARGS:-}"

running_pid() {  # the pid in the pid file when that process is still an mlflow server
  local pid
  pid=$(cat "$PID_FILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' </proc/"$pid"/cmdline | grep -q "mlflow server" \
    && echo "$pid"
}

if pid=$(running_pid) && [ "$(cat "$SETTINGS_FILE" 2>/dev/null)" = "$SETTINGS" ]; then
  echo "MLflow server already running (pid $pid)"
else
  if pid=$(running_pid); then
    echo "Stopping the MLflow server started with other settings (pid $pid)"
    kill -- -"$pid" 2>/dev/null || kill "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -9 -- -"$pid" 2>/dev/null || true
  fi
  if (exec 3<>"/dev/tcp/$URI_HOST/$PORT") 2>/dev/null; then
    echo "error: port $PORT on $URI_HOST is in use by another program; stop it, or set MLFLOW_PORT" >&2
    exit 1
  fi
  # Own session (setsid): the launcher's SSH session may end, and stopping it later stops the
  # whole group (uvicorn workers). MLflow's job runner serves GenAI jobs this study never uses.
  # shellcheck disable=SC2086  # SETTINGS is a list of options
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
    setsid nohup mlflow server $SETTINGS </dev/null >>"$DIR/server.log" 2>&1 &
  echo $! >"$PID_FILE"
  echo "$SETTINGS" >"$SETTINGS_FILE"
  echo "Started the MLflow server (pid $!, log $DIR/server.log)"
fi

# Wait for an API answer through the address the nodes use (/health skips MLflow's Host check).
python - "$URI" "$(cat "$PID_FILE")" "$WAIT_S" "$DIR/server.log" <<'EOF'
import os, sys, time, urllib.error, urllib.request

uri, pid, wait_s, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
deadline, last = time.monotonic() + wait_s, "no answer"
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        tail = open(log, encoding="utf-8", errors="replace").read()[-3000:]
        sys.exit(f"{tail}\nerror: the MLflow server (pid {pid}) exited; its log is above ({log})")
    try:
        with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=5):
            print(f"MLflow answers at {uri}")
            sys.exit(0)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:  # the basic-auth app: it runs and accepts this address
            print(f"MLflow answers at {uri} (login required)")
            sys.exit(0)
        # It runs, but refuses this address (403: --allowed-hosts): waiting will not help.
        sys.exit(f"error: MLflow at {uri} answered {exc.code} {exc.read()[:200]!r}; check --allowed-hosts")
    except OSError as exc:
        last = str(exc)
    time.sleep(1)
sys.exit(f"error: MLflow at {uri} did not answer within {wait_s:.0f} s ({last}); see {log}, "
         "or raise MLFLOW_WAIT_S")
EOF

# Login shells (ray submit, ray attach) get the URI too; replace the line a previous run wrote.
MARK="# set by dispersion-scaling clusters/start_head.sh"
touch ~/.bashrc
sed -i "\|$MARK\$|d" ~/.bashrc
echo "export MLFLOW_TRACKING_URI=$URI  $MARK" >>~/.bashrc

export MLFLOW_TRACKING_URI=$URI
if [ $# -gt 0 ]; then
  exec "$@"
fi
