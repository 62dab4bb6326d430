#!/usr/bin/env bash
# Stop Ray on this machine.
#
#   cluster/local/stop.sh                   `ray stop`: ends EVERY Ray process of this machine (all clusters, also
#                                           embedded `ray.init()` ones of other runs)
#   cluster/local/stop.sh --temp-dir DIR    end only the cluster started with `start-head.sh --temp-dir DIR`:
#                                           the processes whose command line names DIR, and their children
#   cluster/local/stop.sh --force           SIGKILL instead of SIGTERM (either form)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RAY_BIN="${RAY:-$ROOT/.venv/bin/ray}"
[ -x "$RAY_BIN" ] || RAY_BIN="$(command -v ray || true)"
[ -n "$RAY_BIN" ] || { echo "stop.sh: no ray CLI (set RAY=/path/to/ray)" >&2; exit 2; }
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"

TEMP_DIR=""
FORCE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --temp-dir) TEMP_DIR="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "stop.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

if [ -z "$TEMP_DIR" ]; then
  exec "$RAY_BIN" stop ${FORCE:+--force}
fi

[ -d "$TEMP_DIR" ] || { echo "stop.sh: no such temp dir: $TEMP_DIR" >&2; exit 2; }
TEMP_DIR="$(cd "$TEMP_DIR" && pwd)"
# The python next to the ray CLI has ray (which bundles psutil).
PY="$(dirname "$RAY_BIN")/python"
[ -x "$PY" ] || PY=python3
exec "$PY" - "$TEMP_DIR" "${FORCE:-}" <<'PYEOF'
import sys

try:
    import psutil
except ImportError:  # ray ships psutil in ray/thirdparty_files and puts it on sys.path on import
    import ray  # noqa: F401
    import psutil

temp_dir, force = sys.argv[1], bool(sys.argv[2])
me = psutil.Process()
spare = {me.pid} | {p.pid for p in me.parents()}  # this script and the shell(s) that ran it


def names_temp_dir(cmdline):
    return any(a.endswith(temp_dir) or (temp_dir + "/") in a for a in cmdline or [])


roots = []
for p in psutil.process_iter(["pid", "cmdline"]):
    try:
        if p.pid not in spare and names_temp_dir(p.info["cmdline"]):
            roots.append(p)
    except psutil.Error:
        pass
procs = {p.pid: p for p in roots}
for p in roots:
    try:
        procs.update({c.pid: c for c in p.children(recursive=True)})
    except psutil.Error:
        pass
for pid in spare:
    procs.pop(pid, None)
for p in procs.values():
    try:
        p.kill() if force else p.terminate()
    except psutil.Error:
        pass
gone, alive = psutil.wait_procs(list(procs.values()), timeout=5)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
psutil.wait_procs(alive, timeout=3)
print(f"[stop] ended {len(procs)} Ray processes of the cluster in {temp_dir}")
PYEOF
