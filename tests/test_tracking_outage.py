"""A tracking-server outage and a killed driver, end to end: a real `medvl train` logging to a real MLflow server
with basic auth (the password in $MLFLOW_TRACKING_URI). The server is stopped for 30 s mid-run and restarted on
the same port and store; later the driver is killed (SIGKILL) and the same command is run again.

Checked: training never stops during the outage; every metric the trainer logged reaches MLflow exactly once (the
run's history equals its journal, no point twice); the same command resumes in the same MLflow run, which ends
FINISHED; the password is in no param, tag, artifact, file under the run root, or line the commands printed.
Measured (printed, for the README): outage -> metrics complete after the server is back; driver kill -> training
again.

    .venv/bin/python -m pytest tests/test_tracking_outage.py -s     # one slow test: ~4 min idle, 15 min loaded
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medvl.track.server import free_port, stop_server, wait_until_healthy

ROOT = Path(__file__).resolve().parents[1]
SERVER_SH = ROOT / "mlflow" / "server.sh"
PASSWORD = "Outage-Test-pw-7731"
OUTAGE_S = 30
EPOCHS = 4
TOTAL = EPOCHS * (1437 // 32)  # 176 steps


def _start_auth_server(data: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, MEDVL_MLFLOW_DIR=str(data), MLFLOW_PORT=str(port), MLFLOW_WORKERS="1", MLFLOW_AUTH="1",
               MLFLOW_FLASK_SERVER_SECRET_KEY="outage-test-secret", MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD)
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    with open(log, "ab") as out:
        proc = subprocess.Popen(["bash", str(SERVER_SH)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    wait_until_healthy(f"http://127.0.0.1:{port}", proc, timeout=180, log_path=log)
    return proc


def _train(recipe: Path, env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "medvl.cli", "train", str(recipe)], env=env, stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(ROOT))


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) while waiting for {what}:\n"
                                 f"{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{log.read_text()[-4000:] if log else ''}")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_outage_and_killed_driver_lose_no_metric_and_leak_no_password(digits_corpus, tmp_path):
    from mlflow.tracking import MlflowClient

    from medvl.track.buffer import MetricJournal
    from medvl.train.worker import latest_position
    port = free_port()
    data = tmp_path / "mlflow"
    server_log = tmp_path / "server.log"
    server = _start_auth_server(data, port, server_log)
    uri = f"http://admin:{PASSWORD}@127.0.0.1:{port}"
    client = MlflowClient(uri)
    run_root = tmp_path / "runs"
    pace = tmp_path / "pace"
    pace.write_text("1.0")  # <= 1 step/s whatever the load: the run outlasts the outage and the server restarts
    recipe = tmp_path / "outage.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "outage", "plugins": ["medvl_test_plugins"],
        "data": {"corpus": digits_corpus, "batch_size": 32, "val_split": None, "shuffle_buffer": 0},
        "model": {"name": "test-vit-micro"},
        "train": {"epochs": EPOCHS, "num_workers": 1, "log_every": 2, "ckpt_every": 10},
        "track": {"experiment": "outage", "outage_wait_s": 120},
        "test_pace": {"seconds_per_step": 1.0, "pace_file": str(pace)}}))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    env.update(MLFLOW_TRACKING_URI=uri, MEDVL_RUN_ROOT=str(run_root), RAY_AUTH_MODE="disabled",
               RAY_TMPDIR=f"/tmp/ray-outage-{os.getpid()}")
    run_dir = run_root / "jobs" / "outage"
    ckpts = run_root / "ray" / "outage"
    journal = MetricJournal(run_dir / "metrics.jsonl")
    log1, log2 = tmp_path / "train1.log", tmp_path / "train2.log"
    proc = _train(recipe, env, log1)
    try:
        # 1. training logs to MLflow
        run_id = _wait(lambda: (run_dir / "mlflow_run_id").exists() and (run_dir / "mlflow_run_id").read_text().strip(),
                       300, "the MLflow run", proc, log1)
        _wait(lambda: any(m.step >= 10 for m in client.get_metric_history(run_id, "train/loss")), 300,
              "metrics at step 10", proc, log1)

        # 2. the server goes away for 30 s; training goes on, the journal grows
        stop_server(server)
        t_down = time.time()
        step_down = (latest_position(ckpts) or {}).get("step", 0)
        time.sleep(OUTAGE_S)
        assert proc.poll() is None, f"training died during the outage:\n{log1.read_text()[-4000:]}"
        step_back = (latest_position(ckpts) or {}).get("step", 0)
        assert step_back >= step_down + 10, "training did not go on during the outage"
        assert journal.pending_bytes() > 0, "nothing was buffered while the server was down"

        # 3. the same server comes back (same port, same store): every buffered metric arrives
        server = _start_auth_server(data, port, server_log)
        t_up = time.time()

        def complete():
            want = {(r["s"], r["t"]) for r in journal.records() if "train/loss" in r["m"]}
            have = {(m.step, m.timestamp) for m in client.get_metric_history(run_id, "train/loss")}
            return journal.pending_bytes() == 0 and want and want <= have and time.time()
        t_complete = _wait(complete, 120, "the buffered metrics in MLflow", proc, log1)

        # 4. the rest at full speed; the driver dies near the end (a checkpoint within the last 32 steps), then the
        #    same command runs again
        pace.write_text("0.05")  # >= 1.6 s for the last 32 steps: the kill lands before the end
        _wait(lambda: (latest_position(ckpts) or {}).get("step", 0) >= TOTAL - 32, 600,
              "a checkpoint near the end", proc, log1)
        from test_resume import _descendants
        tree = _descendants(proc.pid)  # the driver and its embedded Ray die at once (else a surviving worker may
        for pid in [proc.pid] + tree:   # still register one more checkpoint after `ck` is read below)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        t_kill = time.time()
        proc.wait(30)
        ck = latest_position(ckpts)["step"]  # the checkpoint the re-run must resume from
        t_rerun = time.time()
        proc = _train(recipe, env, log2)
        assert proc.wait(600) == 0, f"the re-run failed:\n{log2.read_text()[-4000:]}"
        assert ck < TOTAL, "the first run had finished before the kill: nothing was resumed"

        # --- one run, resumed, FINISHED, and its history equals its journal (each point once, none lost)
        exp = client.get_experiment_by_name("outage")
        found = client.search_runs([exp.experiment_id])
        assert [r.info.run_id for r in found] == [run_id], "the re-run must continue the same MLflow run"
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        recs = journal.records()
        assert journal.pending_bytes() == 0
        for key in ("train/loss", "train/lr", "train/samples_per_s"):
            want = sorted((r["s"], r["t"], r["m"][key]) for r in recs if key in r["m"])
            have = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
            assert len(have) == len(set(have)), f"{key}: a point is in MLflow twice"
            assert [(s, t) for s, t, _ in have] == [(s, t) for s, t, _ in want], f"{key}: history != journal"
            assert all(abs(a[2] - b[2]) <= 1e-6 * max(1.0, abs(b[2])) for a, b in zip(have, want))
        steps = {m.step for m in client.get_metric_history(run_id, "train/loss")}
        assert set(range(2, TOTAL + 1, 2)) <= steps, "a logging step is missing"
        resumed = client.get_metric_history(run_id, "train/resumed_from_step")
        assert [int(m.value) for m in resumed] == [ck]
        t_training_again = resumed[0].timestamp / 1000
        # steps trained once (before the last checkpoint of the killed driver) are logged once
        once = [m.step for m in client.get_metric_history(run_id, "train/loss") if m.step <= ck]
        assert len(once) == len(set(once))

        # --- the password is nowhere medvl writes
        assert PASSWORD not in json.dumps(run.data.params) and PASSWORD not in json.dumps(run.data.tags)
        assert run.data.params["track.tracking_uri"] == "None"
        art = Path(client.download_artifacts(run_id, "config/recipe.yaml", str(tmp_path / "dl")))
        assert PASSWORD not in art.read_text()
        leaks = [str(p) for p in run_root.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
        assert leaks == [], f"the password was written to {leaks}"
        for log in (log1, log2):
            assert PASSWORD not in log.read_text(), f"{log.name} printed the password"
        assert f"MLflow at http://admin:***@127.0.0.1:{port} is unreachable" in log1.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_server(server)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)  # the driver's embedded Ray session files
    print(f"\n[measured] tracking outage {t_up - t_down:.0f}s: metrics complete {t_complete - t_up:.1f}s after the "
          f"server was back; driver killed at step {ck} -> training again {t_training_again - t_kill:.1f}s later "
          f"(re-run started {t_rerun - t_kill:.1f}s after the kill)")
