#!/usr/bin/env bash
# Start a real local NDIF server (PyPI ndif==0.1.2) serving one model from a
# local directory, CPU only, every listener on 127.0.0.1. Idempotent: services
# already running are left alone, the model is deployed only if it is not.
#
#   scripts/ndif/up.sh            # install (first time) + start + deploy + probe
#   scripts/ndif/down.sh          # stop everything
#
# Prints `NDIF_HOST=...` and `NDIF_MODEL_KEY=...` at the end. See README.md.
set -euo pipefail

# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

T0=$(date +%s)
log() { printf '[ndif-up %3ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$NDIF_RUN" "$NDIF_HOME"

# ---------------------------------------------------------------- assumptions
# Checked before anything is installed or started, each with what to do about it.
PY="$NDIF_VENV/bin/python"
[ -x "$SUPERSCOPES_CLIENT_PYTHON" ] \
    || die "no project venv at $SUPERSCOPES_CLIENT_PYTHON: run \`make install\` first (or set SUPERSCOPES_CLIENT_PYTHON)"
venv_ready() { [ -f "$NDIF_VENV/.installed" ] && "$PY" -c 'import ndif, ray, torch, moto, gunicorn' 2>/dev/null; }
if ! venv_ready; then
    [ -x "$SUPERSCOPES_NDIF_PYTHON" ] \
        || die "interpreter $SUPERSCOPES_NDIF_PYTHON for the server venv not found: set SUPERSCOPES_NDIF_PYTHON to a Python 3.11 or 3.12+"
    PYVER="$("$SUPERSCOPES_NDIF_PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    case "$PYVER" in
        3.11|3.1[2-9]) ;;
        *) die "ndif 0.1.2 needs Python 3.12+ (3.11 works with --no-deps); $SUPERSCOPES_NDIF_PYTHON is $PYVER: set SUPERSCOPES_NDIF_PYTHON" ;;
    esac
    # The CPU build of torch 2.13.0 exists here only for cp311 (/opt/wheels);
    # on another Python, plain 2.13.0 (the CUDA build from PyPI) is all there is.
    if [ "$PYVER" = "3.11" ]; then TORCH_SPEC="torch==2.13.0+cpu"; else TORCH_SPEC="torch==2.13.0"; fi
    "$SUPERSCOPES_NDIF_PYTHON" -m pip install --quiet --dry-run --no-deps --ignore-installed "$TORCH_SPEC" > /dev/null 2>&1 \
        || die "no $TORCH_SPEC wheel for Python $PYVER on the configured package indexes (pip config list): add one, or set SUPERSCOPES_NDIF_PYTHON to a Python that has one"
fi
if ! command -v redis-server > /dev/null 2>&1; then
    command -v apt-get > /dev/null 2>&1 \
        || die "redis-server is not on PATH and there is no apt-get to install it: install Redis with your package manager"
    [ "$(id -u)" = 0 ] \
        || die "redis-server is not on PATH and installing it needs root: run \`sudo apt-get install redis-server\` once"
fi

# ---------------------------------------------------------------- model
# Fetched if missing, and its key computed, by superscopes itself (models.served_model): the
# client asks for exactly this key whatever SUPERSCOPES_CACHE or symlinks say.
log "resolving the served model $SUPERSCOPES_NDIF_MODEL (fetched once if missing)"
SERVED="$(PYTHONPATH="$NDIF_REPO_ROOT" "$SUPERSCOPES_CLIENT_PYTHON" -c '
import sys
from superscopes.models import served_model
print("\n".join(served_model(sys.argv[1])))' "$SUPERSCOPES_NDIF_MODEL")" || die "could not fetch or resolve $SUPERSCOPES_NDIF_MODEL (see above)"
MODEL_DIR="$(sed -n 1p <<< "$SERVED")"
MODEL_KEY="$(sed -n 2p <<< "$SERVED")"
[ -f "$MODEL_DIR/config.json" ] || die "no transformers checkpoint at $MODEL_DIR (set SUPERSCOPES_NDIF_MODEL)"

# ---------------------------------------------------------------- venv
install_venv() {
    log "creating server venv $NDIF_VENV with $SUPERSCOPES_NDIF_PYTHON"
    rm -rf "$NDIF_VENV"
    "$SUPERSCOPES_NDIF_PYTHON" -m venv "$NDIF_VENV"
    local pyver="$PYVER" torch_spec="$TORCH_SPEC"
    # Pin the packages shared with the project's client venv to the same versions.
    cat > "$NDIF_RUN/constraints.txt" <<EOF
$torch_spec
nnsight==0.8.1
transformers==5.23.0
tokenizers==0.23.3
safetensors==0.8.0
accelerate==1.15.0
huggingface_hub==2.4.0
numpy==2.4.6
zstandard==0.25.0
cloudpickle==3.1.2
EOF
    log "installing dependencies (a few minutes the first time; log: $NDIF_RUN/pip.log)"
    # ndif[api,ray]==0.1.2's own dependencies, installed explicitly so that pip
    # never re-resolves them against ndif's Requires-Python (>=3.12).
    "$PY" -m pip install --disable-pip-version-check -c "$NDIF_RUN/constraints.txt" \
        "$torch_spec" "nnsight>=0.8.0rc1,<0.9" pydantic redis click python-dotenv pyyaml boto3 \
        fastapi "uvicorn[standard]" gunicorn python-multipart \
        "ray[default]" "transformers>=5.15.0" accelerate numpy zstandard peft \
        "moto[server]" > "$NDIF_RUN/pip.log" 2>&1 || die "pip install failed, see $NDIF_RUN/pip.log"
    if [ "$pyver" = "3.11" ]; then
        "$PY" -m pip install --disable-pip-version-check --no-deps --ignore-requires-python \
            "ndif==0.1.2" >> "$NDIF_RUN/pip.log" 2>&1 || die "pip install ndif failed, see $NDIF_RUN/pip.log"
    else
        "$PY" -m pip install --disable-pip-version-check -c "$NDIF_RUN/constraints.txt" \
            "ndif[api,ray]==0.1.2" >> "$NDIF_RUN/pip.log" 2>&1 || die "pip install ndif failed, see $NDIF_RUN/pip.log"
    fi
    touch "$NDIF_VENV/.installed"
    log "venv ready"
}
venv_ready || install_venv
export PATH="$NDIF_VENV/bin:$PATH"

# ---------------------------------------------------------------- redis-server
if ! command -v redis-server >/dev/null 2>&1; then
    log "installing Debian redis-server"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) \
        > "$NDIF_RUN/apt.log" 2>&1 || die "apt-get install redis-server failed, see $NDIF_RUN/apt.log"
fi

# ---------------------------------------------------------------- helpers
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pid_alive() { [ -f "$NDIF_RUN/$1.pid" ] && kill -0 "$(cat "$NDIF_RUN/$1.pid")" 2>/dev/null; }

wait_port() {  # name port seconds
    local i
    for ((i = 0; i < $3 * 2; i++)); do
        port_open "$2" && return 0
        sleep 0.5
    done
    die "$1 did not open 127.0.0.1:$2 within $3 s (log: $NDIF_RUN/$1.log)"
}

stop_bg() {  # name : TERM the process group up.sh started, KILL after 10 s
    local pid i
    pid_alive "$1" || { rm -f "$NDIF_RUN/$1.pid"; return 0; }
    pid="$(cat "$NDIF_RUN/$1.pid")"
    log "stopping $1 (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$NDIF_RUN/$1.pid"
}

start_bg() {  # name port cmd... : start in its own session, record PID (= process group id)
    local name="$1" port="$2"; shift 2
    if pid_alive "$name" && port_open "$port"; then
        log "$name already running (pid $(cat "$NDIF_RUN/$name.pid"), port $port)"
        return 0
    fi
    if port_open "$port"; then
        die "port 127.0.0.1:$port (for $name) is taken by a process up.sh did not start"
    fi
    log "starting $name on 127.0.0.1:$port"
    setsid "$@" > "$NDIF_RUN/$name.log" 2>&1 < /dev/null &
    echo $! > "$NDIF_RUN/$name.pid"
    wait_port "$name" "$port" 60
}

# ---------------------------------------------------------------- redis + S3
start_bg redis "$SUPERSCOPES_NDIF_REDIS_PORT" \
    redis-server --bind 127.0.0.1 --port "$SUPERSCOPES_NDIF_REDIS_PORT" --daemonize no \
    --save "" --appendonly no --dir "$NDIF_RUN" --protected-mode yes

# moto_server: an in-memory S3 in place of RustFS (results over the inline cap,
# and the status of non-blocking requests, are stored there).
start_bg s3 "$SUPERSCOPES_NDIF_S3_PORT" \
    "$NDIF_VENV/bin/moto_server" -H 127.0.0.1 -p "$SUPERSCOPES_NDIF_S3_PORT"

# ---------------------------------------------------------------- Ray head
ray_up() { port_open "$SUPERSCOPES_NDIF_RAY_PORT" && port_open "$SUPERSCOPES_NDIF_RAY_CLIENT_PORT"; }
if ray_up; then
    log "ray head already running (gcs 127.0.0.1:$SUPERSCOPES_NDIF_RAY_PORT)"
else
    # An API left from before talks to a Ray cluster that is gone: restart it
    # after the new head is up (its dispatcher caches controller/replica handles).
    stop_bg api
    # The controller only places models on nodes that report GPUs with memory:
    # declare one (fake) GPU and its memory; the CPU actor ignores it.
    RESOURCES="$("$PY" - <<'EOF'
import json, psutil
print(json.dumps({"head": 10,
                  "cuda_memory_bytes": 8 * 1024**3,
                  "cpu_memory_bytes": int(psutil.virtual_memory().total)}))
EOF
)"
    log "starting ray head (resources $RESOURCES)"
    export NDIF_SERVICE=ray
    ray start --head \
        --node-ip-address=127.0.0.1 \
        --port="$SUPERSCOPES_NDIF_RAY_PORT" \
        --ray-client-server-port="$SUPERSCOPES_NDIF_RAY_CLIENT_PORT" \
        --include-dashboard=true \
        --dashboard-host=127.0.0.1 \
        --dashboard-port="$SUPERSCOPES_NDIF_RAY_DASHBOARD_PORT" \
        --num-cpus=4 --num-gpus=1 \
        --resources="$RESOURCES" \
        --object-store-memory=200000000 \
        --temp-dir="$NDIF_RUN/ray" \
        --disable-usage-stats \
        > "$NDIF_RUN/ray-start.log" 2>&1 || { tail -30 "$NDIF_RUN/ray-start.log"; die "ray start failed"; }
    unset NDIF_SERVICE
    wait_port ray-gcs "$SUPERSCOPES_NDIF_RAY_PORT" 60
    wait_port ray-client "$SUPERSCOPES_NDIF_RAY_CLIENT_PORT" 60
fi

# ---------------------------------------------------------------- controller
# A driver that launches the detached "Controller" actor (get_if_exists: a
# relaunch reuses a live one) and exits.
log "launching the NDIF controller actor"
RAY_ADDRESS="127.0.0.1:$SUPERSCOPES_NDIF_RAY_PORT" NDIF_SERVICE=ray \
    timeout 120 "$PY" -m ndif.services.ray.deployments.controller.controller \
    > "$NDIF_RUN/controller.log" 2>&1 || { tail -30 "$NDIF_RUN/controller.log"; die "controller launch failed"; }

# ---------------------------------------------------------------- API
# gunicorn's own config binds 0.0.0.0; --bind on the command line overrides it.
# Its on_starting hook spawns the queue dispatcher (which talks to Ray).
start_bg api "$SUPERSCOPES_NDIF_API_PORT" \
    env NDIF_SERVICE=api "$NDIF_VENV/bin/gunicorn" --config python:ndif.services.api.gunicorn_conf \
    --bind "127.0.0.1:$SUPERSCOPES_NDIF_API_PORT" --workers 1 \
    --chdir "$NDIF_RUN" ndif.services.api.app:app

# Wait (bounded) until the dispatcher reports Ray connected.
deadline=$(( $(date +%s) + SUPERSCOPES_NDIF_TIMEOUT ))
until curl -fsS "$NDIF_HOST_URL/connected" > /dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "API never reported Ray connected (log: $NDIF_RUN/api.log)"
    sleep 1
done
log "API up at $NDIF_HOST_URL (Ray connected)"

# ---------------------------------------------------------------- deploy
SIZE_BYTES="$(du -cb "$MODEL_DIR"/*.safetensors 2>/dev/null | tail -1 | cut -f1)"
[ -n "$SIZE_BYTES" ] && [ "$SIZE_BYTES" -gt 0 ] || SIZE_BYTES=1000000000
printf '%s\n' "$MODEL_KEY" > "$NDIF_RUN/model_key"
sed -e "s|@MODEL_DIR@|$MODEL_DIR|" -e "s|@SIZE_BYTES@|$SIZE_BYTES|" \
    "$NDIF_SCRIPT_DIR/models.yaml.in" > "$NDIF_RUN/models.yaml.tmp"
MODEL_KEY="$MODEL_KEY" "$PY" - "$NDIF_RUN/models.yaml.tmp" <<'EOF'
import os, sys
p = sys.argv[1]
s = open(p).read().replace("@MODEL_KEY@", os.environ["MODEL_KEY"].replace("'", "''"))
open(p, "w").write(s)
EOF
mv "$NDIF_RUN/models.yaml.tmp" "$NDIF_RUN/models.yaml"

# Is a HOT replica of this key already there? (controller status via Ray client)
deployed() {
    MODEL_KEY="$MODEL_KEY" timeout 90 "$PY" - <<'EOF' 2>> "$NDIF_RUN/deploy.log"
import os, sys, ray
from ndif.common.providers.ray import get_controller_actor_handle
ray.init(address=os.environ["NDIF_RAY_ADDRESS"], namespace="NDIF", logging_level="error")
# get_deployment lists the HOT replicas of a key.
hot = ray.get(get_controller_actor_handle().get_deployment.remote(os.environ["MODEL_KEY"]))
print(f"HOT replicas of the model: {len(hot.replicas)}", file=sys.stderr)
sys.exit(0 if hot.replicas else 1)
EOF
}

if deployed; then
    log "model already deployed"
else
    log "deploying $MODEL_DIR (ndif deploy -f $NDIF_RUN/models.yaml; log: $NDIF_RUN/deploy.log)"
    remaining=$(( deadline - $(date +%s) )); [ "$remaining" -gt 30 ] || remaining=30
    (cd "$NDIF_RUN" && timeout "$remaining" "$NDIF_VENV/bin/ndif" deploy -f "$NDIF_RUN/models.yaml") \
        >> "$NDIF_RUN/deploy.log" 2>&1 || { tail -20 "$NDIF_RUN/deploy.log"; die "deploy failed or timed out"; }
    log "model deployed"
fi

# ---------------------------------------------------------------- probe
# A real remote trace through the API (websocket + POST + result).
log "probing with a remote trace"
remaining=$(( deadline - $(date +%s) )); [ "$remaining" -gt 60 ] || remaining=60
NDIF_HOST="$NDIF_HOST_URL" timeout "$remaining" "$PY" "$NDIF_SCRIPT_DIR/probe.py" "$MODEL_DIR" \
    > "$NDIF_RUN/probe.log" 2>&1 || { tail -20 "$NDIF_RUN/probe.log"; die "probe failed"; }
tail -1 "$NDIF_RUN/probe.log"

log "ready"
echo "NDIF_HOST=$NDIF_HOST_URL"
echo "NDIF_MODEL_KEY=$MODEL_KEY"
echo "SUPERSCOPES_NDIF_MODEL_DIR=$MODEL_DIR"
