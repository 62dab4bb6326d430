"""One sweep trial = one Ray Train job (the Train V2 pattern: the Tune trial function is the Train driver).

`run_trial(config, ctx)` runs inside a Tune trial actor: base recipe + the sampled `config` (flat dotted keys)
-> the trial recipe (run name `<sweep>-<trial id>`, the sweep's run root and tracking URI) -> `prepare_job`
(MLflow child run under the sweep's parent run) -> `build_trainer(job, [EpochReportCallback(...)])` ->
`fit()` -> `finalize(job, result)` -> the final result goes to Tune last.

Why the final epoch is reported to Tune only after `finalize`: a scheduler may answer any result with STOP (ASHA
at a rung that coincides with the last epoch), and Tune then kills the trial actor at once; holding the last
result back until the model and plots are logged and the MLflow run is closed makes that harmless. Trials that
a scheduler stops earlier are closed (status KILLED) by `medvl.tune.tracking.SweepCallback` on the driver.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ray.tune.integration.ray_train import TuneReportCallback

from medvl.config import apply_overrides, recipe_from_dict
from medvl.tune.spec import TRIAL_WALL


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


@dataclass
class SweepContext:
    """What every trial needs from the sweep driver (passed with `tune.with_parameters`)."""
    sweep: str
    base: dict
    """Resolved base recipe dict: absolute corpus paths and `runtime.run_root` filled in."""
    parent_run_id: str
    metric: str
    env: dict[str, str] = field(default_factory=dict)
    """Environment every trial process needs, e.g. the sweep's MLFLOW_TRACKING_URI: it may carry a password, so it
    travels here (the Ray object store, like every `tune.with_parameters` value) and never in the trial's recipe,
    which is logged as MLflow params and saved with the run."""
    pipeline: bool = False
    """The base is a pipeline recipe (`base` is then `pipeline_to_dict`'s dict): a trial runs the pipeline."""
    share_stages: bool = True
    """Pipeline trials share the stage cache (false: each trial builds every stage in a cache of its own)."""


class EpochReportCallback(TuneReportCallback):
    """Forward to Tune one result per completed epoch that carries the objective (mid-epoch checkpoint reports
    repeat the last eval, or have none yet); hold back the final one (see the module docstring)."""

    def __init__(self, metric: str, total_steps: int, t_start: Optional[float] = None, direct: bool = False):
        # direct (train.launch: in_process): the training runs in this trial's own thread and reports to Tune
        # itself; otherwise Ray Train's controller calls this callback and it forwards through Tune's queue
        if not direct:
            super().__init__()  # [1] must be created inside the Tune trial (it binds to the trial's session)
        self.direct = direct
        self.metric = metric
        self.total_steps = total_steps
        self.last_epoch = -1
        self.t_start = t_start  # the trial's start: each forwarded result carries trial/wall_s

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = metrics[0]  # rank 0's metrics
        if self.metric not in m or m.get("epoch", 0) <= self.last_epoch:
            return
        if m.get("final") or m.get("step", 0) >= self.total_steps:
            return  # the trial function reports the final result after finalize()
        self.last_epoch = m["epoch"]
        if self.t_start is not None:
            metrics = [{**m, TRIAL_WALL: time.time() - self.t_start}, *metrics[1:]]
        if self.direct:
            import ray.tune
            from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
            ray.tune.report({**metrics[0], **({CHECKPOINT_PATH_KEY: checkpoint.path} if checkpoint else {})})
            return
        super().after_report(run_context, metrics, checkpoint)


def trial_recipe(ctx: SweepContext, params: dict[str, Any], trial_id: str):
    d = apply_overrides(ctx.base, {**params, "track.run_name": trial_run_name(ctx.sweep, trial_id)})
    return recipe_from_dict(d)


def run_trial(config: dict[str, Any], ctx: SweepContext) -> None:
    """The Tune trainable (a function): train one sampled configuration and report its epoch results."""
    import ray.tune

    from medvl.train.launcher import build_trainer, finalize, fit, prepare_job

    if ctx.pipeline:
        return run_pipeline_trial(config, ctx)
    import uuid

    from medvl.track.timeline import Timeline
    t_start = time.time()
    timeline = Timeline({"start": t_start}, uuid.uuid4().hex)  # the trial's own phases (its actor is up)
    trial_id = ray.tune.get_context().get_trial_id()
    os.environ.update(ctx.env)  # the sweep's tracking URI, wherever this trial actor runs
    recipe = trial_recipe(ctx, config, trial_id)
    job = prepare_job(recipe, parent_run_id=ctx.parent_run_id,  # [2] MLflow child run of the sweep's parent
                      tags={"medvl.sweep": ctx.sweep, "medvl.trial_id": trial_id})
    direct = recipe.train.launch == "in_process"
    trainer = build_trainer(job, callbacks=[EpochReportCallback(ctx.metric, job.total_steps, t_start, direct)],
                            timeline=timeline)
    # No try/except marking the run FAILED here: when a scheduler stops the trial, Tune ends its reporting and
    # fit() raises, and a FAILED written from here raced SweepCallback (seen: ASHA-stopped trials ending FAILED).
    # SweepCallback on the driver is the one place that closes unfinished runs: KILLED + stopped-early tags when
    # Tune completes the trial, FAILED when Tune reports a trial error (including this actor dying).
    try:
        result = fit(trainer, job)  # [3] Train V2: the controller + workers run as their own actors (in_process:
        # the training runs here, in this trial's actor)
        final = finalize(job, result)
    finally:
        release_skip_counter(job.mlflow_run_id, job.tracking_uri)
    out = {k: v for k, v in final.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))}
    out[TRIAL_WALL] = time.time() - t_start
    ray.tune.report(out)  # [4] the final epoch's result, after the run is complete in MLflow


def run_pipeline_trial(config: dict[str, Any], ctx: SweepContext) -> None:
    """A pipeline sweep's trial: the base pipeline with the sampled `<stage>.<key>` values, run to its end; stages
    whose keys match another trial's (the unsearched prefix) are reused, or waited for while another trial builds
    them. Its MLflow run (nested under the sweep) is the pipeline run, with a nested run per stage."""
    import ray.tune

    from medvl.pipelines import load_pipeline, run_pipeline
    from medvl.track import runs

    t_start = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    os.environ.update(ctx.env)  # the sweep's tracking URI, wherever this trial actor runs
    name = trial_run_name(ctx.sweep, trial_id)
    p = load_pipeline(data=ctx.base, overrides=dict(config))
    if not ctx.share_stages:  # a cache of its own: nothing reused from (or built for) other trials
        from medvl.pipelines.runner import cache_root
        p = load_pipeline(data=ctx.base, overrides={**config, "cache.root": f"{cache_root(p)}/unshared/{trial_id}"})
    id_file = runs.run_root(p) / "jobs" / name / runs.RUN_ID_FILE  # where SweepCallback looks for the trial's run
    out = run_pipeline(p, parent_run_id=ctx.parent_run_id, run_name=name, run_id_file=id_file,
                       tags={"medvl.sweep": ctx.sweep, "medvl.trial_id": trial_id},
                       say=lambda s: print(f"[trial {trial_id}] {s}", flush=True))
    ray.tune.report({**{k: v for k, v in out.metrics.items() if not (isinstance(v, float) and math.isnan(v))},
                     TRIAL_WALL: time.time() - t_start})


def release_skip_counter(mlflow_run_id: Optional[str], tracking_uri: Optional[str] = None) -> None:
    """`build_trainer` creates a detached per-run counter actor; a finished trial no longer needs it (see
    `medvl.train.faults.release_skip_counter`, which `medvl train` uses too)."""
    from medvl.train.faults import release_skip_counter as release
    release(mlflow_run_id, tracking_uri)
