"""Sweeps (`medvl tune`): spec validation before any trial (fast, no Ray), the define-by-run search space, and
real sweeps on a local Ray (slow): parent + nested child runs, best params, Optuna plots, trials table, and an
interrupted sweep (SIGINT) that resumes with the trials it had.

    .venv/bin/python -m pytest tests/test_tune.py -m "not slow"     # validation only, seconds
    .venv/bin/python -m pytest tests/test_tune.py                   # + real sweeps, several minutes on 2 cores
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from medvl.config import ConfigError
from medvl.tune.spec import SweepError, load_sweep, validate_sweep

ROOT = Path(__file__).resolve().parents[1]
SMALL = str(ROOT / "jobs" / "sweep_digits_small.yaml")
SWEEPS = sorted(glob.glob(str(ROOT / "jobs" / "sweep_*.yaml")))


def _spec(corpus: str, *overrides: str, path: str = SMALL):
    return load_sweep(path, [f"data.corpus={corpus}", *overrides])


# --------------------------------------------------------------------------- fast: validation, no Ray


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", SWEEPS, ids=[Path(p).name for p in SWEEPS])
def test_every_sweep_spec_validates(path, digits_corpus):
    from test_config import corpus_overrides

    from medvl.tune.spec import is_pipeline_sweep
    recipe = validate_sweep(load_sweep(path, corpus_overrides(path, digits_corpus)))
    if is_pipeline_sweep(recipe):  # a sweep over a pipeline: its train stages read the corpus
        assert any(n.stage.config.data.corpus == digits_corpus for n in recipe.stages.values() if n.kind == "train")
    else:
        assert recipe.data.corpus == digits_corpus


@pytest.mark.timeout(60)
@pytest.mark.parametrize("override, message", [
    ("search_space.optim.lrr={type: uniform, low: 0.1, high: 0.2}", r"search_space\.optim\.lrr: unknown key optim\.lrr"),
    ("search_space.modell.x={type: uniform, low: 0.1, high: 0.2}", r"unknown key modell\.x"),
    ("search_space.optim.lr.low=0.1", r"search_space\.optim\.lr: empty range: low \(0\.1\) must be < high"),
    ("search_space.optim.warmup_steps.high=0", r"optim\.warmup_steps: empty range"),
    ("search_space.data.batch_size={type: choice, values: []}", r"data\.batch_size: empty choice"),
    ("search_space.optim.lr.low=0", r"loguniform needs low > 0"),
    ("search_space.optim.warmup_steps.type=uniform", r"warmup_steps is int \(use type: int\)"),
    ("search_space.optim.warmup_steps.low=2.5", r"warmup_steps is an integer: low/high must be integers"),
    ("search_space.optim.lr.type=int", r"type int needs an integer key, but optim\.lr is float"),
    ("search_space.loss.kind={type: choice, values: [clip, triplet]}", r"loss\.kind: must be one of"),
    ("search_space.data.batch_size={type: choice, values: [64, 0]}", r"data\.batch_size must be > 0"),
    ("search_space.eval.templates={type: choice, values: [a]}", r"only scalar keys can be searched"),
    ("search_space.train.num_workers={type: int, low: 1, high: 2}", r"set by the sweep itself"),
    ("search_space.train.launch={type: choice, values: [workers, in_process]}", r"set by the sweep itself"),
    ("search_space.loss.siglip_dist_impl={type: choice, values: [gather], when: {loss.kind: siglip}}",
     r"condition loss\.kind in \['siglip'\] is never true"),
    ("metric=val/accuracy", r"metric: the trainer never reports 'val/accuracy'"),
    ("metric=val/i2t_r3", r"never reports 'val/i2t_r3'"),
    ("scheduler.max_t=7", r"scheduler\.max_t \(7\) must equal the epochs a trial trains \(3\)"),
    ("scheduler.kind=pbt", r"scheduler\.kind: must be one of"),
    ("num_samples=0", r"num_samples must be >= 1"),
    ("bogus=1", r"unknown key bogus: neither a sweep key"),
    ("objectives=[{metric: trial/wall_s, mode: min}]", r"multi-objective sweep needs scheduler\.kind none"),
    ("share_stages=false", r"share_stages: false applies to pipeline sweeps only"),
    ("resources.workers=3", r"data\.batch_size \(64\) must be divisible by train\.num_workers \(3\)"),
])
def test_invalid_sweeps_fail_before_any_trial(digits_corpus, override, message):
    import ray
    t0 = time.time()
    with pytest.raises(SweepError, match=message):
        validate_sweep(_spec(digits_corpus, override))
    assert time.time() - t0 < 30 and not ray.is_initialized()


@pytest.mark.timeout(60)
def test_multi_objective_spec_pareto_front_and_plots(digits_corpus, tmp_path):
    """Extra objectives validate (reported or trial/wall_s, distinct); the Pareto front of a trials table is the
    non-dominated finished trials; the rebuilt study is multi-objective and its plots include the front."""
    import pandas as pd

    from medvl.tune.space import SearchSpace
    from medvl.tune.sweep import objectives
    from medvl.tune.tracking import pareto_ids, rebuild_study, save_plots
    ok = _spec(digits_corpus, "scheduler=none", "objectives=[{metric: trial/wall_s, mode: min}]")
    validate_sweep(ok)
    assert objectives(ok) == (["val/zero_shot_accuracy", "trial/wall_s"], ["max", "min"])
    for ov, msg in [("objectives=[{metric: val/nope, mode: min}]", r"objectives\[0\]\.metric: trials never report"),
                    ("objectives=[{metric: val/zero_shot_accuracy}]", r"already an objective"),
                    ("objectives=[{metric: trial/wall_s, mode: low}]", r"mode")]:
        with pytest.raises(SweepError, match=msg):
            validate_sweep(_spec(digits_corpus, "scheduler=none", ov))
    metrics, modes = objectives(ok)
    df = pd.DataFrame([  # accuracy (max) vs wall-clock (min)
        {"trial_id": "a", "tune_status": "TERMINATED", "trial_start": 1, "optim.lr": 1e-3, "model.init_logit_scale": 3.0,
         "optim.warmup_steps": 0, metrics[0]: 0.50, metrics[1]: 100.0},
        {"trial_id": "b", "tune_status": "TERMINATED", "trial_start": 2, "optim.lr": 2e-3, "model.init_logit_scale": 2.5,
         "optim.warmup_steps": 10, metrics[0]: 0.40, metrics[1]: 50.0},
        {"trial_id": "c", "tune_status": "TERMINATED", "trial_start": 3, "optim.lr": 5e-4, "model.init_logit_scale": 4.0,
         "optim.warmup_steps": 20, metrics[0]: 0.35, metrics[1]: 80.0},    # dominated by b
        {"trial_id": "d", "tune_status": "ERROR", "trial_start": 4, "optim.lr": 1e-3, "model.init_logit_scale": 3.0,
         "optim.warmup_steps": 0, metrics[0]: 0.90, metrics[1]: 10.0}])   # failed: never on the front
    assert pareto_ids(df, metrics, modes) == {"a", "b"}
    study = rebuild_study(df, SearchSpace(ok.search_space), metrics, modes)
    assert len(study.directions) == 2 and len(study.trials) == 3
    assert {t.number for t in study.best_trials} == {0, 1}  # Optuna's own front agrees
    plots = save_plots(study, tmp_path, target_name=metrics)
    for name in ("optimization_history", "param_importances", "pareto_front"):
        assert not plots[name].startswith("skipped"), plots[name]
        assert Path(plots[name]).stat().st_size > 5_000



@pytest.mark.timeout(60)
def test_truth_metric_beside_a_label_free_objective(digits_corpus, tmp_path):
    """`truth` (CLISC's ground-truth Dice beside the agreement objective): validated (reported, not an objective);
    the proxy check ranks the finished trials by it (Spearman), names the truth of the trial the objective picked
    and draws the scatter."""
    import pandas as pd

    from medvl.tune.tracking import proxy_check, proxy_picture
    validate_sweep(_spec(digits_corpus, "truth=val/i2t_r1"))
    for ov, msg in [("truth=val/nope", r"truth: trials never report 'val/nope'"),
                    ("truth=val/zero_shot_accuracy", r"truth: .* is an objective")]:
        with pytest.raises(SweepError, match=msg):
            validate_sweep(_spec(digits_corpus, ov))
    df = pd.DataFrame([{"trial_id": t, "proxy": p, "truth": g} for t, p, g in
                       [("a", 0.9, 0.5), ("b", 0.8, 0.7), ("c", 0.5, 0.3), ("d", 0.4, 0.2), ("e", None, 0.9)]])
    got = proxy_check(df, "proxy", "max", "truth", "max")
    assert got["proxy/trials"] == 4  # e has no objective value
    assert got["proxy/spearman"] == pytest.approx(0.8)  # ranks 1 2 3 4 vs 2 1 3 4
    assert got["proxy/truth_of_best"] == 0.5 and got["proxy/best_truth"] == 0.7
    assert proxy_check(df, "proxy", "min", "truth", "min")["proxy/truth_of_best"] == 0.2
    proxy_picture(df, "proxy", "truth", tmp_path / "p.png", got)
    assert (tmp_path / "p.png").stat().st_size > 5_000

@pytest.mark.timeout(60)
def test_val_metric_needs_a_val_split(digits_corpus):
    with pytest.raises(SweepError, match=r"data\.val_split is null"):
        validate_sweep(_spec(digits_corpus, "data.val_split=null"))
    # train-side metrics stay available
    validate_sweep(_spec(digits_corpus, "data.val_split=null", "metric=train/loss", "mode=min"))


@pytest.mark.timeout(60)
def test_unknown_sweep_file_key_is_named(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("base: x.yaml\nsearch_space: {optim.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}}\n"
                 "num_sample: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key num_sample"):
        load_sweep(p)
    p.write_text("base: x.yaml\nsearch_space: {optim.lr: {type: loguniform, low: 1.0e-4, hi: 1.0e-3}}\n")
    with pytest.raises(ConfigError, match=r"unknown key search_space\.optim\.lr\.hi"):
        load_sweep(p)


@pytest.mark.timeout(60)
def test_unreachable_cluster_address_fails_fast(digits_corpus, run_root):
    import ray

    from medvl.track.server import free_port
    from medvl.tune.sweep import run_sweep
    port = free_port()  # nothing listens there
    spec = _spec(digits_corpus, f"runtime.ray_address=127.0.0.1:{port}", "num_samples=1")
    t0 = time.time()
    with pytest.raises(SweepError, match=rf"runtime\.ray_address '127\.0\.0\.1:{port}' is not reachable"):
        run_sweep(spec)
    assert time.time() - t0 < 30
    assert not ray.is_initialized()
    assert not (Path(run_root) / "sweeps").exists()  # nothing was started or written


@pytest.mark.timeout(60)
def test_cli_reports_errors_with_exit_code_2(digits_corpus, capsys):
    from medvl.cli import main
    assert main(["tune", SMALL, f"data.corpus={digits_corpus}", "metric=val/nope", "--check"]) == 2
    assert "metric: the trainer never reports 'val/nope'" in capsys.readouterr().err
    assert main(["tune", SMALL, f"data.corpus={digits_corpus}", "--check"]) == 0


@pytest.mark.timeout(60)
def test_conditional_space_samples_only_active_dimensions(digits_corpus):
    import optuna

    from medvl.tune.space import SearchSpace
    spec = _spec(digits_corpus, path=str(ROOT / "jobs" / "sweep_digits_loss.yaml"))
    validate_sweep(spec)
    space = SearchSpace(spec.search_space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(16):
        t = study.ask()
        space(t)
        p = t.params
        seen.add(p["loss.kind"])
        assert ("loss.local_loss" in p) == (p["loss.kind"] == "clip")
        assert ("loss.siglip_dist_impl" in p) == (p["loss.kind"] == "siglip")
        assert 3e-4 <= p["optim.lr"] <= 5e-3
        study.tell(t, 0.0)
    assert seen == {"clip", "siglip"}
    import pickle
    assert pickle.loads(pickle.dumps(space)).params.keys() == space.params.keys()  # OptunaSearch.save pickles it


@pytest.mark.timeout(60)
def test_concurrency_is_derived_from_cluster_cpus(digits_corpus):
    from medvl.tune.sweep import cpus_per_trial, plan_concurrency
    spec = _spec(digits_corpus)  # 1 worker × 1 CPU
    recipe = validate_sweep(spec)
    assert cpus_per_trial(recipe, spec) == 3  # driver + worker + data
    assert plan_concurrency(recipe, spec, {"CPU": 6.0}) == 2
    assert plan_concurrency(recipe, spec, {"CPU": 64.0}) == spec.num_samples
    spec2 = _spec(digits_corpus, "resources.max_concurrent_trials=1")
    assert plan_concurrency(recipe, spec2, {"CPU": 64.0}) == 1
    with pytest.raises(SweepError, match=r"a trial needs 3 CPUs"):
        plan_concurrency(recipe, spec, {"CPU": 2.0})


@pytest.mark.timeout(60)
def test_trial_actors_are_reused_only_when_no_trial_is_stopped_early(digits_corpus):
    """`resources.reuse_actors` (default true) holds only for `scheduler.kind: none`: Tune hands a stopped trial's
    actor to the next trial while the stopped trial's fit() still runs (its workers train on), so with ASHA each
    trial gets a new actor and Tune kills the stopped one's. The reuse itself is checked by the pipeline-sweep test
    (3 trials, 2 actors: tests/test_pipelines.py)."""
    from medvl.tune.sweep import reuses_actors
    assert not reuses_actors(_spec(digits_corpus))  # the file's ASHA
    assert not reuses_actors(_spec(digits_corpus, "scheduler.kind=hyperband"))
    assert reuses_actors(_spec(digits_corpus, "scheduler.kind=none"))
    assert not reuses_actors(_spec(digits_corpus, "scheduler.kind=none", "resources.reuse_actors=false"))


def test_one_worker_trials_train_in_their_actors_by_default(digits_corpus):
    """`train.launch: auto` (the default): a sweep's 1-worker trials train in their Tune actors, data-parallel
    trials with Ray Train workers; an explicit value is kept; `medvl train` stays on workers."""
    from medvl.config import resolve_launch
    from medvl.tune.sweep import trial_launch
    recipe = validate_sweep(_spec(digits_corpus))
    assert recipe.train.launch == "auto" and trial_launch(recipe) == "in_process"
    assert resolve_launch(recipe.train) == "workers"  # the same recipe as a `medvl train` job
    assert trial_launch(validate_sweep(_spec(digits_corpus, "resources.workers=2"))) == "workers"
    assert trial_launch(validate_sweep(_spec(digits_corpus, "train.launch=workers"))) == "workers"
    with pytest.raises((ConfigError, SweepError), match=r"in_process .*needs train\.num_workers: 1"):
        validate_sweep(_spec(digits_corpus, "train.launch=in_process", "resources.workers=2"))


@pytest.mark.timeout(60)
def test_epoch_report_callback_forwards_one_result_per_epoch(monkeypatch):
    from ray.tune.integration.ray_train import TuneReportCallback

    from medvl.tune.trial import EpochReportCallback
    sent = []
    monkeypatch.setattr(TuneReportCallback, "after_report", lambda self, ctx, m, ck: sent.append(m[0]))
    cb = EpochReportCallback.__new__(EpochReportCallback)  # (its __init__ needs a live Tune session)
    cb.metric, cb.total_steps, cb.last_epoch, cb.t_start, cb.direct = "val/zero_shot_accuracy", 66, -1, None, False
    for m in [{"step": 10, "epoch": 0, "train/loss": 4.0},                                  # mid-epoch, no eval
              {"step": 22, "epoch": 1, "val/zero_shot_accuracy": 0.2},                      # epoch 1
              {"step": 30, "epoch": 1, "val/zero_shot_accuracy": 0.2},                      # mid-epoch repeat
              {"step": 44, "epoch": 2, "val/zero_shot_accuracy": 0.4},                      # epoch 2
              {"step": 66, "epoch": 3, "val/zero_shot_accuracy": 0.5}]:                     # final: held back
        cb.after_report(None, [m], None)
    assert [m["epoch"] for m in sent] == [1, 2]
    # corrupt rows ended epochs early: the final report comes before the planned step, flagged `final`
    cb.last_epoch = 2
    cb.after_report(None, [{"step": 63, "epoch": 3, "val/zero_shot_accuracy": 0.5, "final": 1}], None)
    assert [m["epoch"] for m in sent] == [1, 2]


# --------------------------------------------------------------------------- slow: real sweeps on local Ray


@pytest.fixture
def fresh_ray():
    """`run_sweep` starts its own embedded Ray (with room for 2 concurrent trials); shut it down afterwards."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    yield
    ray.shutdown()


def _children(uri: str, parent_id: str):
    from mlflow.tracking import MlflowClient
    c = MlflowClient(uri)
    exp = c.get_run(parent_id).info.experiment_id
    return c, c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def _artifacts(client, run_id: str, path: str = "") -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, a.path) if a.is_dir else [a.path])
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_in_process_trials_train_in_their_actors_report_every_epoch_and_close_their_runs(
        digits_corpus, run_root, fresh_ray):
    """`train.launch: in_process` (the default for 1-worker trials): each trial trains inside its Tune actor (no
    Train controller or worker group is ever created), reports every epoch to the scheduler (ASHA may stop one) and
    ends with a closed MLflow child run whose checkpoints medvl registered in Ray Train's format."""
    import ray
    import ray._private.state as ray_state

    from medvl.tune.sweep import run_sweep
    out = run_sweep(_spec(digits_corpus, f"runtime.run_root={run_root}", "name=t-inproc", "num_samples=3",
                          "train.epochs=2", "n_startup_trials=3", "eval.max_rows=120"),  # launch: auto
                    verbose=0)
    assert out.complete and len(out.table) == 3
    classes = {a.get("ActorClassName", "") for a in ray_state.actors().values()}
    assert not [c for c in classes if "TrainController" in c or "RayTrainWorker" in c], classes
    assert ray.is_initialized()
    client, children = _children(out.tracking_uri, out.parent_run_id)
    assert len(children) == 3
    for row in out.table.to_dict("records"):
        child = next(c for c in children if c.info.run_id == row["mlflow_run_id"])
        hist = client.get_metric_history(child.info.run_id, "val/zero_shot_accuracy")
        assert child.data.params["train.launch"] == "in_process"  # what `auto` became, in the trial's params
        if row["stopped_early"]:  # ASHA stopped it after epoch 1: its run is KILLED, not left RUNNING
            assert child.info.status == "KILLED" and row["epoch"] == 1
        else:
            assert child.info.status == "FINISHED" and row["epoch"] == 2 and len(hist) == 2
            snap = Path(run_root) / "ray" / child.data.tags["mlflow.runName"] / "checkpoint_manager_snapshot.json"
            assert json.loads(snap.read_text())["latest_checkpoint_result"]["metrics"]["epoch"] == 2
        assert row["val/zero_shot_accuracy"] == pytest.approx(hist[-1].value)
    assert out.best is not None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_in_process_trial_whose_actor_dies_resumes_from_its_checkpoint(digits_corpus, run_root, tmp_path):
    """Fault tolerance of in-process trials: the trial's Tune actor (the process that trains) is SIGKILLed after
    its first checkpoint; Tune restarts the trial, which resumes from that checkpoint in the same MLflow run and
    trains to the end: no step before the checkpoint is trained again, none after it is lost."""
    import psutil
    import yaml
    from mlflow.tracking import MlflowClient
    pace = tmp_path / "pace"
    pace.write_text("0.5")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "name": "crash-base", "plugins": ["medvl_test_plugins"],
        "data": {"corpus": digits_corpus, "batch_size": 64, "val_split": None, "shuffle_buffer": 0,
                 "decode_tasks": 1},
        "model": {"name": "test-vit-micro"},
        "train": {"epochs": 1, "log_every": 1, "ckpt_every": 5, "max_failures": 0},
        "eval": {"every_epoch": False},
        "track": {"experiment": "inproc-crash", "log_model": False},
        "test_pace": {"seconds_per_step": 0.5, "pace_file": str(pace)}}))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "t-crash", "base": str(base), "search_space": {"optim.lr": {"type": "loguniform", "low": 3e-4,
                                                                           "high": 3e-3}},
        "metric": "train/loss", "mode": "min", "num_samples": 1, "seed": 0, "scheduler": {"kind": "none"},
        "resources": {"workers": 1, "cpus_per_worker": 1, "trial_max_failures": 1}}))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "tune.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "medvl.cli", "tune", str(sweep), "--quiet",
                             f"runtime.run_root={run_root}"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    ray_dir = Path(run_root) / "ray"
    killed = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and killed is None:
            snaps = list(ray_dir.glob("t-crash-*/checkpoint_manager_snapshot.json")) if ray_dir.exists() else []
            if snaps:
                actors = [c for c in psutil.Process(proc.pid).children(recursive=True)
                          if "ImplicitFunc" in " ".join(c.cmdline())]
                assert len(actors) == 1, [c.cmdline() for c in actors]
                step = json.loads(snaps[0].read_text())["latest_checkpoint_result"]["metrics"]["step"]
                actors[0].kill()  # SIGKILL: the process that trains, mid-run
                killed = (snaps[0].parent.name, step)
                pace.write_text("0.02")
            time.sleep(0.2)
        assert killed, (tmp_path / "tune.log").read_text()[-3000:]
        rc = proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "tune.log").read_text()
    assert rc == 0, text[-4000:]
    import pandas as pd
    row = pd.read_csv(Path(run_root) / "sweeps" / "t-crash" / "results.csv").iloc[0]
    assert row["run_name"] == killed[0] and row["tune_status"] == "TERMINATED", row.to_dict()
    assert row["restarts"] == 1 and "resumed from a checkpoint" in row["incidents"], row.to_dict()
    client = MlflowClient(f"sqlite:///{Path(run_root).resolve() / 'mlflow.db'}")
    run = client.get_run(row["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.launch"] == "in_process"
    resumed = client.get_metric_history(run.info.run_id, "train/resumed_from_step")
    assert [int(m.value) for m in resumed] in ([killed[1]], [killed[1] + 5])  # the checkpoint seen (or the next)
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    steps = sorted({int(m.step) for m in losses})
    assert steps == list(range(1, 23)), steps  # 1437 rows / 64: every step of the epoch is in MLflow
    after = [int(m.step) for m in sorted(losses, key=lambda m: m.timestamp)
             if m.timestamp >= resumed[0].timestamp]
    assert min(after) == int(resumed[0].value) + 1  # the restarted trial trained on from the checkpoint


def _tune_cmd(corpus: str, run_root: str) -> list[str]:
    return [sys.executable, "-m", "medvl.cli", "tune", SMALL, "--quiet", f"data.corpus={corpus}",
            f"runtime.run_root={run_root}", "name=t-resume", "num_samples=2", "train.epochs=2",
            # 40 steps: long enough that the second trial, which starts in ~3 s in its (reused) Tune actor, is still
            # training when the test interrupts the sweep 3 s after its MLflow run appears
            "train.max_steps=40", "scheduler.kind=none", "eval.max_rows=120", "resources.max_concurrent_trials=1",
            "n_startup_trials=1"]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_interrupted_sweep_resumes_with_its_trials(digits_corpus, run_root, tmp_path, fresh_ray):
    """Ctrl+C (SIGINT) after the first trial finished; the same command resumes: the finished trial is kept (not
    re-run), the interrupted one continues in its own MLflow run, the parent run is the same; the finished sweep's
    MLflow structure (parent, children, best trial, Optuna plots, trials table) is checked at the end (this test
    is also the small real training sweep: one sweep run serves both, to keep CI short)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    sweep_dir = Path(run_root) / "sweeps" / "t-resume"
    events = sweep_dir / "trial_events.jsonl"
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_tune_cmd(digits_corpus, run_root), env=env, stdout=log1, stderr=subprocess.STDOUT,
                            cwd=ROOT)
    try:
        deadline = time.time() + 900
        second = None
        while time.time() < deadline and proc.poll() is None:
            evs = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
            done = {e["trial_id"] for e in evs if e["event"] == "complete"}
            running = [e["trial_id"] for e in evs if e["event"] == "start" and e["trial_id"] not in done]
            if done and running:
                second = running[0]
                if (Path(run_root) / "jobs" / f"t-resume-{second}" / "mlflow_run_id").exists():
                    break  # trial 1 done, trial 2 has its MLflow run and is training
            time.sleep(1)
        assert proc.poll() is None and second, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(3)
        proc.send_signal(signal.SIGINT)  # Ctrl+C
        rc = proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
        log1.close()
    first_log = (tmp_path / "first.log").read_text()
    assert rc == 130, first_log[-3000:]
    assert "INTERRUPTED" in first_log and "resume with: medvl tune" in first_log
    parent_id = (sweep_dir / "mlflow_parent_run_id").read_text().strip()
    uri = f"sqlite:///{Path(run_root).resolve() / 'mlflow.db'}"
    client, kids = _children(uri, parent_id)
    assert client.get_run(parent_id).info.status == "KILLED"
    assert all(k.info.status != "RUNNING" for k in kids)  # nothing left dangling
    finished_before = {k.data.tags["medvl.trial_id"]: k.info.run_id for k in kids if k.info.status == "FINISHED"}
    assert finished_before
    interrupted = {k.data.tags["medvl.trial_id"]: k for k in kids if k.info.status == "KILLED"}
    assert second in interrupted and interrupted[second].data.tags["medvl.end_reason"] == "sweep interrupted"
    assert re.search(rf"{second}\s.*INTERRUPTED\s+KILLED", first_log)

    res = subprocess.run(_tune_cmd(digits_corpus, run_root), env=env, capture_output=True, text=True, cwd=ROOT,
                         timeout=1200)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "resuming sweep 't-resume'" in out
    client, kids = _children(uri, parent_id)
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert len(kids) == 2, [k.info.run_name for k in kids]  # no duplicate child runs
    by_trial = {k.data.tags["medvl.trial_id"]: k for k in kids}
    for tid, run_id in finished_before.items():
        assert by_trial[tid].info.run_id == run_id and by_trial[tid].data.tags.get("medvl.resumed") is None
    assert all(k.info.status == "FINISHED" for k in kids)
    # the interrupted trial went on in its own MLflow run (same run id, tagged resumed)
    assert by_trial[second].info.run_id == interrupted[second].info.run_id
    assert by_trial[second].data.tags.get("medvl.resumed") == "true"
    starts = [json.loads(x)["trial_id"] for x in events.read_text().splitlines() if '"start"' in x]
    for tid in finished_before:
        assert starts.count(tid) == 1  # a finished trial is not run again
    # what a finished sweep leaves in MLflow (also for a resumed one): the parent, its children, the best trial,
    # Optuna's plots, the trials table
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "t-resume" and parent.data.tags["medvl.sweep"] == "t-resume"
    assert {k.info.run_name for k in kids} == {f"t-resume-{t}" for t in by_trial}
    for k in kids:
        assert "optim.lr" in k.data.params and "val/zero_shot_accuracy" in k.data.metrics
        assert client.get_metric_history(k.info.run_id, "train/loss")  # per-step curve
    import pandas as pd
    df = pd.read_csv(sweep_dir / "results.csv")
    assert len(df) == 2 and set(df["mlflow_run_id"]) == {k.info.run_id for k in kids}
    best = df[df["trial_id"] == parent.data.tags["medvl.best_trial"]].iloc[0]
    assert best["val/zero_shot_accuracy"] == pytest.approx(df["val/zero_shot_accuracy"].max())
    assert parent.data.metrics["best/val/zero_shot_accuracy"] == pytest.approx(best["val/zero_shot_accuracy"])
    # (a param logged by the interrupted run cannot change: a new best goes to a tag of the same name)
    best_lr = parent.data.tags.get("best/optim.lr", parent.data.params["best/optim.lr"])
    assert float(best_lr) == pytest.approx(best["optim.lr"])
    for key in ("model.init_logit_scale", "optim.warmup_steps"):
        assert f"best/{key}" in parent.data.params
    arts = _artifacts(client, parent_id)
    assert {"optuna/optimization_history.png", "optuna/param_importances.png"} <= set(arts)
    assert {"sweep/results.csv", "sweep/trials_table.json", "config/sweep.yaml"} <= set(arts)


def _forever_worker(cfg):
    import time

    import ray.train
    for i in range(10_000):
        time.sleep(0.2)
        ray.train.report({"it": i})


def _trial_with_trainer(cfg):
    import ray.train
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from medvl.train.pg_cleaner import MedvlTorchTrainer  # what medvl's trials run (build_trainer)
    MedvlTorchTrainer(_forever_worker, scaling_config=ray.train.ScalingConfig(num_workers=1),
                 run_config=ray.train.RunConfig(name=f"t-{tune.get_context().get_trial_id()}",
                                                storage_path=cfg["storage"],
                                                callbacks=[TuneReportCallback()])).fit()


def _cleaner_callbacks() -> list[str]:
    """The placement-group cleaner callbacks of the trainer medvl builds, in the calling process."""
    import ray.train

    from medvl.train.pg_cleaner import MedvlTorchTrainer
    t = MedvlTorchTrainer(_forever_worker, scaling_config=ray.train.ScalingConfig(num_workers=1))
    return [type(c).__name__ for c in t._create_default_callbacks() if "PlacementGroupCleaner" in type(c).__name__]


def _env(name: str):
    return os.environ.get(name)


def _cmdline(proc) -> list[str]:
    import psutil
    try:
        return proc.cmdline()
    except psutil.Error:  # it exited (or became a zombie) between the listing and this call
        return []


def _worker_settings() -> tuple[int, Optional[str], Optional[str]]:
    return os.getpid(), os.environ.get("GOMP_SPINCOUNT"), os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")


@pytest.mark.timeout(120)
def test_embedded_ray_runs_tasks_in_its_prestarted_workers_with_medvl_settings(fresh_ray, monkeypatch):
    """The embedded Ray's workers get medvl's settings (OpenMP's short spin, no preemption watcher) from the
    node's environment, not from a job runtime_env: Ray only gives a task or actor an idle worker started with
    the same runtime_env, and the workers it prestarts when the node starts have none. With the settings in a job
    runtime_env those prestarted workers never ran anything and every task waited for a new process. The
    driver's own environment is left as it was.
    And a second Ray on the machine does not slow it down: with Ray's fixed dashboard-agent port (52365) taken,
    as it is here, the agent binds a port the OS chooses instead of retrying for ~3 s and running without its
    HTTP server (`medvl.raynode`)."""
    import socket
    import urllib.request

    import psutil
    import ray
    from ray._private import ray_constants

    from medvl.config import RuntimeConfig, load_recipe
    from medvl.train.launcher import load_while_ray_starts
    for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        monkeypatch.delenv(k, raising=False)
    taken = socket.socket()
    try:  # another Ray's agent may hold it already (two test files run at once): taken either way
        taken.bind(("0.0.0.0", ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT))
        taken.listen()
    except OSError:
        pass
    seen: dict = {"env": set()}

    def load():
        """As `medvl train` loads its recipe: in another thread, while the main thread starts Ray. It returns
        only once Ray runs (it times out if the two ran one after the other), and watches this process's
        environment meanwhile: the node's settings go to the raylet, never into os.environ, where this thread
        (importing torch loads libgomp, which reads GOMP_SPINCOUNT once) would pick them up."""
        import threading
        seen["thread"], seen["ray_at_start"] = threading.current_thread().name, ray.is_initialized()
        deadline = time.time() + 120
        while not ray.is_initialized() and time.time() < deadline:
            seen["env"] |= {k for k in ("GOMP_SPINCOUNT", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER") if k in os.environ}
            time.sleep(0.001)
        return load_recipe(data={"data": {"corpus": "unused"}, "runtime": {"num_cpus": 4}})

    try:
        recipe = load_while_ray_starts(load, RuntimeConfig(num_cpus=4))
    finally:
        taken.close()
    assert recipe.runtime.num_cpus == 4 and ray.cluster_resources()["CPU"] == 4
    assert seen["thread"] != "MainThread" and seen["ray_at_start"] is False and seen["env"] == set(), seen
    node = ray._private.worker._global_node
    port = node.dashboard_agent_listen_port
    assert port > 0 and port != ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT
    assert "failed to bind" not in (Path(node.get_logs_dir_path()) / "dashboard_agent.log").read_text()
    with urllib.request.urlopen(f"http://{node.node_ip_address}:{port}/api/local_raylet_healthz", timeout=10) as r:
        assert r.status == 200
    assert "GOMP_SPINCOUNT" not in os.environ and "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    deadline, prestarted = time.time() + 60, set()
    while not prestarted and time.time() < deadline:
        time.sleep(0.5)
        prestarted = {c.pid for c in raylet.children() if _cmdline(c)[:1] == ["ray::IDLE"]}
    assert prestarted, "the embedded Ray prestarted no worker"
    pid, spin, watcher = ray.get(ray.remote(_worker_settings).remote())
    assert (spin, watcher) == ("20000", "0")
    assert pid in prestarted, f"the task ran in a new worker {pid}, not in one of the prestarted {sorted(prestarted)}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stopped_trials_release_their_train_workers(tmp_path, fresh_ray, monkeypatch):
    """A trial stopped from outside (as ASHA stops one) kills its TrainController; Ray Train's
    PlacementGroupCleaner must then remove the worker placement group. Ray's own cleaner needs the dashboard's
    State API for that: medvl's sweeps once ran an embedded Ray without it and every stopped trial leaked its
    workers' CPUs, until the sweep starved and hung. medvl's trainer (`medvl.train.pg_cleaner.MedvlTorchTrainer`)
    asks the GCS instead, so this runs WITHOUT the dashboard, as `run_sweep` does."""
    import ray
    from ray import tune
    from ray.util import placement_group_table

    from medvl.config import load_recipe
    from medvl.train.launcher import ensure_ray
    # Ray workers unpickle the trial function by module name: put this test module on their path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.path.dirname(__file__),
                                                                   os.environ.get("PYTHONPATH")])))
    ensure_ray(load_recipe(data={"data": {"corpus": "unused"}, "runtime": {"num_cpus": 4}}))
    # a fit() in the process that started the embedded Ray needs no cleaner (its cluster ends with it); one in any
    # other process (a trial's actor, a job on a cluster) gets the GCS cleaner; an embedded Ray's Train runs start
    # no PreemptionWatcher
    assert _cleaner_callbacks() == []
    assert ray.get(ray.remote(_cleaner_callbacks).remote()) == ["GcsPlacementGroupCleanerCallback"]
    assert ray.get(ray.remote(_env).remote("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")) == "0"
    from ray.util.state import list_nodes
    with pytest.raises(Exception):  # really without the dashboard's State API (what Ray's own cleaner polls)
        list_nodes(timeout=5)
    grid = tune.Tuner(tune.with_resources(_trial_with_trainer, {"CPU": 1}),
               param_space={"storage": str(tmp_path / "train"), "x": tune.grid_search([1, 2, 3])},
               tune_config=tune.TuneConfig(max_concurrent_trials=1),
               run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), stop={"it": 2}, verbose=0)).fit()
    assert not grid.errors and [r.metrics["it"] for r in grid] == [2, 2, 2]  # each trial trained, then was stopped
    deadline = time.time() + 60
    while time.time() < deadline:
        live = [p for p in placement_group_table().values() if p["state"] == "CREATED"]
        if not live and ray.available_resources().get("CPU") == 4:
            break
        time.sleep(1)
    assert live == [], f"{len(live)} placement groups of stopped trials still hold CPUs"
    assert ray.available_resources().get("CPU") == 4
