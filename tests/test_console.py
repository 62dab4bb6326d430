"""What `medvl train` shows on the console (issue 17): progress lines (epoch, step/total, loss, samples/s, ETA),
one eval line per epoch, the summary, the path of Ray's log files, and none of the libraries' internal noise; a
worker that fails still shows its traceback.

    .venv/bin/python -m pytest -q tests/test_console.py               # all (the two subprocess runs: ~1 min)
    .venv/bin/python -m pytest -q tests/test_console.py -m "not slow" # the formatting units only
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

from medvl.track.console import (JournalTail, ProgressState, format_duration, format_eval, format_progress,
                                 sweep_line)

REPO = Path(__file__).resolve().parents[1]
NOISE = ("PlacementGroupCleaner", "Failed to query Ray Train Controller", "Parsing tokenizer",
         "SimpleTokenizer", "TrainingReport", "execution finished", "schema", "Running Dataset")
PROGRESS = re.compile(r"^epoch (\d+)/(\d+)  step (\d+)/(\d+)  loss (\d+\.\d{4})  (\d+) samples/s  "
                      r"ETA (\d+:\d\d:\d\d)$", re.M)
EVAL = re.compile(r"^epoch (\d+)/(\d+)  eval  val/zero_shot_accuracy (\d\.\d{4})", re.M)


# --------------------------------------------------------------------------- formatting (fast)

def test_progress_line_format():
    assert format_duration(0) == "0:00:00" and format_duration(3725.4) == "1:02:05"
    assert format_duration(None) == "?" and format_duration(float("nan")) == "?"
    line = format_progress(3, 10, 168, 560, 1.90421, 1204.4, 41)
    assert line == "epoch 3/10  step 168/560  loss 1.9042  1204 samples/s  ETA 0:00:41"
    assert PROGRESS.match(line)
    assert format_progress(1, 2, 0, 10, None, None, None) == "epoch 1/2  step 0/10  loss -  - samples/s  ETA ?"
    ev = format_eval(2, 10, {"val/i2t_mean_rank": 2.5, "val/i2t_r1": 0.5, "val/zero_shot_accuracy": 0.91234,
                             "val/t2i_r1": 0.25})
    assert ev == "epoch 2/10  eval  val/zero_shot_accuracy 0.9123  val/i2t_r1 0.5000  val/t2i_r1 0.2500  " \
                 "val/i2t_mean_rank 2.5000"
    many = format_eval(1, 1, {f"val/m{i}": 0.0 for i in range(9)}, limit=6)
    assert many.endswith("(+3 more in MLflow)")
    assert sweep_line({"done": 2, "stopped": 1, "errored": 0, "running": 2}, 8, "val/acc", 0.912, "ab12", 133) == \
        "trials 3/8 done (1 stopped early, 0 errored), 2 running  best val/acc 0.9120 (trial ab12)  [0:02:13]"


def test_progress_state_events_epochs_and_eta():
    now = [100.0]
    st = ProgressState(total_steps=40, steps_per_epoch=20, epochs=2, batch_size=64, clock=lambda: now[0])
    ev = st.feed({"r": "x", "s": 5, "m": {"train/loss": 2.0, "train/samples_per_s": 320.0, "train/epoch": 0.25}})
    # first point: no ETA yet (the first window's samples/s includes the data pipeline's start)
    assert ev == [("progress", "epoch 1/2  step 5/40  loss 2.0000  320 samples/s  ETA ?")]
    now[0] = 110.0  # 15 more steps in 10 s of wall clock (evaluations included): 20 steps left -> 13 s
    ev = st.feed({"r": "x", "s": 20, "m": {"train/loss": 1.5, "train/samples_per_s": 300.0}})
    assert ev == [("epoch_end", "epoch 1/2  step 20/40  loss 1.5000  300 samples/s  ETA 0:00:13")]
    ev = st.feed({"r": "x", "s": 20, "m": {"val/zero_shot_accuracy": 0.5, "val/i2t_r1": 0.25}})
    assert ev == [("eval", "epoch 1/2  eval  val/zero_shot_accuracy 0.5000  val/i2t_r1 0.2500")]
    assert st.feed({"r": "x", "s": 20, "m": {"train/lr": 0.1}}) == []  # nothing to show
    assert st.feed({"r": "x", "s": 40, "m": {"train/loss": 1.0}})[0] == \
        ("epoch_end", "epoch 2/2  step 40/40  loss 1.0000  300 samples/s  ETA 0:00:00")
    assert ProgressState(10, 5, 2, 8).feed({"s": 3, "m": {"train/resumed_from_step": 3}}) == \
        [("info", "resuming from the checkpoint at step 3")]


def test_journal_tail_reads_complete_lines_of_its_run_only(tmp_path):
    j = tmp_path / "metrics.jsonl"
    j.write_text(json.dumps({"r": "old", "s": 1, "m": {"train/loss": 9}}) + "\n")
    tail = JournalTail(j, "run")  # starts at the end: a resumed run's earlier lines are not replayed
    with open(j, "a") as f:
        f.write(json.dumps({"r": "run", "s": 2, "m": {"train/loss": 1}}) + "\n")
        f.write(json.dumps({"r": "other", "s": 2, "m": {"train/loss": 5}}) + "\n")
        f.write('{"r": "run", "s": 3, "m": {"train/lo')  # a line still being written
    assert [r["s"] for r in tail.read()] == [2]
    with open(j, "a") as f:
        f.write('ss": 0.5}}\n')
    assert [(r["s"], r["m"]) for r in tail.read()] == [(3, {"train/loss": 0.5})]
    assert tail.read() == []


# --------------------------------------------------------------------------- `medvl train` as a user runs it

SHORT = ["model.name=test-vit-micro", "train.epochs=2", "train.num_workers=1", "data.batch_size=64",
         "train.log_every=4", "train.ckpt_every=1000", "train.max_failures=0", "optim.warmup_steps=2",
         "track.log_model=false"]


def _start(args: list[str], run_root: Path, ray_tmp: Path, **env) -> subprocess.Popen:
    e = {**os.environ, "MEDVL_RUN_ROOT": str(run_root), "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp),
         **env}
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MEDVL_VERBOSE", "MEDVL_PROGRESS"):
        e.pop(k, None)  # its own embedded Ray and local MLflow store, default display, as on a user's machine
    return subprocess.Popen([sys.executable, "-m", "medvl.cli", *args], cwd=REPO, env=e, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def console_runs(digits_corpus, tmp_path_factory):
    """Two `medvl train` processes side by side (stdout/stderr are pipes, not a TTY): a short run that trains, and
    one whose worker fails (its audit directory is a file: `_Audit` raises FileExistsError in the worker, never
    in the driver). Run concurrently to spend the test's wall time once."""
    tmp = tmp_path_factory.mktemp("console")
    blocker = tmp / "not-a-dir"
    blocker.write_text("x")
    # short: Ray's Unix socket paths live under it (at most 107 bytes; pytest's tmp paths can be too long)
    ray_tmp = Path(tempfile.mkdtemp(prefix="mc-", dir="/tmp"))
    common = ["train", "jobs/digits_clip.yaml", f"data.corpus={digits_corpus}", *SHORT]
    procs = {"ok": _start([*common, "track.run_name=console"], tmp / "runs-ok", ray_tmp / "a"),
             "fails": _start([*common, "track.run_name=fails"], tmp / "runs-fails", ray_tmp / "b",
                             MEDVL_AUDIT_SAMPLES=str(blocker))}
    out = {}
    try:
        for name, p in procs.items():
            stdout, stderr = p.communicate(timeout=240)
            out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    yield out
    shutil.rmtree(ray_tmp, ignore_errors=True)  # after the tests: they read the runs' Ray logs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_console_shows_progress_and_no_noise(console_runs):
    p = console_runs["ok"]
    out = p.stdout + p.stderr
    print(out)  # the console as the user saw it (pytest shows it on failure)
    assert p.returncode == 0, out
    progress = PROGRESS.findall(p.stdout)
    assert progress, "no progress line"
    epochs = {int(m[0]) for m in progress}
    assert epochs == {1, 2} and all(m[1] == "2" for m in progress)
    total = int(progress[-1][3])
    assert int(progress[-1][2]) == total and progress[-1][6] == "0:00:00"  # the last line: done, nothing left
    assert all(int(m[5]) > 0 for m in progress)
    evals = EVAL.findall(p.stdout)
    assert [int(m[0]) for m in evals] == [1, 2]  # one eval line per epoch
    assert "run 'console' finished in" in p.stdout and "zero_shot_accuracy=" in p.stdout  # the summary
    m = re.search(r"Ray's logs \(workers, controller\) of run 'console': (\S+)", p.stdout)
    assert m, "the Ray log path is not printed"
    logs = Path(m.group(1))
    assert logs.is_dir() and any(logs.glob("worker-*.out")), f"no worker logs under {logs}"
    for noise in NOISE:
        assert noise not in out, f"noise on the console: {noise!r}"
    assert " INFO " not in out  # no library INFO logging (mlflow's "Creating initial MLflow database tables")
    # the start-up timeline (medvl.track.timeline): every phase, summing to the total
    m = re.search(r"medvl: start-up ([\d.]+) s to the first step: (.*)", p.stdout)
    assert m, "no start-up line"
    phases = {k: float(v) for k, v in (x.rsplit(" ", 1) for x in m.group(2).split(", "))}
    assert list(phases) == ["imports", "ray", "job", "workers", "model", "data", "first_step"], phases
    assert all(v >= 0 for v in phases.values()) and abs(sum(phases.values()) - float(m.group(1))) < 0.5
    assert len(out.splitlines()) < 40, f"{len(out.splitlines())} console lines"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failing_worker_shows_its_traceback(console_runs):
    p = console_runs["fails"]
    out = p.stdout + p.stderr
    print(out)
    assert p.returncode == 1, out
    assert "the training failed in a Ray worker" in p.stderr
    assert "Traceback (most recent call last)" in p.stderr and "FileExistsError" in p.stderr
    assert "medvl/train/worker.py" in p.stderr  # the worker's own frames, not only the driver's
    for noise in NOISE:
        assert noise not in out, f"noise on the console: {noise!r}"


def test_sweep_progress_counts_trials_and_best(capsys, monkeypatch):
    """The Tune callback `medvl tune` adds: done / stopped early / errored / running and the best so far."""
    from types import SimpleNamespace as T

    from medvl.tune.progress import SweepProgress
    monkeypatch.delenv("MEDVL_PROGRESS", raising=False)
    cb = SweepProgress(total=6, metric="val/acc", mode="max", horizon=3)
    trials = [T(trial_id="a", status="TERMINATED", last_result={"done": True, "val/acc": 0.8, "epoch": 3}, config={}),
              # stopped by the scheduler: Tune marks it done too, but it ended before the horizon
              T(trial_id="b", status="TERMINATED", last_result={"done": True, "val/acc": 0.3, "epoch": 1}, config={}),
              T(trial_id="c", status="ERROR", last_result={}, config={}),
              T(trial_id="d", status="RUNNING", last_result={"val/acc": 0.9}, config={}),
              T(trial_id="e", status="PENDING", last_result=None, config={}),
              # train.epochs searched: it sampled 1 epoch and trained it: done, not stopped early
              T(trial_id="f", status="TERMINATED", last_result={"done": True, "val/acc": 0.2, "epoch": 1},
                config={"train.epochs": 1})]
    counts, best, best_id = cb.summary(trials)
    assert counts == {"done": 2, "stopped": 1, "errored": 1, "running": 1, "pending": 1}
    assert (best, best_id) == (0.9, "d")
    cb.on_step_end(0, trials)
    cb.on_step_end(1, trials)  # unchanged: printed once
    trials[3] = T(trial_id="d", status="TERMINATED", last_result={"done": True, "val/acc": 0.9, "epoch": 3}, config={})
    cb.on_experiment_end(trials)  # the end: printed when it differs from the last line
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(
        "medvl tune: trials 4/6 done (1 stopped early, 1 errored), 1 running  best val/acc 0.9000 (trial d)")
    import pickle
    pickle.dumps(cb)  # Tune saves its callbacks with the experiment state


def test_worker_messages_echo_medvl_lines_of_new_output_only(tmp_path):
    """medvl's own lines in Ray's worker logs reach the console (log_to_driver is off); nothing else does."""
    from medvl.track.console import WorkerMessages
    old = tmp_path / "worker-aa-1.out"
    old.write_text("medvl: from an earlier run of the session\n")
    m = WorkerMessages(tmp_path)
    with open(old, "a") as f:
        f.write(":job_id:01000000\nTrainingReport(...)\nmedvl: MLflow at http://u:***@h:1 is unreachable (x)\n")
    new = tmp_path / "worker-bb-2.err"
    new.write_text("medvl: starting fresh\nmedvl: half a li")
    assert m.read() == ["medvl: MLflow at http://u:***@h:1 is unreachable (x)", "medvl: starting fresh"]
    with open(new, "a") as f:
        f.write("ne\n")
    assert m.read() == ["medvl: half a line"] and m.read() == []


def test_startup_timeline_phases_and_process_start():
    import time

    from medvl.track.timeline import DRIVER_PHASES, WORKER_PHASES, Timeline, metrics, process_start_time, summary
    started = process_start_time()
    assert started is not None and started <= time.time()
    # a fresh process, bracketed by the wall clock on both sides, finds its own start inside the bracket
    before = time.time()
    child = subprocess.run([sys.executable, "-c", "from medvl.track.timeline import process_start_time as p; "
                            "import time; print(p(), time.time())"], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "platform")})
    after = time.time()
    child_started, child_now = map(float, child.stdout.split())
    assert before - 0.5 <= child_started <= child_now <= after, (before, child_started, child_now, after)
    # the first driver timeline of a process starts at the process's start; a later one (a pipeline's next train
    # stage) at its own creation, so its "imports" phase does not hold the earlier stages
    code = ("import time; from medvl.track.timeline import Timeline, process_start_time as p; a = Timeline.for_driver("
            "'a'); t = time.time(); b = Timeline.for_driver('b'); print(p(), a.marks['start'], t, b.marks['start'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "platform")})
    proc_start, a_start, t_between, b_start = map(float, out.stdout.split())
    assert abs(a_start - proc_start) < 0.05 and proc_start < t_between <= b_start
    tl = Timeline({"start": 100.0})
    for name, t in zip(DRIVER_PHASES + WORKER_PHASES, (102.0, 105.5, 106.0, 110.0, 111.0, 118.0, 118.5)):
        tl.mark(name, t)
    tl.mark("data", 999.0)  # a mark is set once: a later call keeps the first time
    ph = tl.phases(DRIVER_PHASES + WORKER_PHASES)
    assert ph == {"imports": 2.0, "ray": 3.5, "job": 0.5, "workers": 4.0, "model": 1.0, "data": 7.0,
                  "first_step": 0.5}
    assert summary(ph).startswith("medvl: start-up 18.5 s to the first step: imports 2.0, ray 3.5")
    assert metrics(ph)["startup/total_s"] == 18.5 and metrics(ph, restart=True)["startup/restart_data_s"] == 7.0
    # a missing mark (no driver marks: a trial's actor) leaves its phase out; the next one counts from the last mark
    assert Timeline({"start": 0.0, "workers": 4.0, "data": 9.0}).phases(WORKER_PHASES) == {"workers": 4.0,
                                                                                            "data": 5.0}


_EXIT_SCRIPT = r"""
import atexit, sys, threading, time
from medvl.cli import exit_now
out = sys.argv[1]
atexit.register(lambda: open(out, "a").write("atexit ran\n"))
sys.stdout.write("buffered, no newline")  # still in the buffer when exit_now is called (stdout is a pipe)
if sys.argv[2] == "thread":  # a non-daemon thread: exit_now must let it finish (as sys.exit does)
    threading.Thread(target=lambda: (time.sleep(1.0), open(out, "a").write("thread done\n"))).start()
exit_now(int(sys.argv[3]))
open(out, "a").write("not reached\n")
"""


@pytest.mark.parametrize("mode", ["plain", "thread"])
def test_exit_now_flushes_runs_atexit_handlers_and_keeps_the_exit_code(tmp_path, mode):
    """`medvl` ends with `medvl.cli.exit_now`: the interpreter's module teardown is skipped, but stdout/stderr are
    flushed, every atexit handler runs (Ray's shutdown, MLflow's flush), the exit code is kept, and a running
    non-daemon thread is waited for."""
    out = tmp_path / "out.txt"
    r = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(out), mode, "3"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 3, r.stderr
    assert r.stdout == "buffered, no newline"
    lines = out.read_text().splitlines()
    assert "atexit ran" in lines and "not reached" not in lines
    if mode == "thread":
        assert lines == ["thread done", "atexit ran"]  # the thread first, then the handlers, as sys.exit does
