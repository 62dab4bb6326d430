"""`medvl submit` / `medvl jobs`: local validation and address checks (fast), and a real submission to a real
local Ray cluster started with cluster/local/start-head.sh, read back from MLflow (slow).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from medvl import cli  # noqa: E402
from medvl.submit import EXCLUDES, jobs_main, plan_job, submit_main  # noqa: E402
from medvl.track.server import free_ports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
UNREACHABLE = "http://127.0.0.1:1"


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _smoke_recipe(tmp_path: Path, corpus: str, **extra) -> Path:
    data = {
        "name": "submit-smoke",
        "data": {"corpus": corpus, "batch_size": 32},
        "model": {"name": "digits-vit-tiny"},
        "train": {"epochs": 1, "max_steps": 6, "num_workers": 1, "log_every": 2, "ckpt_every": 3},
        "eval": {"templates": ["a photo of the digit {}."]},
    }
    data.update(extra)
    return _write(tmp_path / "smoke.yaml", data)


# --------------------------------------------------------------------------- fast: errors before submitting


def test_unreachable_address_is_reported_before_submitting(tmp_path, capsys):
    recipe = _smoke_recipe(tmp_path, str(tmp_path / "corpus"))
    t0 = time.monotonic()
    rc = submit_main([str(recipe), "--address", UNREACHABLE])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"cannot reach Ray dashboard at {UNREACHABLE} (connection refused)" in err
    assert "is the cluster up? see cluster/README.md" in err
    assert "submitted" not in err and time.monotonic() - t0 < 15


def test_unreachable_address_through_the_medvl_console_script(tmp_path):
    recipe = _smoke_recipe(tmp_path, str(tmp_path / "corpus"))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    r = subprocess.run([str(VENV_BIN / "medvl"), "submit", str(recipe), "--address", UNREACHABLE, "--no-wait"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"cannot reach Ray dashboard at {UNREACHABLE}" in r.stderr
    assert "job_id=" not in r.stdout


def test_unresolvable_host_names_the_host(tmp_path, capsys):
    recipe = _smoke_recipe(tmp_path, str(tmp_path / "corpus"))
    assert submit_main([str(recipe), "--address", "no-such-head.invalid:8265"]) == 2
    err = capsys.readouterr().err
    assert "http://no-such-head.invalid:8265" in err and "cannot resolve host 'no-such-head.invalid'" in err


def test_bad_recipe_key_is_rejected_locally(tmp_path, capsys):
    recipe = _smoke_recipe(tmp_path, str(tmp_path / "corpus"), optim={"lrr": 0.1})
    assert submit_main([str(recipe), "--address", UNREACHABLE]) == 2
    err = capsys.readouterr().err
    assert "unknown key optim.lrr" in err and str(recipe) in err
    assert "cannot reach" not in err, "the recipe must be validated before the cluster is contacted"


def test_bad_override_and_bad_value_are_rejected_locally(tmp_path, capsys):
    recipe = _smoke_recipe(tmp_path, str(tmp_path / "corpus"))
    assert submit_main([str(recipe), "--address", UNREACHABLE, "train.num_wrkers=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown key train.num_wrkers" in err and "cannot reach" not in err
    assert cli.main(["submit", str(recipe), "--address", UNREACHABLE, "optim.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr must be > 0" in err and "cannot reach" not in err


def test_a_submission_is_sent_again_while_the_job_agent_is_not_reachable_yet(capsys):
    """Seen in CI: right after a node joined, the Jobs API answered 500 "Cannot connect to host <node>:<agent
    port>" (its job agent was not listening yet; no job was created). `medvl submit` sends the same submission again
    for a while; any other error, or one that lasts, is reported at once / at the end."""
    from medvl.submit import SubmitError, submit_with_retry

    class Client:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def submit_job(self, **kw):
            self.calls += 1
            if self.errors:
                raise RuntimeError(self.errors.pop(0))
            return kw["submission_id"]

    plan = type("Plan", (), {"entrypoint": "true", "submission_id": "s-1", "runtime_env": {}, "metadata": {}})()
    agent = ("Request failed with status code 500: ... aiohttp.client_exceptions.ClientConnectorError: Cannot "
             "connect to host 192.0.2.2:40011 ssl:default [Connect call failed ('192.0.2.2', 40011)]")
    c = Client([agent, agent])
    assert submit_with_retry(c, plan, "http://h:8265", wait_s=5, pause_s=0.01) == "s-1" and c.calls == 3
    assert "job agent is not reachable yet" in capsys.readouterr().err
    c = Client(["Request failed with status code 400: runtime_env: bad pip spec"])
    with pytest.raises(SubmitError, match="rejected the submission: .*bad pip spec"):
        submit_with_retry(c, plan, "http://h:8265", wait_s=5, pause_s=0.01)
    assert c.calls == 1  # not retried
    c = Client([agent] * 1000)
    with pytest.raises(SubmitError, match=r"rejected the submission \(after \d+ s of retries\): .*Cannot connect"):
        submit_with_retry(c, plan, "http://h:8265", wait_s=0.2, pause_s=0.05)
    assert 2 <= c.calls < 10


def test_missing_recipe_file_is_named(tmp_path, capsys):
    assert submit_main([str(tmp_path / "nope.yaml"), "--address", UNREACHABLE]) == 2
    assert f"recipe file not found: {tmp_path / 'nope.yaml'}" in capsys.readouterr().err


def test_sweep_file_needs_base_and_search_space(tmp_path, capsys):
    sweep = _write(tmp_path / "sweep.yaml", {"search_space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}})
    assert submit_main([str(sweep), "--address", UNREACHABLE]) == 2
    err = capsys.readouterr().err
    assert "needs top-level `base` and `search_space` (missing: base)" in err and "cannot reach" not in err


def test_address_forms(tmp_path, capsys, monkeypatch):
    recipe = _smoke_recipe(tmp_path, str(tmp_path / "corpus"))
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert submit_main([str(recipe)]) == 2
    assert "no cluster address: pass --address http://HOST:8265" in capsys.readouterr().err
    assert submit_main([str(recipe), "--address", "ray://127.0.0.1:10001"]) == 2
    assert "Ray Client address" in capsys.readouterr().err
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", UNREACHABLE)  # Ray's own jobs CLI variable is the default
    assert submit_main([str(recipe)]) == 2
    assert f"cannot reach Ray dashboard at {UNREACHABLE}" in capsys.readouterr().err


def test_jobs_commands_check_the_address(capsys):
    for argv in (["status", "raysubmit_x", "--address", UNREACHABLE], ["list", "--address", UNREACHABLE]):
        assert jobs_main(argv) == 2
        assert f"cannot reach Ray dashboard at {UNREACHABLE}" in capsys.readouterr().err


# --------------------------------------------------------------------------- fast: the job that would be sent


def test_plan_for_a_recipe_in_the_project(monkeypatch):
    monkeypatch.chdir(ROOT)
    env = {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000", "MEDVL_RUN_ROOT": "/mnt/medvl/runs",
           "RAY_AUTH_MODE": "disabled", "UNRELATED": "x"}
    plan = plan_job("jobs/digits_clip.yaml", ["optim.lr=3e-4", "train.num_workers=1"], environ=env,
                    submission_id="medvl-test-1")
    argv = shlex.split(plan.entrypoint)
    # runs/ is not uploaded, so the recipe's relative corpus becomes the absolute path it has here
    assert argv == ["python", "-m", "medvl.cli", "train", "jobs/digits_clip.yaml", "optim.lr=3e-4",
                    "train.num_workers=1", f"data.corpus={ROOT / 'runs' / 'corpora' / 'digits'}"]
    renv = plan.runtime_env
    assert renv["working_dir"] == str(ROOT)
    assert {".venv", "runs", ".git", "test-artifacts", "bench/out"} <= set(renv["excludes"]) == set(EXCLUDES)
    assert renv["py_modules"] == [str(ROOT / "platform" / "medvl")]
    assert renv["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert renv["env_vars"]["MEDVL_RUN_ROOT"] == "/mnt/medvl/runs"
    # the job runs with the cluster's own RAY_AUTH_MODE (forwarding ours could contradict a token cluster)
    assert "RAY_AUTH_MODE" not in renv["env_vars"] and "UNRELATED" not in renv["env_vars"]
    assert "pip" not in renv and plan.submission_id == "medvl-test-1" and plan.kind == "train"
    assert not any("run_root" in n for n in plan.notes)  # MEDVL_RUN_ROOT is set


def test_plan_for_a_recipe_outside_the_project(tmp_path):
    (tmp_path / "corpus").mkdir()
    recipe = _smoke_recipe(tmp_path, "corpus")  # relative to the recipe's directory
    plan = plan_job(str(recipe), [], python="/opt/venv/bin/python", environ={}, submission_id="sid")
    env = plan.runtime_env["env_vars"]
    assert env["MEDVL_SUBMIT_RECIPE"] == recipe.read_text()
    assert plan.entrypoint.startswith("mkdir -p .medvl-submit && printf")
    assert shlex.split(plan.command) == ["/opt/venv/bin/python", "-m", "medvl.cli", "train",
                                         ".medvl-submit/sid.yaml", f"data.corpus={tmp_path / 'corpus'}"]
    assert "MLFLOW_TRACKING_URI" not in env and "MEDVL_RUN_ROOT" not in env
    assert any("runtime.run_root is the relative path 'runs'" in n for n in plan.notes)


def test_staged_recipe_entrypoint_really_writes_the_file(tmp_path):
    """Run the staging part of the entrypoint in a shell, as Ray's job supervisor does (shell=True)."""
    recipe = _smoke_recipe(tmp_path, str(tmp_path / "corpus"))
    plan = plan_job(str(recipe), [], environ={}, submission_id="sid")
    stage = plan.entrypoint.split(" && ")[:2]
    work = tmp_path / "jobcwd"
    work.mkdir()
    subprocess.run(" && ".join(stage), shell=True, check=True, cwd=work,
                   env={**os.environ, **plan.runtime_env["env_vars"]})
    assert yaml.safe_load((work / ".medvl-submit" / "sid.yaml").read_text()) == yaml.safe_load(recipe.read_text())


def test_plan_pip_from_lock_leaves_out_ray(monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = plan_job("jobs/digits_clip.yaml", [], pip_from_lock=True, environ={})
    pkgs = plan.runtime_env["pip"]["packages"]
    assert "torch==2.14.1" in pkgs and "mlflow==3.17.2" in pkgs
    assert not any(p.split("==")[0].split("[")[0].lower() == "ray" for p in pkgs)


def _sweep(tmp_path: Path, base: str, **extra) -> Path:
    data = {"name": "lr-sweep", "base": base, "overrides": {"train.epochs": 1},
            "search_space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
            "metric": "val/zero_shot_accuracy", "mode": "max", "num_samples": 2,
            "scheduler": {"kind": "none"}, "resources": {"workers": 1, "cpus_per_worker": 1}}
    data.update(extra)
    return _write(tmp_path / "sweep.yaml", data)


def test_plan_for_a_sweep_outside_the_project(tmp_path, digits_corpus):
    """Sweep + base recipe in tmp: validated by medvl.tune, shipped as text, base and corpus made absolute."""
    (tmp_path / "recipes").mkdir()
    base = _smoke_recipe(tmp_path / "recipes", digits_corpus)
    sweep = _sweep(tmp_path, "recipes/smoke.yaml")
    plan = plan_job(str(sweep), ["num_samples=3"], environ={}, submission_id="sw")
    assert plan.kind == "tune" and plan.name == "lr-sweep"
    assert shlex.split(plan.command) == ["python", "-m", "medvl.cli", "tune", ".medvl-submit/sw.yaml",
                                         "num_samples=3", f"base={base}"]
    assert plan.runtime_env["env_vars"]["MEDVL_SUBMIT_RECIPE"] == sweep.read_text()


def test_plan_for_a_sweep_in_the_project(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    plan = plan_job("jobs/sweep_digits_small.yaml", ["num_samples=2", f"data.corpus={tmp_path}"], environ={})
    argv = shlex.split(plan.command)
    assert argv == ["python", "-m", "medvl.cli", "tune", "jobs/sweep_digits_small.yaml", "num_samples=2",
                    f"data.corpus={tmp_path}"]
    # no corpus in tmp_path: everything else is validated, the corpus check is left to the cluster
    assert any("not checked against the corpus" in n for n in plan.notes)


def test_bad_sweep_is_rejected_locally(tmp_path, digits_corpus, capsys):
    (tmp_path / "recipes").mkdir()
    _smoke_recipe(tmp_path / "recipes", digits_corpus)
    sweep = _sweep(tmp_path, "recipes/smoke.yaml",
                   search_space={"optim.lrr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}})
    assert submit_main([str(sweep), "--address", UNREACHABLE]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "cannot reach" not in err
    sweep = _sweep(tmp_path, "recipes/missing.yaml")
    assert submit_main([str(sweep), "--address", UNREACHABLE]) == 2
    assert "recipes/missing.yaml" in capsys.readouterr().err


def test_dry_run_prints_the_job_without_a_cluster(tmp_path, capsys):
    recipe = _smoke_recipe(tmp_path, str(tmp_path / "corpus"))
    assert submit_main([str(recipe), "--dry-run", "--submission-id", "dry-1", "optim.lr=1e-4"]) == 0
    out = capsys.readouterr().out
    assert '"submission_id": "dry-1"' in out and "optim.lr=1e-4" in out and '"py_modules"' in out


# --------------------------------------------------------------------------- slow: a real cluster


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """A real Ray head started by cluster/local/start-head.sh: own temp dir, HOME and ports; 8 logical CPUs.

    Stopped with `cluster/local/stop.sh --temp-dir`, which ends only this cluster's processes (`ray stop` would end
    every Ray instance on the machine, including other test runs').
    """
    temp_dir = tempfile.mkdtemp(prefix="medvl-ray-", dir="/tmp")  # short: Ray's Unix socket paths live under it
    home = tmp_path_factory.mktemp("ray-home")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # a fresh HOME: no ~/.ray/auth_token from an earlier ray.init() can turn token auth on
    env.update(HOME=str(home), RAY_AUTH_MODE="disabled", RAY=str(VENV_BIN / "ray"))
    gcs, dash, agent_http, agent_grpc, client, metrics, nm, om, renv = free_ports(9)
    cmd = [str(ROOT / "cluster" / "local" / "start-head.sh"), "--num-cpus", "8", "--temp-dir", temp_dir,
           "--port", str(gcs), "--dashboard-port", str(dash), "--",
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--ray-client-server-port", str(client), "--metrics-export-port", str(metrics),
           "--node-manager-port", str(nm), "--object-manager-port", str(om), "--runtime-env-agent-port", str(renv),
           "--object-store-memory", str(500 * 1024 * 1024)]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"start-head.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([str(ROOT / "cluster" / "local" / "stop.sh"), "--temp-dir", temp_dir], env=env,
                       capture_output=True, text=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submit_to_a_real_local_cluster(local_cluster, digits_corpus, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient
    address = local_cluster
    mlflow_db = tmp_path / "mlflow.db"
    run_root = tmp_path / "runs"
    # forwarded to the job by medvl submit (MLFLOW_TRACKING_URI / MEDVL_RUN_ROOT pass-through)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_db}")
    monkeypatch.setenv("MEDVL_RUN_ROOT", str(run_root))
    recipe = _smoke_recipe(tmp_path, digits_corpus)
    job_id = f"medvl-test-{os.getpid()}-{int(time.time())}"

    # `--python` left at `python`: start-head.sh put the venv first on the cluster's PATH
    rc = submit_main([str(recipe), "--address", address, "--submission-id", job_id])
    out, err = capsys.readouterr()
    assert rc == 0, f"job did not succeed:\n{out[-4000:]}\n{err[-4000:]}"
    assert f"job_id={job_id}" in out and f"[medvl] job {job_id} SUCCEEDED" in out
    assert "run 'submit-smoke' finished" in out  # the trainer's own output, streamed from the job log

    assert jobs_main(["status", job_id, "--address", address]) == 0
    assert f"{job_id}: SUCCEEDED" in capsys.readouterr().out
    assert jobs_main(["list", "--address", address]) == 0
    assert job_id in capsys.readouterr().out
    assert jobs_main(["logs", job_id, "--address", address, "--tail", "30"]) == 0
    assert "zero_shot_accuracy=" in capsys.readouterr().out

    # the job's MLflow run, read back from the store the job was pointed at
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
    exp = client.get_experiment_by_name("medvl")
    assert exp is not None, "the job created no 'medvl' experiment in the forwarded MLFLOW_TRACKING_URI"
    runs = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'submit-smoke'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert losses and all(m.value == m.value for m in losses)  # logged, not NaN
    # checkpoints went to the forwarded MEDVL_RUN_ROOT
    assert sorted((run_root / "ray" / "submit-smoke").glob("checkpoint_step=*")), f"no checkpoints in {run_root}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_failing_job_exits_1_with_the_log_tail(local_cluster, tmp_path, capsys):
    missing = tmp_path / "no-corpus-here"
    bad = _smoke_recipe(tmp_path, str(missing), name="submit-fails")
    assert submit_main([str(bad), "--address", local_cluster, "--no-logs"]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "last lines of the job's log" in err
    assert f"{missing}/manifest.json: corpus manifest not found" in err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stop_a_submitted_job(local_cluster, digits_corpus, tmp_path, capsys):
    recipe = _smoke_recipe(tmp_path, digits_corpus, name="submit-stop")
    stop_id = f"medvl-test-stop-{os.getpid()}-{int(time.time())}"
    assert submit_main([str(recipe), "--address", local_cluster, "--no-wait", "--submission-id", stop_id]) == 0
    assert jobs_main(["stop", stop_id, "--address", local_cluster, "--wait"]) == 0
    out = capsys.readouterr().out
    assert f"{stop_id}: STOPPED" in out or f"{stop_id} already" in out, out[-2000:]
    assert jobs_main(["status", stop_id, "--address", local_cluster]) == 0
    assert f"{stop_id}: STOPPED" in capsys.readouterr().out


def test_dependencies_default_to_the_cluster_image(tmp_path, capsys):
    """`--image-has-deps` is the default: no runtime_env pip unless --pip-from-lock (both options share a dest,
    and argparse used to take the store_false option's default, True)."""
    recipe = _smoke_recipe(tmp_path, str(tmp_path / "corpus"))
    assert submit_main([str(recipe), "--dry-run"]) == 0
    assert '"pip"' not in capsys.readouterr().out
    assert submit_main([str(recipe), "--dry-run", "--pip-from-lock"]) == 0
    assert '"pip"' in capsys.readouterr().out
