"""Driver side of a training job: Ray, the MLflow run, the data plan, the TorchTrainer, and what happens after
`fit()` (loss-curve plot, final model).

Re-running the same recipe with the same run name resumes: Ray Train V2 restores the run's checkpoint state
from `<run_root>/ray/<run name>/`, the job reuses its MLflow run (id kept in `<run_root>/jobs/<name>/`), and the
workers continue at the exact data position of the checkpoint (`medvl.train.worker`). A recipe that differs from
the one the run started with (`<run_root>/jobs/<name>/recipe.yaml`) is refused unless
`runtime.allow_recipe_change` (`medvl train --allow-recipe-change`); the change is then logged in the run.
The data plan (`medvl.data.stream.StreamPlan`: the split's Parquet row groups, read from the shard footers here
once) travels to the workers in the loop config; each rank streams its own part of it (no `datasets=`).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from medvl.config import Recipe, RuntimeConfig, to_dict
from medvl.data.corpus import load_manifest
from medvl.raynode import init_local
from medvl.track import runs

log = logging.getLogger(__name__)
T = TypeVar("T")


def _omp_env() -> dict[str, str]:
    """OpenMP's wait policy for embedded Ray's workers. The train workers share the cores with Ray Data's decode
    tasks and Ray's own processes: libgomp's default (spin ~300k iterations before sleeping) steals those cores,
    and OMP_WAIT_POLICY=PASSIVE (never spin) makes the second torch thread sleep between every two ops of a model
    of many small ops. A short spin (GOMP_SPINCOUNT=20000) covers the gaps between ops and then yields. Measured
    in one invocation of bench/throughput on 2 cores (2026-12-02): PASSIVE 223.4 samples/s, spin 20000 233.3
    (+4%; median windows +7%); earlier, default spin 211.6 vs PASSIVE 230.2. A user's OMP_WAIT_POLICY or
    GOMP_SPINCOUNT wins."""
    if os.environ.get("OMP_WAIT_POLICY"):
        return {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}
    return {"GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT") or "20000"}


def _one_machine_env() -> dict[str, str]:
    """Ray Train settings for an embedded Ray, whose only node is this machine. Ray Train starts a
    `PreemptionWatcher` actor (one more Python process) with every worker group, to act on a cloud node's drain
    notice; an embedded Ray has no such notices, and on a small machine the watcher's process start competes with
    the train worker's own imports for the cores. A user's RAY_TRAIN_ENABLE_PREEMPTION_WATCHER wins."""
    return {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER") or "0"}


def ensure_ray(recipe: Optional[Any] = None, dashboard: bool = False) -> None:
    """Connect to `runtime.ray_address` / $RAY_ADDRESS, or start an embedded local Ray (with the dashboard
    only when `dashboard`; see below). `recipe`: a recipe or a pipeline (what has a `runtime` section), or only
    that section."""
    import ray
    if ray.is_initialized():
        return
    # a RuntimeConfig, or anything that has one as `.runtime` (a Recipe, a pipeline)
    runtime = recipe if recipe is None or isinstance(recipe, RuntimeConfig) else recipe.runtime
    from medvl.redact import default_ray_auth_mode
    os.environ["RAY_AUTH_MODE"] = default_ray_auth_mode()  # `token` when RAY_AUTH_TOKEN(_PATH) is set
    addr = (runtime.ray_address if runtime else None) or os.environ.get("RAY_ADDRESS")
    from medvl.track.console import verbose
    # Worker and driver-side Ray output (Train's per-report lines, Ray Data's progress, the workers' warnings)
    # stays in the session's log files (`link_ray_logs` points the run directory at them); `medvl -v` streams it.
    quiet = {"log_to_driver": verbose()}
    if addr:
        ray.init(address=addr, logging_level=logging.WARNING, **quiet)
        return
    cpus = (runtime.num_cpus if runtime else None) or max(4, 2 * (os.cpu_count() or 2))
    # Logical CPUs above the core count give Ray Data's decode tasks and the Train controller room next to
    # the train workers on a small machine (the workers still set their own torch thread counts).
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # No dashboard by default (measured: its processes take ~2% of this 2-core machine, and training samples/s).
    # Ray Train V2's PlacementGroupCleaner needed its State API to notice a dead TrainController (without it, it
    # warned every second and every trial ASHA stopped leaked its workers' CPUs): medvl's trainer asks the GCS
    # instead (`medvl.train.pg_cleaner`), so sweeps run without it too. `dashboard=True` is for people who want it.
    # The workers' settings go into the environment that the embedded node's processes inherit, not into a job
    # `runtime_env`: Ray matches idle workers to tasks and actors by runtime_env, and the workers it prestarts when
    # the node starts have none. With a job runtime_env those prestarted workers never ran anything (they only
    # polled, ~150 wake-ups a second each) and every task and actor, Ray Data's decode tasks included, waited for a
    # new Python process. They go to the raylet alone (its workers and agents inherit them): the driver's own
    # environment never holds them, so a thread of the driver that loads libgomp meanwhile keeps its defaults.
    node_env = {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"],
                "RAY_DATA_DISABLE_PROGRESS_BARS": os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"],
                "PYTHONWARNINGS": "ignore::DeprecationWarning", **_omp_env(), **_one_machine_env()}
    for attempt in (1, 2):
        try:
            # node_env goes to the raylet only; the agent's HTTP port is chosen by the OS (see medvl.raynode)
            init_local(node_env, num_cpus=cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                       logging_level=logging.WARNING, **quiet)
            return
        except Exception as e:  # noqa: BLE001
            # [faults] Ray gives a new node's raylet a fixed 30 s to register; an overloaded machine can miss it
            # ("The current node timed out during startup"). Start over once instead of failing the command.
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            log.warning("embedded Ray did not start in time (%s); starting it again", e)
            ray.shutdown()


def load_while_ray_starts(load: Callable[[], T], runtime: Optional[RuntimeConfig]) -> T:
    """`load()` in a helper thread while this thread starts Ray (`ensure_ray(runtime)`), then MLflow's client
    modules in that thread too; returns what `load` returned, or raises its error (before Ray's).

    Why: loading a recipe imports torch, open_clip and every method (about 3.3 s of one core here), and
    starting an embedded Ray is mostly waiting for the node's processes, which run on the other cores. Side by
    side, `medvl train` reaches its first MLflow call in 6.47 s instead of 7.71 s on this 2-core machine
    (`./dev bench ray_start`, medians): less than the 2.6 s Ray's start takes alone, because the loading shares
    the cores with Ray's own starting processes. Ray starts in this (the main) thread, as `ray.init` expects; the
    helper thread only imports and validates. A recipe that does not load has then started Ray for nothing (it
    stops when the command exits)."""
    import threading
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            out["value"] = load()
            runs.import_client_modules()
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            out.setdefault("error", e)

    helper = threading.Thread(target=work, name="medvl-load-recipe", daemon=True)
    helper.start()
    try:
        ensure_ray(runtime)
    except BaseException:
        helper.join()
        if "error" in out:  # the recipe's own error is the one to fix first
            raise out["error"] from None
        raise
    helper.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def quiet_ray_data() -> None:
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False  # the per-dataset stats summary ("execution finished ...")


def link_ray_logs(run_dir: Path) -> Optional[Path]:
    """Point `<run_dir>/ray-logs` at this Ray session's log directory (workers, controller, raylet) and return
    it; None when the driver is connected to a remote cluster (its logs are on the cluster: `ray job logs`,
    the dashboard)."""
    try:
        import ray._private.worker as rw
        node = rw._global_node
        logs = Path(node.get_logs_dir_path()) if node is not None else None
    except Exception:  # noqa: BLE001 - private API: no link rather than no run
        return None
    if logs is None or not logs.is_dir():
        return None
    link = run_dir / "ray-logs"
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(logs, target_is_directory=True)
    except OSError:
        return logs
    return link


@dataclass
class Job:
    recipe: Recipe
    run_dir: Path
    storage_path: Path
    tracking_uri: str
    mlflow_run_id: str
    steps_per_epoch: int
    total_steps: int
    """Planned steps (the LR schedule's length); the run reports the step it actually reached (fewer when
    corrupt rows outran a rank's reserve)."""
    plan: Any = None
    """The data plan (`medvl.data.stream.StreamPlan`) the workers stream."""


RESUME_SAFE_KEYS = ("runtime.", "track.log_model", "track.register_model", "track.pictures",
                    "track.tracking_uri", "track.experiment",
                    "train.max_failures", "train.launch",
                    "train.keep_checkpoints", "train.log_every", "train.ckpt_every", "train.torch_threads",
                    "train.cpus_per_worker", "data.prefetch_batches", "data.decode_tasks",
                    "data.decode_batch_size", "data.decoded_buffer_mb", "data.decoded_block_mb",
                    "eval.batch_size", "eval.max_memory_mb")
"""Recipe keys that change how fast or where a run goes, never what it trains on: they may change on resume."""


def recipe_changes(old: dict, new: Recipe) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every key that differs and may not change silently on resume."""
    from medvl.config import ConfigError, flatten, recipe_from_dict
    try:
        old_flat = flatten(to_dict(recipe_from_dict(old)))
    except (ConfigError, TypeError, ValueError):  # written by another medvl version: compare what is there
        old_flat = flatten(old)
    new_flat = flatten(to_dict(new))
    out = {}
    for k in sorted(set(old_flat) | set(new_flat)):
        if k.startswith(RESUME_SAFE_KEYS):
            continue
        a, b = old_flat.get(k, "<absent>"), new_flat.get(k, "<absent>")
        if a != b:
            out[k] = (a, b)
    return out


def check_resume(recipe: Recipe, run_dir: Path, storage_dir: Path) -> dict[str, tuple[Any, Any]]:
    """When `run_dir` belongs to a run that already started, the changes of its recipe; refuses them unless
    `runtime.allow_recipe_change`."""
    import yaml

    from medvl.config import ConfigError
    old_file = run_dir / "recipe.yaml"
    started = (run_dir / runs.RUN_ID_FILE).exists() or storage_dir.exists()
    if not (started and old_file.exists()):
        return {}
    changes = recipe_changes(yaml.safe_load(old_file.read_text()) or {}, recipe)
    if changes and not recipe.runtime.allow_recipe_change:
        listing = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise ConfigError(
            f"run '{recipe.run_name}' already exists with another recipe ({old_file}); resuming it would change:\n"
            f"{listing}\nResume it with its own recipe, choose another track.run_name, or continue it with the new "
            f"values: medvl train ... --allow-recipe-change (runtime.allow_recipe_change=true)")
    return changes


def prepare_job(recipe: Recipe, parent_run_id: Optional[str] = None, tags: Optional[dict] = None) -> Job:
    from medvl.config import ConfigError
    from medvl.data.stream import plan_for
    root = runs.run_root(recipe)
    run_dir = root / "jobs" / recipe.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    changes = check_resume(recipe, run_dir, root / "ray" / recipe.run_name)
    manifest = load_manifest(recipe.data.corpus)  # a clear error for a missing corpus before anything else
    if manifest.rows(recipe.data.train_split) == 0:  # [faults] an empty corpus is an error before anything starts
        from medvl.data.corpus import CorpusError
        raise CorpusError(f"{recipe.data.corpus}: split {recipe.data.train_split!r} has no rows (an empty corpus; "
                          f"see its rejects.jsonl for what ingest refused)")
    plan = plan_for(recipe.data, recipe.train.seed, recipe.train.num_workers)
    steps_per_epoch = plan.steps_per_epoch(recipe.data.batch_size)
    if steps_per_epoch < 1:
        raise ConfigError(f"data.batch_size ({recipe.data.batch_size}) is larger than the {plan.rows} rows of split "
                          f"{recipe.data.train_split!r} in {recipe.data.corpus}")
    total = steps_per_epoch * recipe.train.epochs
    if recipe.train.max_steps:
        total = min(total, recipe.train.max_steps)
    uri = runs.tracking_uri(recipe)
    runs.wait_for_tracking(uri, recipe.track.outage_wait_s, "to start the run")  # [faults] a clear error, not a hang
    run_id = runs.start_or_resume_run(recipe, run_dir, parent_run_id, tags)
    if changes:
        runs.log_recipe_change(uri, run_id, recipe, changes, run_dir)
        log.warning("run '%s' resumes with a changed recipe: %s", recipe.run_name,
                    ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    (run_dir / "recipe.yaml").write_text(runs.safe_yaml(recipe))  # the fully resolved config, with every run
    try:  # [faults] metrics an earlier attempt (killed driver, outage) left in the run's journal
        runs.sync_journal(run_dir, uri)
    except runs.TrackingUnavailable as e:
        log.warning("%s", e)
    try:
        runs.log_dataset(run_id, uri, recipe.data.corpus, recipe.data.train_split, "training")
    except Exception as e:  # noqa: BLE001 - lineage is best effort, the manifest artifact is the fallback
        log.warning("could not log dataset lineage: %s", e)
    return Job(recipe, run_dir, root / "ray", uri, run_id, steps_per_epoch, total, plan)


AUDIT_ENV = "MEDVL_AUDIT_SAMPLES"
"""Audit mode: when set (a directory) on the driver, every rank records the sample ids of each step it trains."""


def build_trainer(job: Job, callbacks: Optional[list] = None, timeline=None):
    """The Ray Train trainer of a prepared job; `timeline` (medvl.track.timeline.Timeline) carries the driver's
    start-up marks to rank 0, which completes and reports them."""
    import ray
    import ray.train

    from medvl.train.worker import train_fn_per_worker

    r = job.recipe
    from medvl.data.stream import skip_counter, start_ray_data_actors
    from medvl.train import faults
    counter = faults.counter_name(job.mlflow_run_id)  # ids and reasons of skipped rows; released after the run
    skip_counter(counter, namespace=faults.COUNTER_NAMESPACE)
    quiet_ray_data()
    start_ray_data_actors()  # their processes start beside the worker group's, not after it
    # No `datasets=`: each rank builds its own stream from the plan (exact positions; see medvl.data.stream).
    from medvl.train.pg_cleaner import MedvlTorchTrainer
    if timeline is not None:
        timeline.mark("job")
    return MedvlTorchTrainer(  # TorchTrainer whose placement-group cleaner asks the GCS (see pg_cleaner)
        train_fn_per_worker,
        train_loop_config={"recipe": to_dict(r), "mlflow_uri": job.tracking_uri,
                           "mlflow_run_id": job.mlflow_run_id, "steps_per_epoch": job.steps_per_epoch,
                           "total_steps": job.total_steps, "plan": job.plan.to_dict(),
                           "storage_dir": str(job.storage_path / r.run_name),
                           "audit_dir": os.environ.get(AUDIT_ENV) or None,
                           "metrics_journal": str(runs.journal_path(job.run_dir)),
                           "counter": [counter, faults.COUNTER_NAMESPACE],
                           "in_process": r.train.launch == "in_process",
                           "timeline": None if timeline is None else
                           {"marks": dict(timeline.marks), "token": timeline.token}},
        # train.launch: in_process = Ray Train's local mode (num_workers=0): the function runs in this process
        scaling_config=ray.train.ScalingConfig(num_workers=0 if r.train.launch == "in_process" else
                                               r.train.num_workers, use_gpu=r.train.use_gpu,
                                               resources_per_worker={"CPU": r.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=r.run_name, storage_path=str(job.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=r.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=r.train.keep_checkpoints),
            callbacks=callbacks or None),
    )


def fit(trainer, job: Job):
    """`trainer.fit()`; with `train.launch: in_process`, through `medvl.train.inproc` (checkpoint registry,
    retries up to `train.max_failures`, the run's callbacks)."""
    t = job.recipe.train
    if t.launch != "in_process":
        return trainer.fit()
    if t.use_gpu:
        import torch
        if not torch.cuda.is_available():
            from medvl.config import ConfigError
            raise ConfigError("train.use_gpu with train.launch: in_process trains in this process, which sees no "
                              "GPU; run it on a GPU machine, or use train.launch: workers (Ray places the worker)")
    from medvl.train import inproc
    return inproc.fit(trainer, str(job.storage_path), job.recipe.run_name, t.keep_checkpoints, t.max_failures,
                      trainer.run_config.callbacks or [])


def finalize(job: Job, result, status: str = "FINISHED") -> dict[str, Any]:
    """Plot the curves, log the final model, close the MLflow run; return the final metrics.

    [faults] A run the workers stopped (non-finite losses) raises `TrainingAborted`. When MLflow is unreachable
    for `track.outage_wait_s`, the training is kept and `medvl sync-metrics` finishes the run later."""
    from medvl.train import faults
    faults.raise_if_aborted(job, result)
    metrics = dict(result.metrics or {}) if result is not None else {}
    summary = {k: v for k, v in metrics.items() if k in ("step", "epoch", "val/zero_shot_accuracy")}
    try:
        wait = job.recipe.track.outage_wait_s
        runs.wait_for_tracking(job.tracking_uri, wait, "to finalize the run")
        runs.sync_journal(job.run_dir, job.tracking_uri, wait)
        _finalize_in_mlflow(job, result, status, summary)
    except Exception as e:  # noqa: BLE001
        if runs._probe(job.tracking_uri) is None and not isinstance(e, runs.TrackingUnavailable):
            raise  # MLflow answers: a real error
        faults.defer_finalize(job, result, status, summary, e)
    return metrics


def _finalize_in_mlflow(job: Job, result, status: str, summary: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        plot = runs.plot_loss_curve(job.tracking_uri, job.mlflow_run_id, Path(d) / "loss_curve.png")
        if plot:
            runs._client(job.tracking_uri).log_artifact(job.mlflow_run_id, str(plot), artifact_path="plots")
    ckpt = getattr(result, "checkpoint", None)
    if job.recipe.track.log_model and ckpt is not None:
        log_final_model(job, ckpt)
    runs.finish_run(job.tracking_uri, job.mlflow_run_id, status, summary)


def load_model_from_checkpoint(recipe: Recipe, ckpt_dir: str):
    """(method, model in eval mode, checkpoint state) for a checkpoint directory of this recipe's run; the
    checkpoint is verified against its checksums and loaded without arbitrary unpickling."""
    from medvl.methods import resolve_method
    from medvl.train.checkpoint import load_checkpoint
    state = load_checkpoint(ckpt_dir, map_location="cpu")
    method = resolve_method(recipe)
    model = method.build_model()
    model.load_state_dict(state["model"])
    method.load_state_dict(state.get("method") or {})
    return method, model.eval(), state


def log_final_model(job: Job, ckpt) -> None:
    with ckpt.as_directory() as d:
        method, model, _ = load_model_from_checkpoint(job.recipe, d)
    method.export(model, job.tracking_uri, job.mlflow_run_id)
    if job.recipe.track.register_model:  # a new version in the Model Registry (issue 17)
        from medvl.methods.embedding_pyfunc import register_run_model
        v = register_run_model(job.tracking_uri, job.mlflow_run_id, job.recipe.track.register_model)
        print(f"medvl: registered model {job.recipe.track.register_model!r} version {v}", flush=True)


def run_training(recipe: Recipe, parent_run_id: Optional[str] = None, callbacks: Optional[list] = None,
                 tags: Optional[dict] = None, progress_label: str = "") -> tuple[Job, dict[str, Any]]:
    """Run one training job end to end (used by `medvl train`, `medvl compare` and pipeline train stages), with
    the console's progress display (`medvl.track.console`) while it trains."""
    import uuid

    from medvl.track.timeline import Timeline
    from medvl.train import faults
    timeline = Timeline.for_driver(uuid.uuid4().hex)  # start-up phases, reported by rank 0 after its first step
    timeline.mark("imports")
    ensure_ray(recipe)
    timeline.mark("ray")
    faults.check_cluster_fits(recipe)  # [faults] more workers than an embedded Ray has: fail now, not hang
    job = prepare_job(recipe, parent_run_id, tags)
    trainer = build_trainer(job, callbacks, timeline)
    from medvl.track.console import TrainProgress, verbose
    logs = link_ray_logs(job.run_dir)
    if logs is not None and not verbose():
        print(f"medvl: Ray's logs (workers, controller) of run '{recipe.run_name}': {logs}   (-v streams them)",
              flush=True)
    try:
        try:
            with TrainProgress(runs.journal_path(job.run_dir), job.mlflow_run_id, job.total_steps,
                               job.steps_per_epoch, recipe.train.epochs, recipe.data.batch_size,
                               label=progress_label, logs_dir=None if verbose() or logs is None
                               else logs.resolve()):
                result = fit(trainer, job)
        except BaseException as e:
            try:
                runs.finish_run(job.tracking_uri, job.mlflow_run_id, "FAILED",
                                {"end_reason": f"{type(e).__name__}: {e}"})
            except Exception as e2:  # noqa: BLE001 - MLflow down too: keep the original error
                from medvl.redact import redact_text
                log.warning("could not mark MLflow run %s failed: %s", job.mlflow_run_id, redact_text(e2))
            raise
        return job, finalize(job, result)
    finally:  # [faults] the detached skip counter of this run (sweeps release theirs per trial)
        faults.release_skip_counter(job.mlflow_run_id, job.tracking_uri)


def expected_steps(recipe: Recipe) -> int:
    rows = load_manifest(recipe.data.corpus).rows(recipe.data.train_split)
    total = (rows // recipe.data.batch_size) * recipe.train.epochs
    return min(total, recipe.train.max_steps) if recipe.train.max_steps else total


__all__ = ["ensure_ray", "prepare_job", "build_trainer", "fit", "finalize", "run_training", "Job", "math",
           "check_resume", "recipe_changes", "load_model_from_checkpoint", "expected_steps"]
