#!/usr/bin/env bash
# A local development stack on 127.0.0.1: the laptop stand-in for the cluster.
#
#   infra/local_stack.sh up       start a Ray head (token auth), an S3-compatible store
#                                 (moto_server, bucket created) and an MLflow server
#   infra/local_stack.sh env      print the exports a job needs:  eval "$(infra/local_stack.sh env)"
#   infra/local_stack.sh status   what runs, where; exit 0 only if all three answer
#   infra/local_stack.sh down     stop exactly what `up` started (recorded sessions)
#
# State lives in $STACK_DIR (default: <repo>/.stack, ignored by git): pids, ports,
# logs, the Ray token and the S3 keys (both mode 600), mlflow.db. Nothing binds
# beyond loopback. Every service is started with `setsid`, in a session whose id is
# the recorded pid; `down` signals the processes of those sessions only (TERM, then
# KILL after $STACK_STOP_TIMEOUT s) and never runs `ray stop`, which would stop
# every Ray cluster of this user on the machine.
#
# Settings (environment):
#   STACK_DIR             state directory                      (<repo>/.stack)
#   STACK_PYTHON          the project's Python                 (<repo>/.venv/bin/python)
#   STACK_BUCKET          bucket created in the object store    (siamese)
#   STACK_RAY_PORT        Ray GCS port (RAY_ADDRESS)             (6379)
#   STACK_DASHBOARD_PORT  Ray dashboard / job API               (8265)
#   STACK_CLIENT_PORT     Ray client server                     (10001)
#   STACK_AGENT_PORT      Ray dashboard agent HTTP              (52365)
#   STACK_S3_PORT         moto_server                           (9000)
#   STACK_MLFLOW_PORT     MLflow tracking server                (5000)
#   STACK_RAY_CPUS        logical CPUs the head advertises      (max(4, cores): see docs/cluster.md)
#   STACK_MULTI_NODE      1: other Ray nodes may join the head   (0)
#                         (Ray then listens on all interfaces, token auth still on; a node
#                         joins from this machine as 127.0.0.2, see docs/cluster.md "Local stack")
#   STACK_START_TIMEOUT   seconds to wait for each service      (180)
#   STACK_STOP_TIMEOUT    seconds each service gets to stop     (30)
#                         after SIGTERM, before SIGKILL
#
# The object store keeps objects in memory: `down` discards them (mlflow.db stays, so
# old runs keep their metadata but lose their artifacts). `rm -rf .stack` after `down`
# for a clean slate.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${STACK_DIR:-$ROOT/.stack}
PY=${STACK_PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
HOST=127.0.0.1
REGION=us-east-1
SERVICES=(mlflow ray s3)   # stop order; start order is the reverse
START_TIMEOUT=${STACK_START_TIMEOUT:-180}
STOP_TIMEOUT=${STACK_STOP_TIMEOUT:-30}

die() { echo "local_stack: $*" >&2; exit 1; }
log() { echo "local_stack: $*" >&2; }

usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# --- sessions ---------------------------------------------------------------------
# Each service runs in its own session (setsid), whose id is the recorded pid. Its
# children stay in that session even when they make their own process group (Ray's
# workers do), so the session id finds all of them and nothing else.
pid_of() { [[ -s "$STATE/$1.pid" ]] && cat "$STATE/$1.pid" || true; }
session_pids() { [[ "$1" =~ ^[0-9]+$ ]] && (($1 > 1)) && pgrep -s "$1"; }
session_alive() { session_pids "$1" >/dev/null 2>&1; }
running() { session_alive "$(pid_of "$1")"; }

stop_session() {  # stop_session NAME: TERM the leader, then the whole session, then KILL
    local name=$1 sid pids
    sid=$(pid_of "$name")
    if ! session_alive "$sid"; then rm -f "$STATE/$name.pid"; return 0; fi
    log "stopping $name (session $sid)"
    # The leader first: `ray start --block` and `mlflow server` shut their children
    # down in order when they get SIGTERM; whatever is left gets TERM, then KILL.
    kill -TERM "$sid" 2>/dev/null || true
    wait_session_gone "$sid" $((STOP_TIMEOUT * 5 / 2)) && { rm -f "$STATE/$name.pid"; return 0; }
    pids=$(session_pids "$sid" || true)
    # shellcheck disable=SC2086
    [[ -n "$pids" ]] && kill -TERM $pids 2>/dev/null || true
    if ! wait_session_gone "$sid" $((STOP_TIMEOUT * 5 / 2)); then
        log "$name did not stop within ${STOP_TIMEOUT}s: SIGKILL"
        pids=$(session_pids "$sid" || true)
        # shellcheck disable=SC2086
        [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
        wait_session_gone "$sid" 25 || log "$name: processes of session $sid remain: $(session_pids "$sid" | xargs)"
    fi
    rm -f "$STATE/$name.pid"
}

wait_session_gone() {  # wait_session_gone SID TICKS (of 0.2 s)
    local _
    for _ in $(seq "$2"); do
        session_alive "$1" || return 0
        sleep 0.2
    done
    ! session_alive "$1"
}

start_session() {  # start_session NAME CMD...: run CMD in a new session, log to logs/NAME.log
    local name=$1; shift
    setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/$name.pid"
}

wait_until() {  # wait_until NAME CHECK...: poll CHECK until it succeeds or the service dies
    local name=$1; shift
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        running "$name" || die "$name exited while starting; see $STATE/logs/$name.log"
        ((SECONDS < deadline)) || die "$name did not answer within ${START_TIMEOUT}s; see $STATE/logs/$name.log"
        sleep 1
    done
}

# --- configuration -----------------------------------------------------------------
load_ports() {
    # shellcheck source=/dev/null
    [[ -f "$STATE/ports.env" ]] && source "$STATE/ports.env"
    RAY_PORT=${RAY_PORT:-${STACK_RAY_PORT:-6379}}
    DASHBOARD_PORT=${DASHBOARD_PORT:-${STACK_DASHBOARD_PORT:-8265}}
    CLIENT_PORT=${CLIENT_PORT:-${STACK_CLIENT_PORT:-10001}}
    AGENT_PORT=${AGENT_PORT:-${STACK_AGENT_PORT:-52365}}
    S3_PORT=${S3_PORT:-${STACK_S3_PORT:-9000}}
    MLFLOW_PORT=${MLFLOW_PORT:-${STACK_MLFLOW_PORT:-5000}}
    BUCKET=${BUCKET:-${STACK_BUCKET:-siamese}}
}

s3_url() { echo "http://$HOST:$S3_PORT"; }
token_file() { echo "$STATE/ray_auth_token"; }

port_free() { "$PY" -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null; }

http_ok() { curl -fsS --max-time 3 "$@" -o /dev/null; }
# Any HTTP answer at all (an unsigned S3 request gets 403). Not moto's data.json, which
# dumps every stored object and times out once the bucket holds data.
http_answers() { local code; code=$(curl -sS --max-time 3 -o /dev/null -w '%{http_code}' "$1" 2>/dev/null); [[ -n "$code" && "$code" != 000 ]]; }

# The environment a job (and the services themselves) needs; secrets come from the state dir.
job_env() {
    # shellcheck source=/dev/null
    source "$STATE/s3.env"
    cat <<EOF
export RAY_ADDRESS=$HOST:$RAY_PORT
export RAY_API_SERVER_ADDRESS=http://$HOST:$DASHBOARD_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$(token_file)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export AWS_REGION=$REGION
export AWS_ENDPOINT_URL=$(s3_url)
export AWS_EC2_METADATA_DISABLED=true
export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
export MLFLOW_DISABLE_TELEMETRY=true
export STACK_BUCKET=$BUCKET
EOF
}

# --- commands ----------------------------------------------------------------------
cmd_up() {
    [[ -x "$PY" ]] || die "no Python at $PY (run 'make venv' or set STACK_PYTHON)"
    [[ -x "$BIN/moto_server" ]] || die "moto_server not in $BIN: pip install -e '.[dev]'"
    mkdir -p "$STATE/logs"
    chmod 700 "$STATE"
    local up=0 name
    for name in "${SERVICES[@]}"; do running "$name" && up=$((up + 1)); done
    if ((up == ${#SERVICES[@]})); then log "already running"; cmd_status; return 0; fi
    ((up == 0)) || die "partly running; run '$0 down' first"
    rm -f "$STATE/ports.env"
    load_ports
    local port
    for port in "$RAY_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" "$AGENT_PORT" "$S3_PORT" "$MLFLOW_PORT"; do
        port_free "$port" || die "port $port on $HOST is taken (set STACK_*_PORT, see the header of $0)"
    done
    cat >"$STATE/ports.env" <<EOF
RAY_PORT=$RAY_PORT
DASHBOARD_PORT=$DASHBOARD_PORT
CLIENT_PORT=$CLIENT_PORT
AGENT_PORT=$AGENT_PORT
S3_PORT=$S3_PORT
MLFLOW_PORT=$MLFLOW_PORT
BUCKET=$BUCKET
EOF
    trap 'rc=$?; if ((rc != 0)); then log "up failed: stopping what it started"; cmd_down; fi' EXIT

    # 1. Object store. Authentication is on: the first 3 requests (unauthenticated) create
    #    an IAM user and its key; from then on every request must be signed with that key.
    log "starting moto_server on $(s3_url)"
    start_session s3 env INITIAL_NO_AUTH_ACTION_COUNT=3 AWS_EC2_METADATA_DISABLED=true \
        "$BIN/moto_server" -H "$HOST" -p "$S3_PORT"
    wait_until s3 http_ok "$(s3_url)/moto-api/data.json"
    (umask 077 && "$PY" - "$(s3_url)" "$BUCKET" "$REGION" >"$STATE/s3.env" <<'EOF'
import json, sys
import boto3
endpoint, bucket, region = sys.argv[1:]
iam = boto3.client("iam", endpoint_url=endpoint, region_name=region,
                   aws_access_key_id="setup", aws_secret_access_key="setup")
iam.create_user(UserName="stack")
iam.put_user_policy(UserName="stack", PolicyName="full-access", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="stack")["AccessKey"]
boto3.client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=key["AccessKeyId"],
             aws_secret_access_key=key["SecretAccessKey"]).create_bucket(Bucket=bucket)
print(f"AWS_ACCESS_KEY_ID={key['AccessKeyId']}\nAWS_SECRET_ACCESS_KEY={key['SecretAccessKey']}")
EOF
    )
    # Services and jobs get the same environment; the Ray head passes it to its workers,
    # like cluster nodes that carry their own credentials.
    # (Not RAY_ADDRESS: the head must not try to join itself.)
    local env_lines
    env_lines=$(job_env | sed 's/^export //' | grep -v -e '^RAY_ADDRESS=' -e '^RAY_API_SERVER_ADDRESS=')
    local -a stack_env
    mapfile -t stack_env <<<"$env_lines"

    # 2. Ray head with token authentication; the token is generated into the state dir
    #    (not ~/.ray/auth_token, which other clusters of this user may read).
    [[ -s "$(token_file)" ]] || (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$(token_file)")
    local ray_tmp="$STATE/ray" cpus
    # Ray's Unix sockets live under its temp dir and their paths must stay under 107 bytes.
    if ((${#ray_tmp} > 40)); then
        ray_tmp=$(mktemp -d "${TMPDIR:-/tmp}/raystk.XXXXXX")
        ln -sfn "$ray_tmp" "$STATE/ray"
    fi
    cpus=${STACK_RAY_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}
    log "starting Ray head on $HOST:$RAY_PORT (dashboard http://$HOST:$DASHBOARD_PORT, token auth)"
    # The venv's bin first on PATH: `python` in a submitted job's entrypoint is the
    # project's Python (jobs inherit the head's environment), as if started from an
    # activated virtual environment.
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray socket on loopback but also
    # refuses other nodes; multi-node mode lifts both.
    local multi_node=${STACK_MULTI_NODE:-0}
    [[ "$multi_node" == 0 || "$multi_node" == 1 ]] || die "STACK_MULTI_NODE must be 0 or 1"
    start_session ray env -u RAY_AUTH_TOKEN -u RAY_ADDRESS "${stack_env[@]}" \
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="$multi_node" RAY_worker_niceness=0 \
        PATH="$BIN:$PATH" VIRTUAL_ENV="$(dirname "$BIN")" \
        "$BIN/ray" start --head --block --disable-usage-stats --node-ip-address "$HOST" \
        --port "$RAY_PORT" --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" \
        --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
        --num-cpus "$cpus" --temp-dir "$ray_tmp"

    # 3. MLflow: sqlite metadata in the state dir, artifacts proxied into the bucket
    #    (clients talk HTTP only and need no S3 keys); one worker, no job runner.
    log "starting MLflow on http://$HOST:$MLFLOW_PORT (artifacts in s3://$BUCKET/mlartifacts)"
    start_session mlflow env "${stack_env[@]}" MLFLOW_S3_ENDPOINT_URL="$(s3_url)" \
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
        "$BIN/mlflow" server --backend-store-uri "sqlite:///$STATE/mlflow.db" \
        --artifacts-destination "s3://$BUCKET/mlartifacts" --host "$HOST" --port "$MLFLOW_PORT" --workers 1

    wait_until ray http_ok -H "Authorization: Bearer $(cat "$(token_file)")" "http://$HOST:$DASHBOARD_PORT/api/version"
    wait_until mlflow http_ok "http://$HOST:$MLFLOW_PORT/health"
    trap - EXIT
    log "up; load the environment with: eval \"\$($0 env)\""
    cmd_status
}

cmd_down() {
    local name
    for name in "${SERVICES[@]}"; do stop_session "$name"; done
    if [[ -L "$STATE/ray" ]]; then  # a Ray temp dir made under /tmp because $STATE was too long
        rm -rf "$(readlink "$STATE/ray")"
        rm -f "$STATE/ray"
    fi
    log "down (state kept in $STATE)"
}

cmd_env() {
    [[ -f "$STATE/ports.env" && -f "$STATE/s3.env" ]] || die "not up (no state in $STATE): run '$0 up'"
    load_ports
    job_env
}

cmd_status() {
    [[ -f "$STATE/ports.env" ]] || { echo "not started (no state in $STATE)"; return 1; }
    load_ports
    local ok=0 token=""
    [[ -s "$(token_file)" ]] && token=$(cat "$(token_file)")
    check() {  # check NAME URL PROBE...
        local name=$1 url=$2; shift 2
        local state=stopped
        if running "$name"; then
            if "$@" >/dev/null 2>&1; then state=answering; else state="running, not answering"; ok=1; fi
        else ok=1; fi
        printf '%-7s %-24s session %-8s %s\n' "$name" "$state" "$(pid_of "$name" || true)" "$url"
    }
    check ray "$HOST:$RAY_PORT dashboard http://$HOST:$DASHBOARD_PORT" \
        http_ok -H "Authorization: Bearer $token" "http://$HOST:$DASHBOARD_PORT/api/version"
    check s3 "$(s3_url) bucket s3://$BUCKET" http_answers "$(s3_url)/"
    check mlflow "http://$HOST:$MLFLOW_PORT" http_ok "http://$HOST:$MLFLOW_PORT/health"
    echo "state: $STATE (logs in $STATE/logs)"
    return $ok
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    env) cmd_env ;;
    status) cmd_status ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
