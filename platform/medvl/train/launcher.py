"""Driver side of a training job: Ray, the MLflow run, the streaming dataset, the TorchTrainer, and what
happens after `fit()` (loss-curve plot, final model).

Re-running the same recipe with the same run name resumes: Ray Train V2 restores the run's checkpoint state
from `<run_root>/ray/<run name>/`, and the job reuses its MLflow run (id kept in `<run_root>/jobs/<name>/`).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from medvl.config import Recipe, to_dict
from medvl.data.corpus import load_manifest
from medvl.track import runs

log = logging.getLogger(__name__)


def ensure_ray(recipe: Optional[Recipe] = None, dashboard: bool = False) -> None:
    """Connect to `runtime.ray_address` / $RAY_ADDRESS, or start an embedded local Ray (with the dashboard
    when `dashboard`: sweeps need it, see below)."""
    import ray
    if ray.is_initialized():
        return
    from medvl.redact import default_ray_auth_mode
    os.environ["RAY_AUTH_MODE"] = default_ray_auth_mode()  # `token` when RAY_AUTH_TOKEN(_PATH) is set
    addr = (recipe.runtime.ray_address if recipe else None) or os.environ.get("RAY_ADDRESS")
    if addr:
        ray.init(address=addr, logging_level=logging.WARNING)
        return
    cpus = (recipe.runtime.num_cpus if recipe else None) or max(4, 2 * (os.cpu_count() or 2))
    # Logical CPUs above the core count give Ray Data's decode tasks and the Train controller room next to
    # the train workers on a small machine (the workers still set their own torch thread counts).
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # The dashboard serves the State API, which Ray Train V2's PlacementGroupCleaner polls to notice that a
    # TrainController died: without it, every trial ASHA stops leaks its worker placement group (its CPUs stay
    # reserved) until a sweep starves and hangs. A single training job's controller is never killed from outside
    # (Ray goes down with the driver), so it runs without the dashboard's processes (measured: ~2% of this
    # 2-core machine, and fewer training samples/s).
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                     logging_level=logging.WARNING,
                     runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"],
                                               "RAY_DATA_DISABLE_PROGRESS_BARS":
                                                   os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"],
                                               "PYTHONWARNINGS": "ignore::DeprecationWarning"}})
            return
        except Exception as e:  # noqa: BLE001
            # [faults] Ray gives a new node's raylet a fixed 30 s to register; an overloaded machine can miss it
            # ("The current node timed out during startup"). Start over once instead of failing the command.
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            log.warning("embedded Ray did not start in time (%s); starting it again", e)
            ray.shutdown()


def quiet_ray_data() -> None:
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


@dataclass
class Job:
    recipe: Recipe
    run_dir: Path
    storage_path: Path
    tracking_uri: str
    mlflow_run_id: str
    steps_per_epoch: int
    total_steps: int


def prepare_job(recipe: Recipe, parent_run_id: Optional[str] = None, tags: Optional[dict] = None) -> Job:
    root = runs.run_root(recipe)
    run_dir = root / "jobs" / recipe.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(runs.safe_yaml(recipe))  # the fully resolved config, with every run
    manifest = load_manifest(recipe.data.corpus)
    rows = manifest.rows(recipe.data.train_split)
    steps_per_epoch = rows // recipe.data.batch_size
    if rows == 0:  # [faults] an empty corpus is an error before anything starts
        from medvl.data.corpus import CorpusError
        raise CorpusError(f"{recipe.data.corpus}: split {recipe.data.train_split!r} has no rows (an empty corpus; "
                          f"see its rejects.jsonl for what ingest refused)")
    if steps_per_epoch < 1:
        from medvl.config import ConfigError
        raise ConfigError(f"data.batch_size ({recipe.data.batch_size}) is larger than the "
                          f"{rows} rows of split {recipe.data.train_split!r} in {recipe.data.corpus}")
    total = steps_per_epoch * recipe.train.epochs
    if recipe.train.max_steps:
        total = min(total, recipe.train.max_steps)
    uri = runs.tracking_uri(recipe)
    runs.wait_for_tracking(uri, recipe.track.outage_wait_s, "to start the run")  # [faults] a clear error, not a hang
    run_id = runs.start_or_resume_run(recipe, run_dir, parent_run_id, tags)
    try:  # [faults] metrics an earlier attempt (killed driver, outage) left in the run's journal
        runs.sync_journal(run_dir, uri)
    except runs.TrackingUnavailable as e:
        log.warning("%s", e)
    try:
        runs.log_dataset(run_id, uri, recipe.data.corpus, recipe.data.train_split, "training")
    except Exception as e:  # noqa: BLE001 - lineage is best effort, the manifest artifact is the fallback
        log.warning("could not log dataset lineage: %s", e)
    return Job(recipe, run_dir, root / "ray", uri, run_id, steps_per_epoch, total)


def build_trainer(job: Job, callbacks: Optional[list] = None):
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from medvl.data.stream import skip_counter
    from medvl.train.worker import train_fn_per_worker

    r = job.recipe
    counter_name = f"medvl-skips-{job.mlflow_run_id}"  # released by train.faults.release_skip_counter
    skip_counter(counter_name, namespace="medvl")
    storage_dir = job.storage_path / r.run_name
    factory = TrainStreamFactory(to_dict(r), str(storage_dir), counter_name, namespace="medvl")
    quiet_ray_data()
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"recipe": to_dict(r), "mlflow_uri": job.tracking_uri,
                           "mlflow_run_id": job.mlflow_run_id, "counter_name": counter_name,
                           "counter_namespace": "medvl", "steps_per_epoch": job.steps_per_epoch,
                           "total_steps": job.total_steps,
                           "metrics_journal": str(runs.journal_path(job.run_dir))},
        scaling_config=ray.train.ScalingConfig(num_workers=r.train.num_workers, use_gpu=r.train.use_gpu,
                                               resources_per_worker={"CPU": r.train.cpus_per_worker}),
        datasets={"train": factory},
        run_config=ray.train.RunConfig(
            name=r.run_name, storage_path=str(job.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=r.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=r.train.keep_checkpoints),
            callbacks=callbacks or None),
    )


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


class TrainStreamFactory:
    """Passed to TorchTrainer(datasets={"train": factory}); Ray Train calls it at every worker-group start,
    so after a failure the stream restarts at the epoch of the newest checkpoint (the worker then skips the
    batches of that epoch it already trained on). The method's decoder does the per-row work."""

    def __init__(self, recipe_dict: dict, storage_dir: str, counter_name: Optional[str],
                 namespace: Optional[str] = None):
        self.recipe_dict, self.storage_dir = recipe_dict, storage_dir
        self.counter_name, self.namespace = counter_name, namespace

    def __call__(self):
        from medvl.config import recipe_from_dict
        from medvl.data.stream import build_dataset
        from medvl.methods import resolve_method
        from medvl.train.worker import latest_position
        r = recipe_from_dict(self.recipe_dict)
        pos = latest_position(self.storage_dir) or {"epoch": 0}
        epochs = range(min(pos["epoch"], r.train.epochs - 1), r.train.epochs)
        return build_dataset(r.data, resolve_method(r).decoder(train=True), r.data.train_split, train=True,
                             seed=r.train.seed, epochs=epochs, counter_name=self.counter_name,
                             namespace=self.namespace)


def load_model_from_checkpoint(recipe: Recipe, ckpt_dir: str):
    """(method, model in eval mode, checkpoint state) for a checkpoint directory of this recipe's run."""
    import torch

    from medvl.methods import resolve_method
    from medvl.train.worker import STATE_FILE
    method = resolve_method(recipe)
    model = method.build_model()
    state = torch.load(os.path.join(ckpt_dir, STATE_FILE), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    method.load_state_dict(state.get("method") or {})
    return method, model.eval(), state


def log_final_model(job: Job, ckpt) -> None:
    with ckpt.as_directory() as d:
        method, model, _ = load_model_from_checkpoint(job.recipe, d)
    method.export(model, job.tracking_uri, job.mlflow_run_id)


def run_training(recipe: Recipe, parent_run_id: Optional[str] = None, callbacks: Optional[list] = None,
                 tags: Optional[dict] = None) -> tuple[Job, dict[str, Any]]:
    """Run one training job end to end (used by `medvl train` and by each sweep trial)."""
    from medvl.train import faults
    ensure_ray(recipe)
    faults.check_cluster_fits(recipe)  # [faults] more workers than an embedded Ray has: fail now, not hang
    job = prepare_job(recipe, parent_run_id, tags)
    trainer = build_trainer(job, callbacks)
    try:
        try:
            result = trainer.fit()
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


__all__ = ["ensure_ray", "prepare_job", "build_trainer", "finalize", "run_training", "Job", "math"]
