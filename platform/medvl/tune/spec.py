"""Sweep spec: `jobs/sweep_*.yaml` -> typed `SweepSpec`, as strict as the recipe config.

    name: sweep-digits-small              # parent MLflow run name, `<run_root>/sweeps/<name>/`
    base: digits_clip.yaml                # recipe, relative to this file (or the current directory)
    overrides: {train.epochs: 3}          # dotted recipe keys applied to the base for every trial
    search_space:                         # any recipe key; see medvl.tune.space for the types
      optim.lr: {type: loguniform, low: 3.0e-4, high: 1.0e-2}
    metric: val/zero_shot_accuracy
    mode: max
    num_samples: 6
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}
    resources: {workers: 1, cpus_per_worker: 1}

`load_sweep(path, ["num_samples=2", "train.epochs=1"])` applies command-line overrides: a key whose first part
is a sweep field changes the spec (`scheduler.kind=none`, `search_space.optim.lr.high=1e-2`); any other key
must be a recipe key and joins `overrides`. `validate_sweep(spec)` then checks everything that can be checked
before a trial starts (parameter paths, ranges vs field types, the objective metric, the scheduler horizon)
and returns the resolved base recipe.

Pipeline sweeps: `base:` may name a pipeline recipe (`medvl.pipelines`, a YAML with `stages:`). Then every key
(`overrides`, `search_space`, command-line overrides) is a pipeline key, `<stage>.<key>` (`probe.C`,
`clip.optim.lr`), checked against that stage kind's typed config; the objective is any stage's reported metric,
`<stage>/<metric>` (`probe/accuracy`), checked against what the stages declare; each trial runs the whole
pipeline, and trials that share a prefix of stages reuse their cached outputs (built once, also when trials run
concurrently: the per-key build lock). A pipeline reports its objective once, at its end, so the scheduler must be
`none`; stages set their own resources (`<stage>.train.num_workers`), so `resources.workers` and
`resources.cpus_per_worker` are not used.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from medvl.config import ConfigError, Recipe, field_type, from_dict, load_recipe, load_yaml, parse_override, to_dict


class SweepError(ConfigError):
    """A sweep spec is invalid (or cannot start); the message names the key."""


@dataclass
class ParamSpec:
    """One search dimension (see `medvl.tune.space` for how each type is checked and sampled)."""
    type: Literal["uniform", "loguniform", "int", "choice"]
    low: Optional[Union[int, float]] = None
    """Lower bound (uniform, loguniform, int)."""
    high: Optional[Union[int, float]] = None
    """Upper bound, inclusive (uniform, loguniform, int); must be > low."""
    values: Optional[list[Any]] = None
    """Candidates of a `choice` (scalars: numbers, strings, true/false, null)."""
    log: bool = False
    """`int` only: sample on a log scale."""
    step: Optional[Union[int, float]] = None
    """Optional discretisation step (uniform, int)."""
    when: Optional[dict[str, Any]] = None
    """Condition: sample this dimension only when every `{key: value}` (or `{key: [values]}`) holds; a key is
    an earlier `choice` dimension or a fixed recipe key (e.g. `{loss.kind: siglip}`)."""


@dataclass
class SchedulerSpec:
    kind: Literal["asha", "hyperband", "none"] = "asha"
    """asha = ASHA (one bracket); hyperband = asynchronous HyperBand (`brackets` ASHA brackets, never pauses
    trials); none = every trial runs to the end."""
    time_attr: Literal["epoch"] = "epoch"
    """Progress unit the scheduler compares trials at (completed epochs, reported after each epoch's eval)."""
    grace_period: int = 1
    """Epochs every trial trains before it can be stopped."""
    max_t: Optional[int] = None
    """The scheduler's horizon in epochs; defaults to (and must equal) the epochs a trial trains."""
    reduction_factor: float = 2
    """Keep the top 1/reduction_factor of trials at each rung."""
    brackets: int = 3
    """hyperband only: number of ASHA brackets."""


TRIAL_WALL = "trial/wall_s"
"""Every trial reports its wall-clock so far (seconds since its Tune trial function started, this attempt) with
each result: a second objective for a multi-objective sweep (objective vs cost)."""


@dataclass
class ObjectiveSpec:
    metric: str
    """A reported metric (as for the sweep's `metric`) or `trial/wall_s`."""
    mode: Literal["max", "min"] = "max"


@dataclass
class ResourcesSpec:
    workers: Optional[int] = None
    """Ray Train workers per trial (sets `train.num_workers`; default: the base recipe's)."""
    cpus_per_worker: Optional[int] = None
    """CPUs per train worker (sets `train.cpus_per_worker`; default: the base recipe's)."""
    driver_cpus: int = 1
    """CPUs for each trial's driver (the Tune trial actor that runs the TorchTrainer)."""
    data_cpus: int = 1
    """CPUs kept free per trial so its Ray Data decode tasks can run next to the workers."""
    max_concurrent_trials: Optional[int] = None
    """Cap on trials running at once (default: as many as the cluster's CPUs/GPUs fit)."""
    trial_max_failures: int = 1
    """How often Tune restarts a trial whose actor died (its node was lost; for a trial that trains in its actor,
    `train.launch: in_process`, the 1-worker default, also a crash of the training process): the restart resumes
    from the trial's last checkpoint in the same MLflow run. Failures that leave the actor alive are retried inside
    the trial (`train.max_failures`: Ray Train's worker restarts, or medvl's in-process retries)."""
    reuse_actors: bool = True
    """With `scheduler.kind: none`, run the next trial in a finished trial's Tune actor (Tune's `reuse_actors`): its
    process has torch, open_clip and MLflow loaded already; the trial still gets its own MLflow child run, Ray Train
    controller and workers. Never with an early-stopping scheduler: Tune would hand the actor of a stopped trial
    to the next one while the stopped trial's `fit()` still runs (its controller and workers go on training until
    they are done; when they are not done within Tune's wait, the next trial errors), whereas without reuse Tune
    kills the stopped trial's actor and its workers with it. False: a new actor per trial."""


@dataclass
class SweepSpec:
    base: str
    """Base recipe file, relative to the sweep file (or the current directory)."""
    name: str = ""
    """Sweep name: parent MLflow run name and `<run_root>/sweeps/<name>/` (default: the file name)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted recipe keys applied to the base recipe for every trial."""
    search_space: dict[str, ParamSpec] = field(default_factory=dict)
    metric: str = "val/zero_shot_accuracy"
    """Objective: a metric the trainer reports at epoch ends."""
    mode: Literal["max", "min"] = "max"
    objectives: list[ObjectiveSpec] = field(default_factory=list)
    """Extra objectives: a multi-objective search (Optuna's TPE models them jointly), e.g.
    `[{metric: trial/wall_s, mode: min}]` = the objective vs each trial's wall-clock. `metric` stays the primary
    objective (the progress line, `best/...` on the parent run); the parent run also gets the Pareto front
    (`optuna/pareto_front.png`, column `pareto` in results.csv). Needs `scheduler.kind: none` (ASHA and
    HyperBand stop trials on one metric)."""
    truth: Optional[str] = None
    """A ground-truth metric recorded beside a label-free objective, never optimised (e.g. CLISC's
    `seg_eval/unet_s3f/dice` next to the objective `agreement/agreement`): it is a column of the trials table, and
    the parent run gets how well the objective ranks the trials by it (`proxy/spearman` over the finished trials,
    `proxy/truth_of_best`: the truth of the trial the objective picked, `proxy/best_truth`: the best truth of any
    trial) and the scatter `sweep/proxy_vs_truth.png`."""
    truth_mode: Literal["max", "min"] = "max"
    """Whether a higher `truth` is better (Dice) or a lower one (HD95)."""
    num_samples: int = 8
    share_stages: bool = True
    """Pipeline sweeps: trials share one stage cache, so stages with equal keys (the unsearched prefix) are built
    once. `false` gives every trial its own cache (nothing reused across trials): the baseline that
    `bench/sweep_reuse.py` measures sharing against."""
    seed: int = 0
    """Seed of Optuna's TPE sampler (the trials' own seed is `train.seed`)."""
    n_startup_trials: int = 10
    """Trials TPE samples at random before it models the objective (Optuna's default: 10)."""
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    optuna_storage: Optional[str] = None
    """Optuna RDB storage URL, e.g. sqlite:///runs/sweeps/<name>/optuna.db (relative sqlite paths are resolved
    against the current directory); the study persists there across sessions."""
    study_name: Optional[str] = None
    """Optuna study name (default: the sweep name)."""
    source: str = ""
    """The sweep file this spec was read from (set by `load_sweep`)."""

    @property
    def sweep_name(self) -> str:
        return self.name or Path(self.source).stem.replace("_", "-") or "sweep"


SWEEP_KEYS = {f.name for f in dataclasses.fields(SweepSpec)} - {"source"}


# --------------------------------------------------------------------------- loading


def _parse_spec(raw: dict, where: str) -> SweepSpec:
    raw = dict(raw)
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise SweepError(f"{where}unknown key {unknown[0]} (valid keys: {', '.join(sorted(SWEEP_KEYS))})")
    if "base" not in raw:
        raise SweepError(f"{where}missing key base (the recipe the sweep starts from)")
    if isinstance(raw.get("scheduler"), str):
        raw["scheduler"] = {"kind": raw["scheduler"]}
    space = raw.pop("search_space", None) or {}
    if not isinstance(space, dict):
        raise SweepError(f"{where}search_space: expected a mapping of recipe keys to dimensions")
    objectives = raw.pop("objectives", None) or []
    if not isinstance(objectives, list) or not all(isinstance(o, dict) for o in objectives):
        raise SweepError(f"{where}objectives: expected a list of {{metric: ..., mode: max|min}}")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{where}overrides: expected a mapping of dotted recipe keys to values")
    raw["overrides"] = overrides
    try:
        spec = from_dict(SweepSpec, raw)
        spec.search_space = {str(k): from_dict(ParamSpec, v, prefix=f"search_space.{k}")
                             for k, v in space.items()}
        spec.objectives = [from_dict(ObjectiveSpec, o, prefix=f"objectives[{i}]") for i, o in enumerate(objectives)]
    except SweepError:
        raise
    except ConfigError as e:
        raise SweepError(f"{where}{e}") from None
    return spec


def _split_override(key: str) -> tuple[str, ...]:
    """`search_space.optim.lr.high` -> ("search_space", "optim.lr", "high"); others split on the first dot."""
    head, _, rest = key.partition(".")
    if head == "search_space" and rest:
        path, _, attr = rest.rpartition(".")
        param_fields = {f.name for f in dataclasses.fields(ParamSpec)}
        return (head, path, attr) if path and attr in param_fields else (head, rest)
    if head == "overrides" and rest:
        return (head, rest)
    return tuple(key.split("."))


def apply_sweep_overrides(raw: dict, overrides: list[str], key_type=field_type) -> dict:
    """`["num_samples=2", "scheduler.kind=none", "train.epochs=1", "overrides.name=x"]` -> updated raw spec.
    `key_type` checks a base key (a training recipe's by default; a pipeline's for a pipeline base)."""
    raw = copy.deepcopy(raw)
    for ov in overrides:
        key, value = parse_override(ov, "key=value or key.sub=value", SweepError)
        parts = _split_override(key)
        if parts[0] not in SWEEP_KEYS:
            try:
                key_type(key)
            except ConfigError as e:
                what = "pipeline key" if key_type is not field_type else "recipe key"
                raise SweepError(f"unknown key {key}: neither a sweep key ({', '.join(sorted(SWEEP_KEYS))}) "
                                 f"nor a {what}" + (f" ({e})" if what == "pipeline key" else "")) from None
            parts = ("overrides", key)
        cur = raw
        for p in parts[:-1]:
            nxt = cur.get(p)
            if isinstance(nxt, str) and p == "scheduler":
                nxt = {"kind": nxt}
            if not isinstance(nxt, dict):
                nxt = {}
            cur[p] = nxt
            cur = nxt
        cur[parts[-1]] = value
    return raw


def _base_key_type(raw: dict, sweep_path: str | os.PathLike, overrides: list[str]):
    """The key checker of the sweep's base: a pipeline's `<stage>.<key>` when the base is a pipeline file."""
    base = raw.get("base")
    for ov in overrides:
        k, _, v = ov.partition("=")
        if k.strip() == "base":
            base = yaml.safe_load(v)
    if not isinstance(base, str):
        return field_type
    try:
        path = resolve_base(SweepSpec(base=base, source=str(Path(sweep_path).resolve())))
    except SweepError:
        return field_type  # reported by validate_sweep
    from medvl.pipelines import is_pipeline_file, load_pipeline
    if not is_pipeline_file(path):
        return field_type
    try:
        return load_pipeline(path).field_type
    except ConfigError as e:
        raise SweepError(f"base pipeline {path}: {e}") from None


def load_sweep(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> SweepSpec:
    """Read a sweep file, apply command-line overrides, parse strictly (no validation against the recipe)."""
    raw = load_yaml(path)
    if overrides:
        raw = apply_sweep_overrides(raw, overrides, _base_key_type(raw, path, overrides))
    spec = _parse_spec(raw, f"{path}: ")
    spec.source = str(Path(path).resolve())
    return spec


def resolve_base(spec: SweepSpec) -> Path:
    """The base recipe path: relative to the sweep file's directory, else to the current directory."""
    cands = [Path(spec.base)] if os.path.isabs(spec.base) else []
    if spec.source and not cands:
        cands.append(Path(spec.source).parent / spec.base)
    cands.append(Path(spec.base))
    for c in cands:
        if c.is_file():
            return c.resolve()
    raise SweepError(f"base: recipe file {spec.base!r} not found (looked at {', '.join(str(c) for c in cands)})")


def spec_to_dict(spec: SweepSpec) -> dict:
    d = dataclasses.asdict(spec)
    d["name"] = spec.sweep_name
    d["search_space"] = {k: {a: v for a, v in dataclasses.asdict(p).items() if v is not None and v is not False}
                         for k, p in spec.search_space.items()}
    return d


# --------------------------------------------------------------------------- validation

# Recipe keys the sweep itself controls: the run identity, tracking and cluster (same for every trial), and the
# trial's resources (`resources:` sets them, so concurrency can be derived).
RESERVED = ("track.", "runtime.", "train.num_workers", "train.cpus_per_worker", "train.use_gpu", "train.launch",
            "name")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def reported_metrics(recipe: Recipe) -> set[str]:
    """The metric names `medvl.train.worker` reports at epoch ends for this recipe: step, epoch, every loss term
    of its method, and exactly the metrics the method's evaluator reports."""
    from medvl.methods import resolve_method
    method = resolve_method(recipe)
    names = {"step", "epoch", "train/loss"} | {f"train/{t}" for t in method.loss_terms()}
    return names | method.metric_names()


def trial_epochs(recipe: Recipe) -> int:
    """Completed epochs a trial reports last (fewer than `train.epochs` when `train.max_steps` cuts it short)."""
    if not recipe.train.max_steps:
        return recipe.train.epochs
    from medvl.train.launcher import expected_steps
    from medvl.data.corpus import load_manifest
    per_epoch = load_manifest(recipe.data.corpus).rows(recipe.data.train_split) // recipe.data.batch_size
    return max(1, math.ceil(expected_steps(recipe) / max(1, per_epoch)))


def base_recipe(spec: SweepSpec):
    """Base recipe + sweep overrides + resources, validated, local paths made absolute (a `Pipeline` when the
    base is a pipeline recipe)."""
    path = resolve_base(spec)
    ov = dict(spec.overrides)
    if "track.run_name" in ov:
        raise SweepError("overrides.track.run_name: trial run names are set by the sweep (<sweep>-<trial id>)")
    from medvl.pipelines import is_pipeline_file
    if is_pipeline_file(path):
        return _base_pipeline(spec, path, ov)
    for key, v in (("train.num_workers", spec.resources.workers),
                   ("train.cpus_per_worker", spec.resources.cpus_per_worker)):
        if v is None:
            continue
        if key in ov and ov[key] != v:
            raise SweepError(f"overrides.{key} ({ov[key]}) contradicts resources.{key.split('.')[1].replace('num_', '')}"
                             f" ({v}); set it in one place (resources:)")
        ov[key] = v
    try:
        return load_recipe(path, ov)
    except ConfigError as e:
        raise SweepError(f"base recipe with the sweep's overrides: {e}") from None


def _base_pipeline(spec: SweepSpec, path: Path, ov: dict):
    from medvl.pipelines import load_pipeline
    for key in ("workers", "cpus_per_worker"):
        if getattr(spec.resources, key) is not None:
            raise SweepError(f"resources.{key}: the base is a pipeline, whose train stages set their own workers "
                             f"(`<stage>.train.num_workers` / `<stage>.train.cpus_per_worker` in overrides)")
    try:
        return load_pipeline(path, ov)
    except ConfigError as e:
        raise SweepError(f"base pipeline with the sweep's overrides: {e}") from None


def is_pipeline_sweep(target: Any) -> bool:
    from medvl.pipelines import Pipeline
    return isinstance(target, Pipeline)


def _validate_pipeline_sweep(spec: SweepSpec, p) -> None:
    from medvl.pipelines import pipeline_to_dict
    from medvl.tune.space import PipelineSchema, SearchSpace
    SearchSpace(spec.search_space).validate(pipeline_to_dict(p), PipelineSchema(p))
    metrics = p.metric_names()
    _validate_objectives(spec, metrics)
    if spec.metric not in metrics:
        raise SweepError(f"metric: no stage of pipeline {p.name!r} reports {spec.metric!r}; objectives are "
                         f"<stage>/<metric>, one of: {', '.join(sorted(metrics))}")
    if spec.scheduler.kind != "none":
        raise SweepError(f"scheduler.kind: {spec.scheduler.kind} stops trials at epoch ends, but a pipeline trial "
                         f"reports its objective once, when its last stage is done; use scheduler: {{kind: none}}")


def validate_sweep(spec: SweepSpec) -> Recipe:
    """Every check that needs no cluster: returns the validated base recipe (base + overrides + resources)."""
    from medvl.tune.space import SearchSpace
    name = spec.sweep_name
    if not NAME_RE.match(name):
        raise SweepError(f"name: {name!r} must be letters, digits, '.', '_' or '-' (it names runs and a folder)")
    if spec.num_samples < 1:
        raise SweepError("num_samples must be >= 1")
    if spec.n_startup_trials < 0:
        raise SweepError("n_startup_trials must be >= 0")
    r = spec.resources
    for key, v in (("workers", r.workers), ("cpus_per_worker", r.cpus_per_worker)):
        if v is not None and v < 1:
            raise SweepError(f"resources.{key} must be >= 1")
    if r.driver_cpus < 0 or r.data_cpus < 0:
        raise SweepError("resources.driver_cpus and resources.data_cpus must be >= 0")
    if r.trial_max_failures < 0:
        raise SweepError("resources.trial_max_failures must be >= 0")
    if r.max_concurrent_trials is not None and r.max_concurrent_trials < 1:
        raise SweepError("resources.max_concurrent_trials must be >= 1")
    if spec.study_name and not spec.optuna_storage:
        raise SweepError("study_name needs optuna_storage (an in-memory study has no name to resume by)")

    recipe = base_recipe(spec)
    if is_pipeline_sweep(recipe):
        _validate_pipeline_sweep(spec, recipe)
        return recipe
    if not spec.share_stages:
        raise SweepError("share_stages: false applies to pipeline sweeps only (the base is a training recipe)")
    SearchSpace(spec.search_space).validate(to_dict(recipe))

    metrics = reported_metrics(recipe)
    _validate_objectives(spec, metrics)
    if spec.metric not in metrics:
        hint = ""
        if spec.metric.startswith("val/") and recipe.data.val_split is None:
            hint = " (data.val_split is null, so nothing is evaluated)"
        raise SweepError(f"metric: the trainer never reports {spec.metric!r}{hint}; it reports: "
                         f"{', '.join(sorted(metrics))}")

    s = spec.scheduler
    if s.kind != "none":
        epochs = _max_trial_epochs(recipe, spec)
        if s.grace_period < 1:
            raise SweepError("scheduler.grace_period must be >= 1")
        if s.reduction_factor <= 1:
            raise SweepError("scheduler.reduction_factor must be > 1")
        if s.brackets < 1:
            raise SweepError("scheduler.brackets must be >= 1")
        if s.max_t is not None and s.max_t != epochs:
            raise SweepError(f"scheduler.max_t ({s.max_t}) must equal the epochs a trial trains ({epochs}): "
                             f"a trial is only complete after its last epoch (the LR schedule spans "
                             f"train.epochs); change train.epochs instead")
        if s.grace_period > epochs:
            raise SweepError(f"scheduler.grace_period ({s.grace_period}) exceeds the {epochs} epoch(s) a trial "
                             f"trains")
    return recipe


def _validate_objectives(spec: SweepSpec, metrics: set[str]) -> None:
    """The extra objectives of a multi-objective sweep: reported (or `trial/wall_s`), distinct, no scheduler."""
    seen = {spec.metric}
    if spec.truth is not None:
        if spec.truth == spec.metric or spec.truth in {o.metric for o in spec.objectives}:
            raise SweepError(f"truth: {spec.truth!r} is an objective; the truth metric is recorded, never optimised")
        if spec.truth not in metrics:
            raise SweepError(f"truth: trials never report {spec.truth!r}; they report: {', '.join(sorted(metrics))}")
    for i, o in enumerate(spec.objectives):
        if o.metric in seen:
            raise SweepError(f"objectives[{i}].metric: {o.metric!r} is already an objective")
        seen.add(o.metric)
        if o.metric != TRIAL_WALL and o.metric not in metrics:
            raise SweepError(f"objectives[{i}].metric: trials never report {o.metric!r}; they report "
                             f"{TRIAL_WALL} and: {', '.join(sorted(metrics))}")
    if spec.objectives and spec.scheduler.kind != "none":
        raise SweepError(f"objectives: a multi-objective sweep needs scheduler.kind none (the {spec.scheduler.kind} "
                         f"scheduler stops trials on {spec.metric!r} alone)")


def _max_trial_epochs(recipe: Recipe, spec: SweepSpec) -> int:
    """The scheduler horizon: the base recipe's epochs, or the top of a searched `train.epochs` range."""
    p = spec.search_space.get("train.epochs")
    if p is not None:
        return int(max(p.values or [p.high or 1]))
    return trial_epochs(recipe)


def trial_horizon(horizon: Optional[int], config: Optional[dict]) -> Optional[int]:
    """The epochs this trial was to train: the sweep's horizon, or fewer when `train.epochs` is searched (a trial
    that sampled 2 of up to 4 epochs and trained 2 was not stopped early)."""
    v = (config or {}).get("train.epochs")
    if horizon is None or not isinstance(v, (int, float)) or isinstance(v, bool):
        return horizon
    return min(horizon, int(v))


def scheduler_horizon(recipe: Recipe, spec: SweepSpec) -> int:
    if is_pipeline_sweep(recipe):
        return 1  # one result per trial (the scheduler is `none`)
    return spec.scheduler.max_t or _max_trial_epochs(recipe, spec)


__all__ = ["SweepSpec", "ParamSpec", "ObjectiveSpec", "TRIAL_WALL", "SchedulerSpec", "ResourcesSpec", "SweepError", "load_sweep",
           "validate_sweep", "reported_metrics", "base_recipe", "resolve_base", "spec_to_dict",
           "scheduler_horizon", "trial_horizon", "to_dict", "is_pipeline_sweep"]
