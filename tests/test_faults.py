"""Faults that must not cost a run: non-finite losses, MLflow outages (the durable metric journal), credentials in
the wrong place, leaked per-run actors.

    .venv/bin/python -m pytest tests/test_faults.py -m "not slow"   # unit level, seconds
    .venv/bin/python -m pytest tests/test_faults.py                 # + a real 2-worker run whose loss goes NaN

The long end-to-end faults have their own modules: tests/test_tracking_outage.py (a real MLflow server stopped for
60 s mid-run, the driver killed, a password in the tracking URI) and tests/test_cluster_faults.py (token auth on a
real two-node cluster that loses a node during a submitted sweep). Bad input: tests/test_bad_input.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medvl.config import ConfigError, load_recipe
from medvl.redact import (default_ray_auth_mode, is_secret_key, redact_text, redact_uri, strip_credentials,
                          uri_secret)
from medvl.track.buffer import JournalLogger, MetricJournal
from medvl.train.faults import NonFiniteGuard
from medvl.train.step import StepSettings, train_step

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- non-finite steps (no Ray)


class _Toy:
    """A method stand-in: linear model, squared loss, NaN when asked."""
    feature_keys: tuple = ()
    global_keys: tuple = ()

    def __init__(self):
        self.nan = False
        self.after = 0

    def forward(self, model, batch):
        return {"y": model(batch["x"])}

    def loss(self, out):
        loss = (out["y"] ** 2).mean()
        return {"loss": loss * float("nan") if self.nan else loss}

    def after_step(self, model):
        self.after += 1


def _toy_setup(grad_clip=1.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched, StepSettings(grad_clip=grad_clip)


@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_nonfinite_step_changes_nothing(grad_clip):
    method, batch = _Toy(), {"x": torch.randn(8, 4)}
    model, opt, sched, s = _toy_setup(grad_clip)
    train_step(method, model, batch, opt, sched, s)  # one real step: optimizer state exists
    before = [p.detach().clone() for p in model.parameters()]
    lr, epoch, astep = opt.param_groups[0]["lr"], sched.last_epoch, opt.state[model.weight]["step"].clone()
    method.nan = True
    rep = train_step(method, model, batch, opt, sched, s)
    assert rep.skipped and torch.isnan(rep["loss"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "weights moved on a NaN step"
    assert sched.last_epoch == epoch and opt.param_groups[0]["lr"] == lr, "the LR schedule advanced"
    assert torch.equal(opt.state[model.weight]["step"], astep), "AdamW counted the step"
    assert method.after == 1 and all(p.grad is None for p in model.parameters())
    method.nan = False
    rep = train_step(method, model, batch, opt, sched, s)
    assert not rep.skipped and sched.last_epoch == epoch + 1 and method.after == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_nonfinite_loss_under_a_grad_scaler_skips_and_the_scaler_goes_on():
    """fp16 path (GradScaler; its CPU variant runs the same bookkeeping): the skip closes the scaler's unscale_ with
    update(), which lowers the scale, and the next step works."""
    method, batch = _Toy(), {"x": torch.randn(8, 4)}
    model, opt, sched, s = _toy_setup(1.0)
    scaler = torch.amp.GradScaler("cpu")
    assert not train_step(method, model, batch, opt, sched, s, scaler).skipped
    scale, before = scaler.get_scale(), model.weight.detach().clone()
    method.nan = True
    assert train_step(method, model, batch, opt, sched, s, scaler).skipped
    assert torch.equal(before, model.weight) and scaler.get_scale() == scale / 2
    method.nan = False
    assert not train_step(method, model, batch, opt, sched, s, scaler).skipped
    assert not torch.equal(before, model.weight)


def test_inf_gradient_with_finite_loss_is_skipped_when_clipping():
    method, batch = _Toy(), {"x": torch.randn(8, 4)}
    model, opt, sched, s = _toy_setup(1.0)
    model.weight.register_hook(lambda g: g * float("inf"))
    before = model.weight.detach().clone()
    rep = train_step(method, model, batch, opt, sched, s)
    assert torch.isfinite(rep["loss"]) and rep.skipped and torch.equal(before, model.weight)


def test_accumulated_step_is_skipped_when_one_micro_batch_is_nan():
    class Half(_Toy):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def loss(self, out):
            self.calls += 1
            loss = (out["y"] ** 2).mean()
            return {"loss": loss * float("nan") if self.calls == 2 else loss}

    method, batch = Half(), {"x": torch.randn(8, 4)}
    model, opt, sched, _ = _toy_setup()
    before = model.weight.detach().clone()
    rep = train_step(method, model, batch, opt, sched, StepSettings(accum_freq=2))
    assert rep.skipped and torch.equal(before, model.weight) and sched.last_epoch == 0


def test_guard_counts_and_stops_after_the_allowed_run():
    g = NonFiniteGuard(max_in_a_row=3)
    seq = [False, True, True, False, True, True, True]
    assert [g.update(x, i + 1) for i, x in enumerate(seq)] == [False] * 7
    assert g.total == 5 and g.in_a_row == 3
    assert g.update(True, 8) is True  # the 4th in a row
    assert "4 steps in a row (5-8)" in g.reason(8) and "6 non-finite steps in all" in g.reason(8)
    assert NonFiniteGuard(0).update(True, 1) is True  # 0: the first one stops


def test_max_nonfinite_steps_is_validated():
    with pytest.raises(ConfigError, match=r"train\.max_nonfinite_steps must be >= 0"):
        load_recipe(data={"data": {"corpus": "x"}, "train": {"max_nonfinite_steps": -1}})


# --------------------------------------------------------------------------- credentials


PASSWORD = "Pw-0f-the-test!"


def test_redaction_of_uris_keys_and_text(monkeypatch):
    uri = f"http://alice:{PASSWORD}@mlflow.internal:5000/"
    assert uri_secret(uri) == PASSWORD
    assert redact_uri(uri) == "http://alice:***@mlflow.internal:5000/"
    assert strip_credentials(uri) == "http://mlflow.internal:5000/"
    assert redact_uri("https://h/x?sig=1&token=abc") == "https://h/x?sig=1&token=***"
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    for k in ("hf_token", "db.password", "AWS_SECRET_ACCESS_KEY", "api_key", "RAY_AUTH_TOKEN", "client_secret", "DB_PWD"):
        assert is_secret_key(k), k
    for k in ("max_tokens", "pad_token", "tokenizer", "text_key", "track.tracking_uri", "eval.templates", "PWD",
              "OLDPWD"):  # the shell's working directory is not a password (tracebacks showed ***/platform)
        assert not is_secret_key(k), k
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-token-value-123")
    msg = (f"API request to {uri}api/2.0/mlflow/runs/get failed; header Bearer ray-token-value-123; "
           f"pw {PASSWORD}")
    clean = redact_text(msg)
    assert PASSWORD not in clean and "ray-token-value-123" not in clean and "alice:***@" in clean


def test_a_recipe_holding_a_credential_is_refused():
    base = {"data": {"corpus": "x"}}
    with pytest.raises(ConfigError, match=r"track\.tracking_uri: holds a credential; credentials come from the "
                                          r"environment only"):
        load_recipe(data={**base, "track": {"tracking_uri": f"http://u:{PASSWORD}@h:5000"}})
    load_recipe(data={**base, "track": {"tracking_uri": "http://h:5000"}})  # no credential: fine


def test_ray_auth_mode_follows_the_token():
    assert default_ray_auth_mode({}) == "disabled"
    assert default_ray_auth_mode({"RAY_AUTH_TOKEN": "t"}) == "token"
    assert default_ray_auth_mode({"RAY_AUTH_TOKEN_PATH": "/x"}) == "token"
    assert default_ray_auth_mode({"RAY_AUTH_TOKEN": "t", "RAY_AUTH_MODE": "disabled"}) == "disabled"


def test_submit_never_sends_credentials(monkeypatch, tmp_path):
    from medvl.submit import SubmitError, plan_job
    monkeypatch.chdir(ROOT)
    env = {"MLFLOW_TRACKING_URI": f"http://alice:{PASSWORD}@mlflow.internal:5000", "RAY_AUTH_TOKEN": "tok-123456"}
    plan = plan_job("jobs/digits_clip.yaml", [f"data.corpus={tmp_path}"], environ=env, submission_id="s")
    shown = json.dumps(plan.runtime_env) + plan.entrypoint + json.dumps(plan.metadata)
    assert PASSWORD not in shown and "tok-123456" not in shown
    assert plan.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert any("carries a password: it is NOT sent with the job" in n for n in plan.notes)
    assert all(PASSWORD not in n for n in plan.notes)
    with pytest.raises(SubmitError, match=r"--env HF_TOKEN=\.\.\.: credentials are not sent with a job"):
        plan_job("jobs/digits_clip.yaml", [f"data.corpus={tmp_path}"], environ={}, extra_env={"HF_TOKEN": "x"})


# --------------------------------------------------------------------------- the metric journal (no server)


def _sqlite(tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("j", artifact_location=(tmp_path / "art").as_uri())
    return uri, client, client.create_run(exp).info.run_id


def _points(client, run_id, key):
    return sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))


def test_journal_delivers_each_point_once_and_survives_a_torn_line(tmp_path):
    from medvl.track.buffer import make_sender
    uri, client, run_id = _sqlite(tmp_path)
    j = MetricJournal(tmp_path / "run" / "metrics.jsonl")
    for step in range(1, 6):
        j.append(run_id, {"train/loss": 1.0 / step, "train/lr": 0.1}, step, timestamp_ms=1000 + step)
    j.close()
    with open(j.path, "ab") as f:  # a writer killed mid-line
        f.write(b'{"r": "x", "s": 9, "t"')
    j2 = MetricJournal(j.path)
    j2.append(run_id, {"train/loss": 0.1}, 6, timestamp_ms=1006)  # the next writer ends the fragment first
    send = make_sender(uri)
    assert j2.deliver(send) == 11 and j2.pending_bytes() == 0
    assert [p[0] for p in _points(client, run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    # a crash between MLflow's acknowledgement and the cursor write: the same lines go again, MLflow keeps one
    j2.cursor_path.write_text("0")
    assert j2.deliver(send) == 11
    assert len(_points(client, run_id, "train/loss")) == 6 and len(_points(client, run_id, "train/lr")) == 5


def test_logger_buffers_through_an_outage_warns_once_and_delivers_everything(tmp_path, capfd):
    import threading
    import time

    from medvl.track.buffer import make_sender
    uri, client, run_id = _sqlite(tmp_path)
    real = make_sender(uri)
    down = threading.Event()
    down.set()
    calls = {"failed": 0}

    def flaky(rid, metrics):
        if down.is_set():
            calls["failed"] += 1
            raise ConnectionError("Connection refused (test outage)")
        real(rid, metrics)

    logger = JournalLogger(uri, run_id, journal=tmp_path / "run" / "metrics.jsonl", max_backoff_s=0.2,
                           min_interval_s=0.05)
    logger._send = flaky
    for step in range(1, 31):
        logger.log({"train/loss": float(step)}, step)
        time.sleep(0.01)
    assert logger.flush(timeout=2.0) is False  # durable, not delivered, and flush does not wait on an outage
    assert calls["failed"] >= 2 and logger.journal.pending_bytes() > 0
    assert _points(client, run_id, "train/loss") == []
    down.clear()
    assert logger.close(timeout=20) is True
    assert [p[0] for p in _points(client, run_id, "train/loss")] == list(range(1, 31))
    err = capfd.readouterr().err
    assert err.count("is unreachable") == 1 and "reachable again after" in err
    assert len(logger.outages) == 1


def test_logger_coalesces_deliveries_and_flush_does_not_wait_for_the_interval(tmp_path):
    """While training logs, the delivery thread calls MLflow at most once per interval (each call is milliseconds
    of Python that would take the GIL from the training thread after every window); a flush delivers at once."""
    import time

    from medvl.track.buffer import make_sender
    uri, client, run_id = _sqlite(tmp_path)
    real = make_sender(uri)
    calls = []

    def counting(rid, metrics):
        calls.append(len(metrics))
        real(rid, metrics)

    logger = JournalLogger(uri, run_id, journal=tmp_path / "run" / "metrics.jsonl", min_interval_s=30.0)
    logger._send = counting
    for step in range(1, 21):
        logger.log({"train/loss": float(step)}, step)
        time.sleep(0.02)
    assert len(calls) <= 1  # the first window goes at once, the next ones wait for the interval
    t0 = time.monotonic()
    assert logger.flush(timeout=10.0) is True
    assert time.monotonic() - t0 < 10.0 and len(calls) <= 2 and sum(calls) == 20
    logger.log({"train/loss": 21.0}, 21)
    assert logger.close(timeout=10.0) is True
    assert [p[0] for p in _points(client, run_id, "train/loss")] == list(range(1, 22))

    # interval 0: one delivery per logged window (the behaviour before coalescing), for contrast
    calls.clear()
    eager = JournalLogger(uri, run_id, journal=tmp_path / "run2" / "metrics.jsonl", min_interval_s=0.0)
    eager._send = counting
    for step in range(1, 11):
        eager.log({"train/acc": float(step)}, step)
        time.sleep(0.2)
    assert eager.close(timeout=10.0) is True and len(calls) >= 5 and sum(calls) == 10


# --------------------------------------------------------------------------- a real run whose loss goes NaN


def _nan_recipe(corpus: str, trace: Path):
    return load_recipe(data={
        "name": "nan-run", "plugins": ["medvl_test_plugins"],
        "data": {"corpus": corpus, "batch_size": 32, "shuffle_buffer": 0, "val_split": None},
        "model": {"name": "test-vit-micro"},
        "train": {"epochs": 1, "num_workers": 2, "log_every": 1, "ckpt_every": 5, "max_failures": 2,
                  "max_nonfinite_steps": 3},
        "track": {"experiment": "faults", "log_model": False},
        # rank 1 alone goes NaN on steps 3 and 4 (every rank must skip them), then every step from 12 on
        "test_nan_loss": {"steps": [3, 4], "from_step": 12, "ranks": [1], "trace_dir": str(trace)},
    })


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_nan_steps_are_skipped_on_every_rank_then_the_run_stops_keeping_the_last_checkpoint(
        ray_local, digits_corpus, run_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from medvl.track import runs
    from medvl.train.faults import TrainingAborted
    from medvl.train.launcher import run_training
    trace = tmp_path / "trace"
    recipe = _nan_recipe(digits_corpus, trace)
    with pytest.raises(TrainingAborted) as e:
        run_training(recipe)
    msg = str(e.value)
    assert "4 steps in a row (12-15) had a non-finite loss" in msg and "6 non-finite steps in all" in msg
    ckpt_dir = Path(run_root) / "ray" / "nan-run" / "checkpoint_step=0000010"
    assert f"the last good checkpoint (step 10) is kept in {ckpt_dir}" in msg
    assert (ckpt_dir / "state.pt").is_file()
    assert not (Path(run_root) / "ray" / "nan-run" / "checkpoint_step=0000015").exists()

    # every rank saw the same weights before every step: rank 1's NaN made rank 0 skip too
    ranks = [[json.loads(ln) for ln in (trace / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [x["step"] for x in ranks[0]] == list(range(1, 16)) and ranks[0] == ranks[1]
    sums = {x["step"]: x["checksum"] for x in ranks[0]}
    assert sums[3] == sums[4] == sums[5] != sums[6], "a skipped step changed the weights"
    assert sums[12] == sums[13] == sums[14] == sums[15] != sums[11]

    client = MlflowClient(runs.tracking_uri(recipe))
    run = client.get_run((Path(run_root) / "jobs" / "nan-run" / runs.RUN_ID_FILE).read_text().strip())
    assert run.info.status == "FAILED" and "4 steps in a row (12-15)" in run.data.tags["medvl.end_reason"]
    counted = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/nonfinite_steps")}
    assert counted[2] == 0 and counted[3] == 1 and counted[4] == 2 and counted[11] == 2 and counted[15] == 6
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert losses and all(m.value == m.value for m in losses), "a NaN loss reached the logged curve"
    assert {m.step for m in losses}.isdisjoint({3, 4, 12, 13, 14, 15})  # windows of skipped steps only: no point

    import ray
    left = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("medvl-skips-")]
    assert left == [], f"skip-counter actors survived the run: {left}"


# --------------------------------------------------------------------------- the run's start and end during an outage


def test_an_unreachable_server_at_the_start_is_a_clear_error_and_starts_nothing(digits_corpus, tmp_path, monkeypatch):
    import time

    from medvl.track.runs import TrackingUnavailable
    from medvl.track.server import free_port
    from medvl.train.launcher import prepare_job
    port = free_port()  # nothing listens there
    monkeypatch.setenv("MEDVL_RUN_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:{PASSWORD}@127.0.0.1:{port}")
    recipe = load_recipe(data={"name": "nostart", "data": {"corpus": digits_corpus}, "track": {"outage_wait_s": 2}})
    t0 = time.time()
    with pytest.raises(TrackingUnavailable) as e:
        prepare_job(recipe)
    assert time.time() - t0 < 30
    msg = str(e.value)
    assert msg.startswith(f"MLflow tracking server at http://bob:***@127.0.0.1:{port} did not answer within 2s "
                          f"(track.outage_wait_s) to start the run") and PASSWORD not in msg
    assert not (tmp_path / "runs" / "jobs" / "nostart" / "mlflow_run_id").exists()


def test_an_outage_at_the_end_defers_finalize_and_sync_metrics_completes_it(tmp_path, monkeypatch, capfd):
    from types import SimpleNamespace

    from medvl.track import runs
    from medvl.track.server import free_port
    from medvl.train.cli import sync_main
    from medvl.train.launcher import Job, finalize
    uri, client, run_id = _sqlite(tmp_path)
    run_dir = tmp_path / "runs" / "jobs" / "late"
    run_dir.mkdir(parents=True)
    (run_dir / runs.RUN_ID_FILE).write_text(run_id)
    recipe = load_recipe(data={"name": "late", "data": {"corpus": "x"},
                               "track": {"outage_wait_s": 1, "log_model": False, "tracking_uri": uri}})
    (run_dir / "recipe.yaml").write_text(runs.safe_yaml(recipe))
    MetricJournal(run_dir / "metrics.jsonl").append(run_id, {"train/loss": 0.5}, 7)  # buffered, never delivered
    dead = f"http://127.0.0.1:{free_port()}"
    job = Job(recipe, run_dir, tmp_path / "runs" / "ray", dead, run_id, 10, 10)
    result = SimpleNamespace(metrics={"step": 10, "epoch": 1}, checkpoint=None, return_value=None)
    assert finalize(job, result) == {"step": 10, "epoch": 1}  # training is kept: no exception
    pending = json.loads((run_dir / "finalize_pending.json").read_text())
    assert pending["status"] == "FINISHED" and pending["summary"] == {"step": 10, "epoch": 1}
    assert f"medvl sync-metrics {run_dir}" in capfd.readouterr().err
    assert client.get_run(run_id).info.status == "RUNNING"
    # the server is back (here: the store the recipe names): one command delivers and finishes
    assert sync_main([str(run_dir), "--wait", "5"]) == 0
    assert "delivered 1 buffered metrics" in capfd.readouterr().out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["medvl.step"] == "10"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(7, 0.5)]
    assert not (run_dir / "finalize_pending.json").exists()
