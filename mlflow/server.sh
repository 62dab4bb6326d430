#!/usr/bin/env bash
# Start the medvl MLflow tracking server (UI + REST API + proxied artifact store). See mlflow/README.md.
#
#   mlflow/server.sh                         # http://127.0.0.1:5000, SQLite + local artifacts under runs/
#   MLFLOW_PORT=5001 mlflow/server.sh        # another port
#   mlflow/server.sh --expose-prometheus /tmp/prom   # extra args go to `mlflow server` unchanged
#
# Environment (all optional):
#   MEDVL_MLFLOW_DIR              data dir for the default stores (default: $MEDVL_RUN_ROOT, else <repo>/runs,
#                                 i.e. the same SQLite file `medvl train` logs to when no tracking URI is set)
#   MLFLOW_BACKEND_STORE_URI      default sqlite:///$MEDVL_MLFLOW_DIR/mlflow.db; or postgresql://user:pw@host:5432/db
#   MLFLOW_ARTIFACTS_DESTINATION  default $MEDVL_MLFLOW_DIR/mlartifacts; or s3://bucket/prefix (needs boto3 +
#                                 AWS credentials on the server only; clients upload through the server)
#   MLFLOW_HOST / MLFLOW_PORT     bind address, default 127.0.0.1:5000 (0.0.0.0 to listen on all interfaces)
#   MLFLOW_WORKERS                uvicorn worker processes (mlflow's default: 4)
#   MLFLOW_ALLOWED_HOSTS          --allowed-hosts, e.g. "mlflow.example.org,mlflow.example.org:443" (ingress DNS)
#   MLFLOW_CORS_ALLOWED_ORIGINS   --cors-allowed-origins
#   MLFLOW_AUTH=1                 basic auth (--app-name basic-auth); needs MLFLOW_FLASK_SERVER_SECRET_KEY and, on
#                                 the first start, MLFLOW_AUTH_ADMIN_PASSWORD (or admin_password in the auth ini)
#   MLFLOW_AUTH_CONFIG_PATH       auth ini (see mlflow/auth.ini.example); default: generated once as
#                                 $MEDVL_MLFLOW_DIR/basic_auth.ini with its user DB next to it
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  default false here: no GenAI job runner + huey consumers (8 processes);
#                                 set true for MLflow's server-side jobs (LLM judges/online scoring)
#   MLFLOW_BIN                    the mlflow executable (default: <repo>/.venv/bin/mlflow, else mlflow on PATH)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ -n "${MLFLOW_BIN:-}" ]; then
  MLFLOW=("$MLFLOW_BIN")
elif [ -x "$REPO/.venv/bin/mlflow" ]; then
  MLFLOW=("$REPO/.venv/bin/mlflow")
elif command -v mlflow >/dev/null 2>&1; then
  MLFLOW=(mlflow)
else
  echo "mlflow/server.sh: no mlflow found (run ./dev setup, or set MLFLOW_BIN)" >&2
  exit 1
fi

DATA_DIR="${MEDVL_MLFLOW_DIR:-${MEDVL_RUN_ROOT:-$REPO/runs}}"
mkdir -p "$DATA_DIR"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"

BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$DATA_DIR/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$DATA_DIR/mlartifacts}"
case "$ARTIFACTS" in
  *://*) ;;                                   # s3://, gs://, wasbs://, file://, ...
  *) mkdir -p "$ARTIFACTS" ;;
esac
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"

ARGS=(server
  --backend-store-uri "$BACKEND"
  --artifacts-destination "$ARTIFACTS"
  --host "$HOST"
  --port "$PORT")
[ -n "${MLFLOW_WORKERS:-}" ] && ARGS+=(--workers "$MLFLOW_WORKERS")
[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ] && ARGS+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
[ -n "${MLFLOW_CORS_ALLOWED_ORIGINS:-}" ] && ARGS+=(--cors-allowed-origins "$MLFLOW_CORS_ALLOWED_ORIGINS")

if [ "${MLFLOW_AUTH:-0}" = 1 ] || [ "${MLFLOW_AUTH:-0}" = true ]; then
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    echo "mlflow/server.sh: MLFLOW_AUTH=1 needs MLFLOW_FLASK_SERVER_SECRET_KEY (e.g. \$(openssl rand -hex 32)," \
         "the same value on every replica)" >&2
    exit 2
  fi
  if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
    MLFLOW_AUTH_CONFIG_PATH="$DATA_DIR/basic_auth.ini"
    if [ ! -f "$MLFLOW_AUTH_CONFIG_PATH" ]; then
      cat > "$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = sqlite:///$DATA_DIR/basic_auth.db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
# admin_password: taken from MLFLOW_AUTH_ADMIN_PASSWORD on the first start (never stored here)
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    fi
  fi
  export MLFLOW_AUTH_CONFIG_PATH
  ARGS+=(--app-name basic-auth)
fi

SHOWN_BACKEND="$(printf %s "$BACKEND" | sed -E 's#://([^:/@]*):[^@]*@#://\1:***@#')"   # hide a DB password
echo "mlflow/server.sh: backend=$SHOWN_BACKEND artifacts=$ARTIFACTS url=http://$HOST:$PORT" >&2
exec "${MLFLOW[@]}" "${ARGS[@]}" "$@"
