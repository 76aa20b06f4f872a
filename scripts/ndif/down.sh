#!/usr/bin/env bash
# Stop the local NDIF server started by up.sh. Idempotent: safe to run when
# nothing (or only part) is running. Stops the API, S3 store and Redis by the
# PIDs up.sh recorded (each is its own process group), then the Ray cluster
# with `ray stop -g 10` (the model actors and the controller live inside Ray;
# note `ray stop` is machine-wide: it stops every Ray process of this user),
# and checks that none of the configured ports is still listening.
set -uo pipefail

# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

log() { printf '[ndif-down] %s\n' "$*"; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

stop_pid() {  # name
    local name="$1" pidfile="$NDIF_RUN/$1.pid" pid i
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid and its process group)"
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
        for ((i = 0; i < 40; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not exit on TERM within 10 s; sending KILL"
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
        fi
    fi
    # Leftovers of the group (e.g. gunicorn's spawned dispatcher), if any.
    if pgrep -g "$pid" > /dev/null 2>&1; then
        kill -KILL -- "-$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
}

stop_pid api
if [ -x "$NDIF_VENV/bin/ray" ]; then
    log "ray stop"
    (cd "$NDIF_RUN" 2>/dev/null || cd /; timeout 60 "$NDIF_VENV/bin/ray" stop -g 10) > /dev/null 2>&1 \
        || log "ray stop returned non-zero (nothing running?)"
fi
stop_pid s3
stop_pid redis

busy=""
for port in "$SUPERSCOPES_NDIF_API_PORT" "$SUPERSCOPES_NDIF_REDIS_PORT" "$SUPERSCOPES_NDIF_S3_PORT" \
            "$SUPERSCOPES_NDIF_RAY_PORT" "$SUPERSCOPES_NDIF_RAY_CLIENT_PORT" "$SUPERSCOPES_NDIF_RAY_DASHBOARD_PORT"; do
    port_open "$port" && busy="$busy $port"
done
if [ -n "$busy" ]; then
    log "WARNING: still listening on 127.0.0.1:$busy"
    exit 1
fi
log "stopped; none of the NDIF ports is listening"
