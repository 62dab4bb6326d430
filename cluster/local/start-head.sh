#!/usr/bin/env bash
# Start the head node of a local (or on-prem, multi-machine) Ray cluster for medvl.
#
#   cluster/local/start-head.sh [--num-cpus N] [--num-gpus N] [--temp-dir DIR] [--port 6379]
#                               [--dashboard-host 127.0.0.1] [--dashboard-port 8265] [-- EXTRA `ray start` ARGS]
#
# Then submit with:  .venv/bin/medvl submit jobs/digits_clip.yaml --address http://127.0.0.1:8265
#
# Environment:
#   RAY            the ray CLI (default: .venv/bin/ray of this checkout, else `ray` on PATH)
#   RAY_AUTH_MODE  default `disabled`. Ray >= 2.59 turns token auth on for `ray start --head` when ~/.ray/auth_token
#                  exists (e.g. left by an earlier `ray.init()`), so it is set explicitly here. Use `token` (with
#                  RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) for a dashboard reachable from other machines.
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
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"

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
    --) shift; break ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "start-head.sh: unknown option $1 (extra ray start options go after --)" >&2; exit 2 ;;
  esac
done

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
MSG
