#!/usr/bin/env bash
# Start the head node of a local (or on-prem, multi-machine) Ray cluster for medvl.
#
#   cluster/local/start-head.sh [--num-cpus N] [--num-gpus N] [--temp-dir DIR] [--port 6379]
#                               [--dashboard-host 127.0.0.1] [--dashboard-port 8265] [--auth token|disabled]
#                               [--insecure] [-- EXTRA `ray start` ARGS]
#
# Then submit with:  .venv/bin/medvl submit jobs/digits_clip.yaml --address http://127.0.0.1:8265
#
# Security. The dashboard / Jobs API (which runs arbitrary code) binds to 127.0.0.1 unless --dashboard-host says
# otherwise. Binding it wider (--dashboard-host 0.0.0.0, for submitting from other machines) turns Ray token auth
# on: a token is generated once in $RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token) and the script prints what
# clients and worker machines need. --auth disabled with a wide dashboard is refused unless --insecure is given.
# Ray's GCS and raylet ports listen on all interfaces whatever these flags (Ray's behaviour): on a network you do
# not trust, use --auth token even on 127.0.0.1.
#
# Environment:
#   RAY            the ray CLI (default: .venv/bin/ray of this checkout, else `ray` on PATH)
#   RAY_AUTH_MODE  default: `disabled` for a loopback dashboard, `token` otherwise (--auth overrides). Ray >= 2.59
#                  turns token auth on for `ray start --head` when ~/.ray/auth_token exists (e.g. left by an earlier
#                  `ray.init()`), so it is always set explicitly here.
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH   the token (auth token mode); default file ~/.ray/auth_token
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

RAY_BIN="${RAY:-$ROOT/.venv/bin/ray}"
if [ ! -x "$RAY_BIN" ]; then
  RAY_BIN="$(command -v ray || true)"
  [ -n "$RAY_BIN" ] || { echo "start-head.sh: no ray CLI (run ./dev setup, or set RAY=/path/to/ray)" >&2; exit 2; }
fi
# A job's entrypoint (`python -m medvl.cli ...`) runs with the PATH of the Ray processes, so put the interpreter
# that has ray/torch/medvl installed (the one next to the ray CLI) first: then `python` on the cluster is that one.
export PATH="$(dirname "$RAY_BIN"):$PATH"
AUTH="${RAY_AUTH_MODE:-}"
INSECURE=""

cores="$(nproc 2>/dev/null || echo 2)"
# Logical CPUs above the core count leave room for Ray Data decode tasks, the Train controller and the job driver
# next to the train workers (torch thread counts are set per worker, so this does not oversubscribe cores).
NUM_CPUS=$(( cores * 2 > 4 ? cores * 2 : 4 ))
NUM_GPUS=""
TEMP_DIR=""
PORT=6379
DASH_HOST=127.0.0.1
DASH_PORT=8265
while [ $# -gt 0 ]; do
  case "$1" in
    --num-cpus) NUM_CPUS="$2"; shift 2 ;;
    --num-gpus) NUM_GPUS="$2"; shift 2 ;;
    --temp-dir) TEMP_DIR="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --dashboard-host) DASH_HOST="$2"; shift 2 ;;
    --dashboard-port) DASH_PORT="$2"; shift 2 ;;
    --auth) AUTH="$2"; shift 2 ;;
    --insecure) INSECURE=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "start-head.sh: unknown option $1 (extra ray start options go after --)" >&2; exit 2 ;;
  esac
done

case "$DASH_HOST" in 127.*|localhost|::1) WIDE="" ;; *) WIDE=1 ;; esac
if [ -z "$AUTH" ]; then AUTH=disabled; [ -n "$WIDE" ] && AUTH=token; fi
case "$AUTH" in token|disabled) ;; *) echo "start-head.sh: --auth must be token or disabled, not $AUTH" >&2; exit 2 ;; esac
if [ "$AUTH" = disabled ] && [ -n "$WIDE" ] && [ -z "$INSECURE" ]; then
  cat >&2 <<MSG
start-head.sh: refusing to serve the Jobs API on $DASH_HOST without authentication: anyone who can reach port
$DASH_PORT could run code on this machine. Use token auth (the default when binding wider):
    cluster/local/start-head.sh --dashboard-host $DASH_HOST --auth token
or pass --insecure if this network is yours alone.
MSG
  exit 2
fi
export RAY_AUTH_MODE="$AUTH"
TOKEN_NOTE=""
if [ "$AUTH" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
    ( umask 077; "$(dirname "$RAY_BIN")/python" -c 'import secrets; print(secrets.token_hex(32))' \
        > "$RAY_AUTH_TOKEN_PATH" 2>/dev/null || openssl rand -hex 32 > "$RAY_AUTH_TOKEN_PATH" )
    echo "[start-head] generated a Ray auth token in $RAY_AUTH_TOKEN_PATH"
  fi
  TOKEN_NOTE="export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH   # clients and worker machines (copy the file there)"
fi

args=(start --head --port "$PORT" --dashboard-host "$DASH_HOST" --dashboard-port "$DASH_PORT"
      --num-cpus "$NUM_CPUS" --disable-usage-stats)
[ -n "$NUM_GPUS" ] && args+=(--num-gpus "$NUM_GPUS")
if [ -n "$TEMP_DIR" ]; then
  mkdir -p "$TEMP_DIR"
  # absolute, and short: Ray's Unix sockets live under it (107-byte path limit)
  args+=(--temp-dir "$(cd "$TEMP_DIR" && pwd)")
fi
args+=("$@")

echo "[start-head] RAY_AUTH_MODE=$RAY_AUTH_MODE $RAY_BIN ${args[*]}"
"$RAY_BIN" "${args[@]}"

shown_host="$DASH_HOST"
[ "$shown_host" = "0.0.0.0" ] && shown_host="$(hostname -I 2>/dev/null | awk '{print $1}')"
cat <<MSG
[start-head] Ray head is up.
  Jobs API / dashboard : http://${shown_host}:${DASH_PORT}
  submit a recipe      : $ROOT/.venv/bin/medvl submit jobs/digits_clip.yaml --address http://${shown_host}:${DASH_PORT}
  add a worker machine : cluster/local/start-worker.sh <head-ip>:${PORT} [--num-cpus N] [--num-gpus N]
  stop                 : cluster/local/stop.sh${TEMP_DIR:+ --temp-dir $TEMP_DIR}
  auth                 : RAY_AUTH_MODE=$AUTH${TOKEN_NOTE:+
  token                : $TOKEN_NOTE}
MSG
