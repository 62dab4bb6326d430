"""Run a sweep: validate -> Ray -> parent MLflow run -> Tuner (OptunaSearch TPE + ASHA) -> summary.

    from medvl.tune.spec import load_sweep
    from medvl.tune.sweep import run_sweep
    outcome = run_sweep(load_sweep("jobs/sweep_digits_small.yaml", ["num_samples=2"]))

State lives in `<run_root>/sweeps/<name>/`: Tune's experiment state, `mlflow_parent_run_id`, `sweep.yaml` (the
resolved spec), `trial_events.jsonl` (trial start/end times) and `results.csv`. Running the same sweep again
restores it (`Tuner.restore`): finished trials are kept, unfinished ones restart, and each restarted trial's
Ray Train run resumes from its last checkpoint because the run name (`<sweep>-<trial id>`) is the same.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import yaml

from medvl.config import Recipe, resolve_launch, set_path, to_dict
from medvl.redact import redact_text
from medvl.track import runs
from medvl.tune.spec import (SweepError, SweepSpec, is_pipeline_sweep, scheduler_horizon, spec_to_dict,
                             validate_sweep)

log = logging.getLogger(__name__)

SPEC_FILE = "sweep.yaml"


@dataclass
class SweepOutcome:
    name: str
    sweep_dir: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    complete: bool
    """False when the sweep was interrupted (Ctrl+C / SIGUSR1): run the same command again to resume it."""
    resumed: bool
    table: Any
    """pandas DataFrame, one row per trial (also `results.csv`)."""
    best: Optional[dict]
    plots: dict[str, str]
    max_concurrent_trials: int
    cpus_per_trial: int
    wall_s: float


# --------------------------------------------------------------------------- pre-flight checks


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Fail fast (before `ray.init`, which retries for a long time) when a cluster address does not answer."""
    if address in ("auto", "local"):
        return
    u = urlparse(address if "://" in address else f"ray://{address}")
    if u.scheme in ("http", "https"):
        raise SweepError(f"runtime.ray_address {address!r} is an HTTP (dashboard / Jobs API) address; a sweep "
                         f"connects to the cluster's GCS address (host:6379) or a Ray Client address "
                         f"(ray://host:10001)")
    if not u.hostname or not u.port:
        raise SweepError(f"runtime.ray_address {address!r}: expected host:port, ray://host:port or auto")
    try:
        with socket.create_connection((u.hostname, u.port), timeout=timeout):
            pass
    except OSError as e:
        raise SweepError(f"runtime.ray_address {address!r} is not reachable ({e.strerror or e}); start the "
                         f"cluster (`ray start --head`) or unset runtime.ray_address / $RAY_ADDRESS to run on an "
                         f"embedded local Ray") from None


def cpus_per_trial(recipe: Recipe, spec: SweepSpec) -> int:
    """Driver + workers × CPUs each + room for the trial's Ray Data decode tasks. A pipeline trial: driver + the
    most any one of its stages uses (stages run one after another; a stage's resources include its data tasks)."""
    r = spec.resources
    if is_pipeline_sweep(recipe):
        return r.driver_cpus + int(math.ceil(recipe.peak_resources()["CPU"]))
    return r.driver_cpus + recipe.train.num_workers * recipe.train.cpus_per_worker + r.data_cpus


def trial_launch(recipe: Recipe) -> str:
    """How a (non-pipeline) sweep's trials train: `train.launch`, where `auto` (the default) is `in_process` for
    1-worker trials (each trains in its Tune actor: no Ray Train controller or worker group per trial; a trial
    whose actor dies is restarted by Tune and resumes from its checkpoint) and `workers` for data-parallel ones."""
    return resolve_launch(recipe.train, sweep_trial=True)


def gpus_per_trial(recipe: Recipe) -> float:
    if is_pipeline_sweep(recipe):
        return recipe.peak_resources()["GPU"]
    return float(recipe.train.num_workers) if recipe.train.use_gpu else 0.0


def plan_concurrency(recipe: Recipe, spec: SweepSpec, cluster: dict[str, float]) -> int:
    """How many trials fit at once (Train gang-schedules each trial's workers: more would wait and time out)."""
    need = cpus_per_trial(recipe, spec)
    have = float(cluster.get("CPU", 0))
    k = int(have // need)
    gpus = gpus_per_trial(recipe)
    if gpus:
        k = min(k, int(float(cluster.get("GPU", 0)) // gpus))
    if k < 1:
        what = f"{need} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
        raise SweepError(f"a trial needs {what} (resources: driver_cpus + workers × cpus_per_worker + "
                         f"data_cpus) but the cluster has {cluster}; lower resources.* or add nodes")
    k = min(k, spec.num_samples)
    if spec.resources.max_concurrent_trials:
        k = min(k, spec.resources.max_concurrent_trials)
    return k


def _check_same_spec(sweep_dir: Path, spec_dict: dict) -> bool:
    """Resuming needs the same spec; returns True if the sweep already exists."""
    f = sweep_dir / SPEC_FILE
    if not f.exists():
        return False
    old = yaml.safe_load(f.read_text()) or {}
    keys = sorted(k for k in set(old) | set(spec_dict) if k != "source" and old.get(k) != spec_dict.get(k))
    if keys:
        raise SweepError(f"sweep {spec_dict['name']!r} already exists in {sweep_dir} with a different spec "
                         f"(changed: {', '.join(keys)}); give it another name (name=...) or delete that folder")
    return True


# --------------------------------------------------------------------------- Tune objects


def build_searcher(spec: SweepSpec, space):
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.n_startup_trials,
                                         multivariate=True, group=space.conditional)
    storage = None
    if spec.optuna_storage:
        url = spec.optuna_storage
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            Path(url[len("sqlite:///"):]).resolve().parent.mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.RDBStorage(url)
    metric, mode = objectives(spec)  # several: a multi-objective study (TPE handles it)
    return OptunaSearch(space=space, metric=metric if len(metric) > 1 else metric[0],
                        mode=mode if len(mode) > 1 else mode[0], sampler=sampler, storage=storage,
                        study_name=spec.study_name or spec.sweep_name)


def objectives(spec: SweepSpec) -> tuple[list[str], list[str]]:
    """(metrics, modes): the primary objective first, then `objectives`."""
    return [spec.metric] + [o.metric for o in spec.objectives], [spec.mode] + [o.mode for o in spec.objectives]


def build_scheduler(spec: SweepSpec, horizon: int):
    from ray.tune.schedulers import ASHAScheduler
    s = spec.scheduler
    if s.kind == "none":
        return None
    # stop_last_trials=False: a trial that reaches max_t ends by itself (after finalize), not by a kill
    return ASHAScheduler(time_attr=s.time_attr, max_t=horizon, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, brackets=s.brackets if s.kind == "hyperband" else 1,
                         stop_last_trials=False)


def reuses_actors(spec: SweepSpec) -> bool:
    """Whether trials run in the Tune actors of finished trials (`resources.reuse_actors`; only when no scheduler
    stops trials early: see `ResourcesSpec.reuse_actors`)."""
    return bool(spec.resources.reuse_actors) and spec.scheduler.kind == "none"


# --------------------------------------------------------------------------- the sweep


def run_sweep(spec: SweepSpec, verbose: int = 1) -> SweepOutcome:
    """Run (or resume) a sweep to the end, or until interrupted; log its summary to the parent run."""
    import ray
    from ray import tune

    from medvl.train.launcher import ensure_ray
    from medvl.tune import tracking
    from medvl.tune.space import SearchSpace
    from medvl.tune.progress import SweepProgress
    from medvl.tune.trial import SweepContext, run_trial

    t0 = time.time()
    recipe = validate_sweep(spec)  # [1] every error that needs no cluster, before anything starts
    name = spec.sweep_name
    space = SearchSpace(spec.search_space)
    address = recipe.runtime.ray_address or os.environ.get("RAY_ADDRESS")
    if address and not ray.is_initialized():
        check_ray_address(address)

    run_root = runs.run_root(recipe)
    sweeps_root = run_root / "sweeps"
    sweep_dir = sweeps_root / name
    uri = runs.tracking_uri(recipe)
    spec_dict = spec_to_dict(spec)
    _check_same_spec(sweep_dir, spec_dict)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SPEC_FILE).write_text(yaml.safe_dump(spec_dict, sort_keys=False))

    # [2] an embedded local Ray gets logical-CPU headroom for 2 concurrent trials (see plan_concurrency)
    per_trial = cpus_per_trial(recipe, spec)
    local_cpus = recipe.runtime.num_cpus or max(4, 2 * (os.cpu_count() or 2), 2 * per_trial)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")  # trials start side by side
    # no dashboard: the workers of trials ASHA stops are released through the GCS (medvl.train.pg_cleaner)
    ensure_ray(dataclasses.replace(recipe, runtime=dataclasses.replace(recipe.runtime, num_cpus=local_cpus)))
    k = plan_concurrency(recipe, spec, ray.cluster_resources())

    parent = tracking.start_or_resume_parent(name, spec_dict, recipe, uri, sweep_dir)
    exp_id = runs._client(uri).get_run(parent).info.experiment_id
    pipeline = is_pipeline_sweep(recipe)
    if pipeline:
        from medvl.pipelines import pipeline_to_dict
        base = pipeline_to_dict(recipe)
    else:
        base = to_dict(recipe)
    set_path(base, "runtime.run_root", str(run_root))  # trial actors run elsewhere: absolute root, explicit URI
    inproc = False
    if not pipeline:  # the trials' recipes (and their MLflow params) say how they trained: no `auto` left
        set_path(base, "train.launch", launch := trial_launch(recipe))
        inproc = launch == "in_process"
    # The URI goes to the trials through their environment, never their recipe: from $MLFLOW_TRACKING_URI it may
    # carry a password, and every recipe key is logged as an MLflow param and saved with the run.
    env = {} if recipe.track.tracking_uri else {"MLFLOW_TRACKING_URI": uri}
    ctx = SweepContext(sweep=name, base=base, parent_run_id=parent, metric=spec.metric, env=env,
                       pipeline=pipeline, share_stages=spec.share_stages)
    # [3] each trial: 1 driver CPU here; its TorchTrainer reserves the workers' CPUs itself (train.launch:
    # in_process, the default for 1-worker trials, trains in the trial's actor, which then holds its worker's CPUs
    # and GPU too)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    {"CPU": spec.resources.driver_cpus +
                                     (recipe.train.cpus_per_worker if inproc else 0),
                                     **({"GPU": 1} if inproc and recipe.train.use_gpu else {})})
    horizon = scheduler_horizon(recipe, spec)
    resumed = tune.Tuner.can_restore(str(sweep_dir))
    if resumed:
        print(f"medvl tune: resuming sweep '{name}' from {sweep_dir}", flush=True)
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                search_alg=build_searcher(spec, space), scheduler=build_scheduler(spec, horizon),
                max_concurrent_trials=k, reuse_actors=reuses_actors(spec)),
            run_config=tune.RunConfig(
                name=name, storage_path=str(sweeps_root), verbose=verbose,
                # a trial whose actor died (node lost; in process, also a crash of its training) restarts and
                # resumes from its checkpoint; with Ray Train workers, worker losses are retried inside the trial
                # (train.max_failures); in process, a failed attempt is (medvl.train.inproc)
                failure_config=tune.FailureConfig(max_failures=spec.resources.trial_max_failures),
                callbacks=[tracking.SweepCallback(name, str(sweep_dir), str(run_root), uri, parent),
                           SweepProgress(spec.num_samples, spec.metric, spec.mode, horizon)]))
    how = "in their Tune actors" if inproc else "with Ray Train workers" if not pipeline else "as pipelines"
    print(f"medvl tune: sweep '{name}': {spec.num_samples} trials, up to {k} at a time ({per_trial} CPUs each "
          f"of {ray.cluster_resources().get('CPU', 0):.0f}), trained {how}; MLflow parent run {parent}", flush=True)
    client = runs._client(uri)
    try:
        grid = tuner.fit()
    except BaseException as e:
        tracking.close_dangling_children(uri, parent, "KILLED", f"sweep aborted: {type(e).__name__}")
        client.set_tag(parent, "medvl.end_reason", redact_text(f"{type(e).__name__}: {e}")[:5000])
        client.set_terminated(parent, status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise

    trials = list(grid._experiment_analysis.trials)
    done = sum(tracking.trial_state(t) in ("TERMINATED", "ERROR") for t in trials)
    complete = done >= spec.num_samples
    tracking.close_dangling_children(uri, parent, "KILLED", "sweep ended" if complete else "sweep interrupted")
    metrics, modes = objectives(spec)
    table = tracking.trials_table(trials, list(space.params), metrics + ([spec.truth] if spec.truth else []),
                                  horizon, uri, parent, sweep_dir)
    best = tracking.best_row(table, spec.metric, spec.mode)
    plots = tracking.log_summary(uri, parent, table, best, space, metrics, modes, sweep_dir, complete,
                                 truth=(spec.truth, spec.truth_mode) if spec.truth else None)
    if complete:
        status = "FINISHED" if best is not None else "FAILED"
    else:
        status = "KILLED"
        client.set_tag(parent, "medvl.end_reason", "interrupted; run the same `medvl tune` command to resume")
    client.set_terminated(parent, status=status)
    return SweepOutcome(name, sweep_dir, uri, exp_id, parent, complete, resumed, table, best, plots, k, per_trial,
                        time.time() - t0)
