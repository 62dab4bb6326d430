"""Start/stop a real MLflow tracking server from Python (tests, the sweep browser test, local tooling).

Equivalent to `mlflow/server.sh`: `python -m mlflow server` with a SQLite backend store and a proxied artifact
store inside `workdir` (or the URIs given), bound to 127.0.0.1 on a free port, in its own process group so that
`stop_server` ends the server and all of its uvicorn workers together.

    url, proc = start_server(tmp_path)
    try:
        mlflow.set_tracking_uri(url)
        ...
    finally:
        stop_server(proc)
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Optional, Sequence

LOG_NAME = "mlflow-server.log"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports that are free right now (all held open while the OS picks, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def server_command(workdir: Path, port: int, host: str = "127.0.0.1", backend_store_uri: Optional[str] = None,
                   artifacts_destination: Optional[str] = None, workers: Optional[int] = 1,
                   auth: bool = False, extra_args: Sequence[str] = ()) -> list[str]:
    """The `mlflow server` argv (this interpreter's mlflow), defaults as in `mlflow/server.sh`."""
    workdir = Path(workdir).resolve()
    backend = backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    artifacts = artifacts_destination or str(workdir / "mlartifacts")
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", backend,
           "--artifacts-destination", artifacts,
           "--host", host, "--port", str(port)]
    if workers:
        cmd += ["--workers", str(workers)]
    if auth:
        cmd += ["--app-name", "basic-auth"]
    return cmd + list(extra_args)


def _log_tail(log_path: Optional[Path], n: int = 4000) -> str:
    if not log_path or not Path(log_path).exists():
        return ""
    text = Path(log_path).read_text(errors="replace")
    return text[-n:]


def wait_until_healthy(url: str, proc: Optional[subprocess.Popen] = None, timeout: float = 60,
                       log_path: Optional[Path] = None) -> None:
    """Poll `GET <url>/health` until it answers 200; raise if `proc` exits first or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_err: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before it was healthy\n"
                               f"{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
                last_err = f"HTTP {r.status}"
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last_err = e
        time.sleep(0.25)
    raise TimeoutError(f"mlflow server at {url} not healthy after {timeout:.0f}s (last: {last_err})\n"
                       f"{_log_tail(log_path)}")


def start_server(workdir: Path, port: Optional[int] = None, timeout: float = 60, *, host: str = "127.0.0.1",
                 backend_store_uri: Optional[str] = None, artifacts_destination: Optional[str] = None,
                 workers: Optional[int] = 1, auth: bool = False, env: Optional[Mapping[str, str]] = None,
                 extra_args: Sequence[str] = ()) -> tuple[str, subprocess.Popen]:
    """Start `mlflow server` with its stores in `workdir` and wait until `/health` answers 200.

    Returns `(url, proc)`, e.g. `("http://127.0.0.1:43817", <Popen>)`; the server log is `workdir/mlflow-server.log`.
    `port=None` picks a free port. `auth=True` runs the basic-auth app (set MLFLOW_FLASK_SERVER_SECRET_KEY,
    MLFLOW_AUTH_CONFIG_PATH and MLFLOW_AUTH_ADMIN_PASSWORD in `env`). `workers` defaults to 1 (mlflow's own
    default is 4, too many for a small test machine). Stop it with `stop_server(proc)`.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if artifacts_destination is None:
        (workdir / "mlartifacts").mkdir(exist_ok=True)
    port = port or free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1")
    cmd = server_command(workdir, port, host, backend_store_uri, artifacts_destination, workers, auth, extra_args)
    full_env = dict(os.environ)
    # MLflow's GenAI job runner (+7 huey consumers) is of no use for training runs; opt in via env
    full_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    full_env.update(env or {})
    log_path = workdir / LOG_NAME
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=str(workdir), env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    proc.medvl_log_path = log_path  # type: ignore[attr-defined]
    proc.medvl_pgid = proc.pid  # type: ignore[attr-defined]  # start_new_session: the server leads its group
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{client_host}:{port}"
    try:
        wait_until_healthy(url, proc, timeout, log_path)
    except BaseException:
        stop_server(proc)
        raise
    return url, proc


def stop_server(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop the server and everything in its process group (uvicorn workers, job runners): SIGTERM, then SIGKILL
    after `timeout` seconds. Safe to call twice. Needs a process started with `start_new_session=True` (as
    `start_server` does); otherwise only `proc` itself is signalled."""
    pgid = getattr(proc, "medvl_pgid", None)
    if pgid is None:
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            pgid = None
    own_group = pgid is not None and pgid == proc.pid and pgid != os.getpgrp()

    def _signal(sig: int) -> None:
        try:
            if own_group:
                os.killpg(pgid, sig)
            elif proc.poll() is None:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    _signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal(signal.SIGKILL)
        proc.wait(timeout=10)
    # workers may outlive the main process by a moment: make sure the group is gone
    if own_group:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            except PermissionError:  # pragma: no cover
                return
            time.sleep(0.2)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
