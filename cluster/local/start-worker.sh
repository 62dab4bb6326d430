#!/usr/bin/env bash
# Join this machine to a running medvl Ray cluster as a worker node.
#
#   cluster/local/start-worker.sh HEAD_HOST:6379 [--num-cpus N] [--num-gpus N] [-- EXTRA `ray start` ARGS]
#
# Every node needs the same Python environment as the head (same ray/torch/medvl versions: ./dev setup on a
# checkout at the same path, or the same image) and must see the shared storage (corpora, MEDVL_RUN_ROOT) at the
# same path as the head. RAY_AUTH_MODE must match the head's: `token` when RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH
# (the head's token, e.g. the file start-head.sh printed, copied here) is set, else `disabled`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

case "${1:-}" in -h|--help) sed -n '2,9p' "$0"; exit 0 ;; esac
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: start-worker.sh HEAD_HOST:PORT [--num-cpus N] [--num-gpus N] [-- extra ray start args]" >&2
  exit 2
fi
HEAD="$1"; shift
case "$HEAD" in *:*) ;; *) HEAD="$HEAD:6379" ;; esac

RAY_BIN="${RAY:-$ROOT/.venv/bin/ray}"
if [ ! -x "$RAY_BIN" ]; then
  RAY_BIN="$(command -v ray || true)"
  [ -n "$RAY_BIN" ] || { echo "start-worker.sh: no ray CLI (run ./dev setup, or set RAY=/path/to/ray)" >&2; exit 2; }
fi
export PATH="$(dirname "$RAY_BIN"):$PATH"   # Ray workers spawned here use this interpreter
if [ -z "${RAY_AUTH_MODE:-}" ]; then
  if [ -n "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ]; then RAY_AUTH_MODE=token; else RAY_AUTH_MODE=disabled; fi
fi
export RAY_AUTH_MODE
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  echo "start-worker.sh: RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN_PATH to a copy of the head's token file" >&2
  exit 2
fi

NUM_CPUS=""
NUM_GPUS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --num-cpus) NUM_CPUS="$2"; shift 2 ;;
    --num-gpus) NUM_GPUS="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "start-worker.sh: unknown option $1 (extra ray start options go after --)" >&2; exit 2 ;;
  esac
done

args=(start --address "$HEAD" --disable-usage-stats)
[ -n "$NUM_CPUS" ] && args+=(--num-cpus "$NUM_CPUS")
[ -n "$NUM_GPUS" ] && args+=(--num-gpus "$NUM_GPUS")
args+=("$@")

echo "[start-worker] RAY_AUTH_MODE=$RAY_AUTH_MODE $RAY_BIN ${args[*]}"
"$RAY_BIN" "${args[@]}"
