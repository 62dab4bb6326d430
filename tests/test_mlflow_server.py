"""A real MLflow tracking server (the `mlflow/server.sh` deployment and the `medvl.track.server` helper): runs,
params, metrics and proxied artifacts logged over HTTP and read back with `MlflowClient`."""
from __future__ import annotations

import contextlib
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from medvl.track.server import free_port, server_command, start_server, stop_server, wait_until_healthy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SERVER_SH = REPO / "mlflow" / "server.sh"
START_TIMEOUT = 120  # first start migrates a fresh SQLite DB; slow on a busy 2-core machine


@pytest.fixture(autouse=True)
def _no_ambient_tracking(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_AUTH",
                "MLFLOW_HOST", "MLFLOW_PORT", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MEDVL_MLFLOW_DIR", "MEDVL_RUN_ROOT"):
        monkeypatch.delenv(var, raising=False)


@contextlib.contextmanager
def tracking_uri(url: str):
    """Point the fluent `mlflow` API at `url`, restoring the previous global URI afterwards."""
    from mlflow.tracking._tracking_service import utils as tu
    prev, prev_env = tu._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(url)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(prev)
        if prev_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = prev_env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _log_demo_run(url: str, tmp: Path, experiment: str = "medvl-server-test") -> str:
    """A run as a training job logs it: params, a metric history, an artifact file, a tag."""
    note = tmp / "notes" / "config.yaml"
    note.parent.mkdir(parents=True, exist_ok=True)
    note.write_text("model: {name: test-vit-micro}\nlr: 0.001\n")
    with tracking_uri(url):
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name="roundtrip") as run:
            mlflow.log_params({"lr": 0.001, "batch_size": 64, "model": "test-vit-micro"})
            for step in range(5):
                mlflow.log_metric("train/loss", 2.0 / (step + 1), step=step)
            mlflow.log_metric("eval/zeroshot_top1", 0.5, step=4)
            mlflow.log_artifact(str(note), artifact_path="config")
            mlflow.set_tag("medvl.method", "clip")
        return run.info.run_id


def _check_demo_run(url: str, run_id: str, tmp: Path, experiment: str = "medvl-server-test") -> None:
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string="params.model = 'test-vit-micro'")
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.001", "batch_size": "64", "model": "test-vit-micro"}
    assert run.data.tags["medvl.method"] == "clip"
    assert run.data.metrics["train/loss"] == pytest.approx(0.4)
    hist = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [0, 1, 2, 3, 4]
    assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx([2.0, 1.0, 2 / 3, 0.5, 0.4])
    # artifacts go through the server's proxy (clients need no store credentials)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    top = client.list_artifacts(run_id)
    assert [(a.path, a.is_dir) for a in top] == [("config", True)]
    files = client.list_artifacts(run_id, "config")
    assert [a.path for a in files] == ["config/config.yaml"]
    local = client.download_artifacts(run_id, "config/config.yaml", str(tmp / "dl"))
    assert Path(local).read_text().startswith("model: {name: test-vit-micro}")


def test_server_command_defaults(tmp_path):
    cmd = server_command(tmp_path, 5123)
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path.resolve() / "mlartifacts")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5123"
    assert "--app-name" not in cmd
    pg = server_command(tmp_path, 1, backend_store_uri="postgresql://u:p@db:5432/mlflow",
                        artifacts_destination="s3://bucket/medvl", auth=True)
    assert "postgresql://u:p@db:5432/mlflow" in pg and "s3://bucket/medvl" in pg
    assert pg[pg.index("--app-name") + 1] == "basic-auth"


@pytest.mark.timeout(180)
def test_helper_server_roundtrip_and_restart(tmp_path):
    work = tmp_path / "server"
    url, proc = start_server(work, timeout=START_TIMEOUT)
    try:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            assert r.status == 200
        run_id = _log_demo_run(url, tmp_path)
        _check_demo_run(url, run_id, tmp_path)
        # stores live in the workdir: SQLite DB + proxied artifacts on local disk
        assert (work / "mlflow.db").is_file()
        stored = list((work / "mlartifacts").rglob("config.yaml"))
        assert len(stored) == 1 and run_id in stored[0].parts
    finally:
        stop_server(proc)
    assert proc.poll() is not None
    assert not _group_alive(proc.pid), "server workers left behind"
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"{url}/health", timeout=3)
    stop_server(proc)  # idempotent

    # a restarted server on the same stores serves the same run
    url2, proc2 = start_server(work, timeout=START_TIMEOUT)
    try:
        _check_demo_run(url2, run_id, tmp_path / "again")
    finally:
        stop_server(proc2)


@pytest.mark.timeout(180)
def test_server_sh_deployment(tmp_path):
    data = tmp_path / "mlflow-data"
    port = free_port()
    env = dict(os.environ, MEDVL_MLFLOW_DIR=str(data), MLFLOW_PORT=str(port), MLFLOW_WORKERS="1")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:  # cwd elsewhere: the script must not depend on it
        proc = subprocess.Popen(["bash", str(SERVER_SH)], cwd=str(tmp_path), env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, timeout=START_TIMEOUT, log_path=log)
        run_id = _log_demo_run(url, tmp_path, experiment="medvl-server-sh")
        _check_demo_run(url, run_id, tmp_path, experiment="medvl-server-sh")
        assert (data / "mlflow.db").is_file()
        assert len(list((data / "mlartifacts").rglob("config.yaml"))) == 1
        text = log.read_text()
        assert f"sqlite:///{data.resolve()}/mlflow.db" in text  # the script's banner
        # the script uses the project's venv mlflow and binds to loopback by default
        # (server.sh execs mlflow, so proc.pid is the `mlflow server` process itself)
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")
        assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == str(port)
        if (REPO / ".venv" / "bin" / "mlflow").exists():
            assert str(REPO / ".venv" / "bin" / "mlflow") in argv
        ps = subprocess.run(["ps", "-ww", "-o", "args=", "-g", str(proc.pid)], capture_output=True, text=True).stdout
        assert "uvicorn" in ps and "huey" not in ps  # GenAI job runner off by default
    finally:
        stop_server(proc)
    assert not _group_alive(proc.pid)


def test_server_sh_auth_needs_secret_key(tmp_path):
    env = dict(os.environ, MEDVL_MLFLOW_DIR=str(tmp_path), MLFLOW_PORT=str(free_port()), MLFLOW_AUTH="1")
    env.pop("MLFLOW_FLASK_SERVER_SECRET_KEY", None)
    res = subprocess.run(["bash", str(SERVER_SH)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in res.stderr


@pytest.mark.timeout(180)
def test_server_sh_basic_auth(tmp_path, monkeypatch):
    data = tmp_path / "auth-data"
    port = free_port()
    password = "medvl-Test-passw0rd!"
    env = dict(os.environ, MEDVL_MLFLOW_DIR=str(data), MLFLOW_PORT=str(port), MLFLOW_WORKERS="1", MLFLOW_AUTH="1",
               MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret", MLFLOW_AUTH_ADMIN_PASSWORD=password)
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(SERVER_SH)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, timeout=START_TIMEOUT, log_path=log)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert e.value.code == 401
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        run_id = _log_demo_run(url, tmp_path, experiment="medvl-auth")
        _check_demo_run(url, run_id, tmp_path, experiment="medvl-auth")
        assert (data / "basic_auth.ini").is_file() and (data / "basic_auth.db").is_file()
        assert password not in (data / "basic_auth.ini").read_text()
    finally:
        stop_server(proc)
