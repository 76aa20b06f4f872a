# Shared settings for up.sh / down.sh (sourced, not executed).
# Every value can be overridden from the environment before calling the scripts.

NDIF_SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NDIF_REPO_ROOT="$(cd "$NDIF_SCRIPT_DIR/../.." && pwd)"

# Where the server venv, PID files, logs and state live.
SUPERSCOPES_NDIF_HOME="${SUPERSCOPES_NDIF_HOME:-$NDIF_REPO_ROOT/.ndif}"
NDIF_VENV="$SUPERSCOPES_NDIF_HOME/venv"
NDIF_RUN="$SUPERSCOPES_NDIF_HOME/run"

# The served model: an embedded model name (fetched like `superscopes.load` does when it is
# not cached, under $SUPERSCOPES_CACHE) or a transformers save_pretrained directory.
# SUPERSCOPES_NDIF_MODEL_DIR (a directory) is still accepted.
SUPERSCOPES_NDIF_MODEL="${SUPERSCOPES_NDIF_MODEL:-${SUPERSCOPES_NDIF_MODEL_DIR:-smollm2-135m}}"

# The project's own venv (`make install`): it fetches the model and computes the served key
# with the same code the client uses, so both ask for the same key.
SUPERSCOPES_CLIENT_PYTHON="${SUPERSCOPES_CLIENT_PYTHON:-$NDIF_REPO_ROOT/.venv/bin/python}"

# Interpreter for the server venv. ndif 0.1.2 declares Python >=3.12, but the
# only CPU-only torch 2.13.0 wheel available here is cp311 (/opt/wheels); on 3.12
# pip would take the CUDA build of torch (plus GBs of nvidia-* wheels). ndif's
# code runs unchanged on 3.11, so up.sh installs it with --no-deps and its
# dependencies separately. Point this at a 3.12 interpreter to try 3.12.
SUPERSCOPES_NDIF_PYTHON="${SUPERSCOPES_NDIF_PYTHON:-/root/.pyenv/versions/3.11.7/bin/python}"

# Ports (all bound to 127.0.0.1).
SUPERSCOPES_NDIF_API_PORT="${SUPERSCOPES_NDIF_API_PORT:-5001}"
SUPERSCOPES_NDIF_REDIS_PORT="${SUPERSCOPES_NDIF_REDIS_PORT:-6390}"
SUPERSCOPES_NDIF_S3_PORT="${SUPERSCOPES_NDIF_S3_PORT:-9010}"
SUPERSCOPES_NDIF_RAY_PORT="${SUPERSCOPES_NDIF_RAY_PORT:-6385}"
SUPERSCOPES_NDIF_RAY_CLIENT_PORT="${SUPERSCOPES_NDIF_RAY_CLIENT_PORT:-10001}"
SUPERSCOPES_NDIF_RAY_DASHBOARD_PORT="${SUPERSCOPES_NDIF_RAY_DASHBOARD_PORT:-8265}"

# Bounded waits (seconds).
SUPERSCOPES_NDIF_TIMEOUT="${SUPERSCOPES_NDIF_TIMEOUT:-300}"

NDIF_HOST_URL="http://127.0.0.1:$SUPERSCOPES_NDIF_API_PORT"

# Environment of every NDIF process (Ray workers inherit it from `ray start`).
export NDIF_REDIS_URL="redis://127.0.0.1:$SUPERSCOPES_NDIF_REDIS_PORT"
export NDIF_OBJECT_STORE_URL="http://127.0.0.1:$SUPERSCOPES_NDIF_S3_PORT"
export NDIF_OBJECT_STORE_ACCESS_KEY="${NDIF_OBJECT_STORE_ACCESS_KEY:-testing}"
export NDIF_OBJECT_STORE_SECRET_KEY="${NDIF_OBJECT_STORE_SECRET_KEY:-testing}"
export NDIF_RAY_ADDRESS="ray://127.0.0.1:$SUPERSCOPES_NDIF_RAY_CLIENT_PORT"
export NDIF_RAY_HEAD_PORT="$SUPERSCOPES_NDIF_RAY_PORT"
export NDIF_RAY_DASHBOARD_PORT="$SUPERSCOPES_NDIF_RAY_DASHBOARD_PORT"
export NDIF_API_PORT="$SUPERSCOPES_NDIF_API_PORT"
export NDIF_API_URL="$NDIF_HOST_URL"
export NDIF_API_WORKERS=1
export NDIF_HOME="$NDIF_RUN/ndif-home"
export NDIF_MODEL_IMPORT_PATH="ndif_cpu_actor.CPUModelActor"
export NDIF_DEFAULT_DTYPE=float32
export NDIF_DEPLOYMENTS=""
export NDIF_AUTOSCALING_MAX_REPLICAS="${NDIF_AUTOSCALING_MAX_REPLICAS:-1}"
export GRPC_ENABLE_FORK_SUPPORT=0
export RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export PYTHONPATH="$NDIF_SCRIPT_DIR${PYTHONPATH:+:$PYTHONPATH}"
unset RAY_ADDRESS NDIF_POSTGRES_URL NDIF_LOKI_URL NDIF_INFLUX_URL
# Make Ray resolve "127.0.0.1" to itself (not to the machine's external IP), so
# its GCS, raylet, client server and workers bind and advertise 127.0.0.1.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Never let a Ray API call start a private local cluster: ndif 0.1.2's API
# dispatcher, after losing the Ray head, otherwise auto-inits a new cluster in
# /tmp/ray (on the dashboard port), which then blocks restarting the real one.
export RAY_ENABLE_AUTO_CONNECT=0
# Ray 2.60 turns token auth on for `ray start` when ~/.ray/auth_token exists
# (e.g. left by some other local ray.init()); clients here send no token. Loopback only.
export RAY_AUTH_MODE=disabled
