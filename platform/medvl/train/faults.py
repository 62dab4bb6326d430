"""What a training job does when something goes wrong that is not a crash: non-finite losses, a cluster too small
for the job, a tracking server that is down when the run ends, the per-run skip counter.

- `NonFiniteGuard` (every rank): counts the steps `train_step` skipped because a loss or gradient norm was NaN/inf on
  some rank (`train/nonfinite_steps`); after `train.max_nonfinite_steps` in a row every rank returns an abort value
  from the train function (no exception inside the workers: Ray Train would restart the group from the last
  checkpoint and hit the same NaNs again). The driver turns rank 0's return value (`Result.return_value`) into
  `TrainingAborted` (`raise_if_aborted`): the MLflow run ends FAILED with the reason, and the last good checkpoint
  is kept and named.
- `check_cluster_fits`: more workers than an embedded (fixed-size) Ray has fails at once with the numbers instead
  of waiting for resources that never come.
- `defer_finalize` / `complete_finalize`: when MLflow is still down after `track.outage_wait_s` at the end of a
  run, the training is kept (checkpoints, metric journal) and `medvl sync-metrics` finishes the run later.
- `release_skip_counter`: the detached per-run `SkipCounter` actor is killed after every run (it used to leak one
  actor per `medvl train`); its count and first examples are logged to the run first.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from medvl.redact import redact_text

log = logging.getLogger(__name__)

ABORT_KEY = "medvl/abort"
"""Metric key of the result the workers report when they stop a run on purpose (its value: the reason)."""
PENDING_FILE = "finalize_pending.json"
COUNTER_PREFIX = "medvl-skips-"
COUNTER_NAMESPACE = "medvl"


class TrainingAborted(RuntimeError):
    """The run stopped itself (non-finite losses); the message says why and where the last good checkpoint is."""


# --------------------------------------------------------------------------- non-finite losses (workers)


class NonFiniteGuard:
    """Counts skipped (non-finite) steps; identical on every rank because the skip decision is all-reduced."""

    def __init__(self, max_in_a_row: int, total: int = 0):
        self.max_in_a_row = max_in_a_row
        self.total = total
        self.in_a_row = 0
        self.first_of_run: Optional[int] = None

    def update(self, skipped: bool, step: int) -> bool:
        """Record the outcome of step `step`; True when the run must stop."""
        if not skipped:
            self.in_a_row = 0
            return False
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row == 1:
            self.first_of_run = step
        return self.in_a_row > self.max_in_a_row

    def reason(self, step: int) -> str:
        return (f"training stopped: {self.in_a_row} steps in a row ({self.first_of_run}-{step}) had a non-finite loss "
                f"or gradient norm on at least one rank (train.max_nonfinite_steps={self.max_in_a_row}; "
                f"{self.total} non-finite steps in all, each skipped on every rank without updating the weights)")


def raise_if_aborted(job, result) -> None:
    """On the driver, after `fit()`: a run the workers stopped becomes a FAILED MLflow run and `TrainingAborted`."""
    metrics = getattr(result, "return_value", None)
    if not isinstance(metrics, dict) or not metrics.get(ABORT_KEY):
        return
    reason = metrics[ABORT_KEY]
    ckpt = getattr(result, "checkpoint", None)
    where = (f"the last good checkpoint (step {_ckpt_step(ckpt)}) is kept in {ckpt.path}; running the same "
             f"command again resumes from it (lower optim.lr, set optim.grad_clip, or fix the data first)"
             if ckpt is not None else "no checkpoint was saved before it")
    message = f"{reason}. {where}"
    from medvl.track import runs
    try:
        client = runs._client(job.tracking_uri)
        client.set_tag(job.mlflow_run_id, "medvl.end_reason", redact_text(message)[:5000])
        with _tmpdir() as d:
            plot = runs.plot_loss_curve(job.tracking_uri, job.mlflow_run_id, Path(d) / "loss_curve.png")
            if plot:
                client.log_artifact(job.mlflow_run_id, str(plot), artifact_path="plots")
        runs.finish_run(job.tracking_uri, job.mlflow_run_id, "FAILED",
                        {"nonfinite_steps": metrics.get("train/nonfinite_steps"), "step": metrics.get("step")})
    except Exception as e:  # noqa: BLE001 - the reason reaches the user even when MLflow does not answer
        log.warning("could not mark MLflow run %s failed: %s", job.mlflow_run_id, redact_text(e))
    raise TrainingAborted(message)


def _ckpt_step(ckpt) -> str:
    name = Path(str(getattr(ckpt, "path", ""))).name
    return name.split("=", 1)[1].lstrip("0") or "0" if "=" in name else "?"


class _tmpdir:
    def __enter__(self):
        import tempfile
        self._d = tempfile.TemporaryDirectory()
        return self._d.__enter__()

    def __exit__(self, *exc):
        return self._d.__exit__(*exc)


# --------------------------------------------------------------------------- cluster size (driver)


def started_here() -> Optional[bool]:
    """True when this process created the Ray cluster with ray.init() (fixed size: no autoscaler can add nodes);
    False when it connected to one; None when unknown."""
    try:
        import ray._private.worker as w
        node = w._global_node
        return None if node is None else bool(getattr(node, "ray_init_cluster", False))
    except Exception:  # noqa: BLE001 - private API moved
        return None


def check_cluster_fits(recipe) -> None:
    """Fail fast (ConfigError naming the keys) when the train workers cannot fit on an embedded Ray cluster; on a
    connected cluster only say what is missing (an autoscaler may add nodes; Ray Train gives up after
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)."""
    import ray

    from medvl.config import ConfigError
    t = recipe.train
    have = ray.cluster_resources()
    need_cpu = t.num_workers * t.cpus_per_worker
    problems = []
    if have.get("CPU", 0) < need_cpu:
        problems.append(f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker} needs "
                        f"{need_cpu} CPUs, the Ray cluster has {have.get('CPU', 0):g}")
    else:
        biggest = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if biggest < t.cpus_per_worker:
            problems.append(f"train.cpus_per_worker={t.cpus_per_worker} is more than any node has ({biggest:g})")
    if t.use_gpu and have.get("GPU", 0) < t.num_workers:
        problems.append(f"train.use_gpu with train.num_workers={t.num_workers} needs {t.num_workers} GPUs, the Ray "
                        f"cluster has {have.get('GPU', 0):g}")
    if not problems:
        return
    what = "; ".join(problems)
    if started_here():
        raise ConfigError(f"{what}: this Ray cluster was started by this process and cannot grow; lower "
                          f"train.num_workers / train.cpus_per_worker (or raise runtime.num_cpus)")
    print(f"medvl: {what} right now; waiting for nodes (an autoscaler may add them; Ray Train gives up after "
          f"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, default 30 s, per attempt)", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the skip counter (driver)


def counter_name(mlflow_run_id: str) -> str:
    return f"{COUNTER_PREFIX}{mlflow_run_id}"


def release_skip_counter(mlflow_run_id: Optional[str], tracking_uri: Optional[str] = None) -> None:
    """Kill the run's detached SkipCounter actor; with `tracking_uri`, first log its count and the first skipped
    samples (id and reason) to the run (`data/skipped_samples.json`, tag `medvl.skipped_samples`)."""
    import ray
    try:
        actor = ray.get_actor(counter_name(mlflow_run_id), namespace=COUNTER_NAMESPACE)
    except Exception:  # noqa: BLE001 - already gone (or Ray is down)
        return
    if tracking_uri:
        try:
            count, examples = ray.get(actor.get.remote(), timeout=30)
            if count:
                from medvl.track import runs
                client = runs._client(tracking_uri)
                client.set_tag(mlflow_run_id, "medvl.skipped_samples", str(count))
                client.log_dict(mlflow_run_id, {"count": count, "first": [
                    {"sample_id": sid, "reason": redact_text(why)} for sid, why in examples]},
                    "data/skipped_samples.json")
        except Exception as e:  # noqa: BLE001 - bookkeeping never fails a run
            log.warning("could not log the skipped samples of run %s: %s", mlflow_run_id, redact_text(e))
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------- finalize while MLflow is down


def defer_finalize(job, result, status: str, summary: dict, error: BaseException) -> None:
    """Training is done but MLflow is unreachable: keep what finalize needs in the run directory."""
    ckpt = getattr(result, "checkpoint", None)
    state = {"run_id": job.mlflow_run_id, "status": status, "summary": summary,
             "checkpoint": str(ckpt.path) if ckpt is not None else None,
             "log_model": bool(job.recipe.track.log_model), "reason": redact_text(error)[:2000]}
    p = Path(job.run_dir) / PENDING_FILE
    p.write_text(json.dumps(state, indent=2))
    print(f"medvl: training of run '{job.recipe.run_name}' finished, but MLflow is unreachable "
          f"({redact_text(error)[:300]}). Nothing is lost: checkpoints are in {job.storage_path / job.recipe.run_name}, "
          f"metrics in {Path(job.run_dir) / 'metrics.jsonl'}. When the server is back run\n"
          f"    medvl sync-metrics {job.run_dir}\n"
          f"to deliver the metrics and finish the MLflow run (loss curve, model, status).", file=sys.stderr,
          flush=True)


def complete_finalize(recipe, run_dir: Path, uri: str) -> Optional[dict]:
    """Finish a run whose finalize was deferred (`finalize_pending.json`); returns the pending state, or None."""
    p = Path(run_dir) / PENDING_FILE
    if not p.exists():
        return None
    state = json.loads(p.read_text())
    from medvl.track import runs
    run_id = state["run_id"]
    with _tmpdir() as d:
        plot = runs.plot_loss_curve(uri, run_id, Path(d) / "loss_curve.png")
        if plot:
            runs._client(uri).log_artifact(run_id, str(plot), artifact_path="plots")
    if recipe is not None and state.get("log_model") and state.get("checkpoint") and \
            os.path.isdir(state["checkpoint"]):
        from medvl.train.launcher import load_model_from_checkpoint
        method, model, _ = load_model_from_checkpoint(recipe, state["checkpoint"])
        method.export(model, uri, run_id)
    runs.finish_run(uri, run_id, state.get("status", "FINISHED"), state.get("summary") or {})
    p.unlink()
    return state
