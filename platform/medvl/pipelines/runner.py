"""Run a pipeline: plan (keys, what is reused, what is built and why) -> build what is missing, reuse the rest.

    from medvl.pipelines import load_pipeline, run_pipeline, plan_pipeline
    p = load_pipeline("jobs/pipeline_digits_probe.yaml", ["probe.C=0.5"])
    for pl in plan_pipeline(p).values(): print(pl.name, pl.action, pl.reason)      # the dry run: no Ray, no MLflow
    outcome = run_pipeline(p, force=["probe"])                                     # medvl pipeline ... --force probe

For each stage, in dependency order:

1. its key is computed from its name, code version, config slice, the output ids of its upstream stages and the
   fingerprints of its corpora/files (`medvl.pipelines.fingerprint`; a missing input file is an error here,
   before anything runs);
2. a complete output under that key (completion marker present, every listed file there) is reused: no lock, no
   Ray; a nested MLflow run records the reuse and links to the run that built it;
3. otherwise the key's build lock is taken (`medvl.pipelines.locks`), the output checked again (another run may
   have built it while this one waited: then it is reused), leftovers of interrupted builds are removed, and the
   stage runs: in this process (`driver` kinds: Ray Data and Ray Train jobs) or as a Ray task (`task` kinds),
   writing into an aside directory that is published atomically with its marker (`medvl.pipelines.store`).

`--force S` rebuilds S (a new build id, so every stage below it gets a new key and is rebuilt too); `--only S`
rebuilds S alone: its upstream stages must be complete (they are reused), stages below it are left alone.
"""
from __future__ import annotations

import copy
import importlib
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from medvl.pipelines.fingerprint import corpus_fingerprint, file_fingerprint, stage_key
from medvl.pipelines.locks import BuildLock, FileLock, RayLock, describe_holder
from medvl.pipelines.recipe import Pipeline, StageNode
from medvl.pipelines.stage import PipelineError, Stage, StageContext
from medvl.pipelines.store import FsspecStore, new_marker, open_store

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A stage raised while it ran; the message names the stage (the cause is chained)."""


@dataclass
class StagePlan:
    name: str
    kind: str
    executor: str
    action: str
    """`reuse`, `build` or `skip` (not selected with --only)."""
    reason: str
    key: Optional[str]
    """None while an upstream stage it reads is still to be (re)built: its key depends on that build."""
    location: Optional[str]
    code: str
    config: dict
    fingerprints: dict[str, str]
    upstream: dict[str, str] = field(default_factory=dict)
    marker: Optional[dict] = None
    forced: bool = False


@dataclass
class PipelineOutcome:
    name: str
    run_name: str
    run_id: Optional[str]
    experiment_id: Optional[str]
    tracking_uri: Optional[str]
    store: str
    table: list[dict]
    """One row per stage: stage, kind, action (built / reused / skipped), key, location, seconds, metrics."""
    metrics: dict[str, float]
    """Every reported metric as `<stage>/<metric>`."""
    wall_s: float


# --------------------------------------------------------------------------- keys


def cache_root(p: Pipeline) -> str:
    from medvl.track import runs
    return p.cache.root or str(runs.run_root(p) / "stages")


def input_fingerprints(p: Pipeline, node: StageNode) -> dict[str, str]:
    """Fingerprints of a stage's corpora and files; a missing one is an error naming the stage, key and path."""
    from medvl.data.corpus import CorpusError
    out: dict[str, str] = {}
    for key, path in sorted(node.stage.corpora().items()):
        try:
            out[key] = corpus_fingerprint(path, p.cache.corpus_fingerprint)
        except (CorpusError, OSError) as e:
            raise PipelineError(f"stages.{node.name}.{key}: input corpus {path}: {e}") from None
    for key, path in sorted(node.stage.files().items()):
        try:
            out[key] = file_fingerprint(path)
        except (FileNotFoundError, NotADirectoryError):
            raise PipelineError(f"stages.{node.name}.{key}: input file not found: {path}") from None
    return out


def key_config(node: StageNode) -> dict:
    """The config slice in the key: bound keys hold `@<upstream>/<sub-path>`, not a run-dependent path."""
    cfg = node.stage.key_config()
    for k, (up, sub) in node.bound_keys.items():
        cfg[k] = f"@{up}/{sub}" if sub else f"@{up}"
    return cfg


def output_id(marker: dict) -> str:
    return f"{marker['key']}:{marker['build_id']}"


def _diff(old: dict, new: dict, limit: int = 4) -> list[str]:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    out = [f"{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        out.append(f"{len(keys) - limit} more")
    return out


def why_build(store, name: str, code: str, config: dict, upstream: dict, fps: dict) -> str:
    """Why a key has no output: interrupted build, or what changed since the stage's newest complete output."""
    hist = store.history(name)
    if not hist:
        return "no output yet (never built)"
    last = hist[0]
    parts = []
    if last.get("code") != code:
        parts.append(f"code version {last.get('code')} -> {code}")
    d = _diff(last.get("config") or {}, config)
    if d:
        parts.append("config " + "; ".join(d))
    ups = [r for r in set(upstream) | set(last.get("upstream") or {})
           if (last.get("upstream") or {}).get(r) != upstream.get(r)]
    if ups:
        parts.append("input " + ", ".join(f"'{r}'" for r in sorted(ups)) + " rebuilt")
    fch = [k for k in set(fps) | set(last.get("fingerprints") or {}) if (last.get("fingerprints") or {}).get(k) != fps.get(k)]
    if fch:
        parts.append("changed " + ", ".join(sorted(fch)))
    return ("no output for this key; since the last build (key " + str(last.get("key")) + "): "
            + ("; ".join(parts) if parts else "nothing differs (pruned?)"))


def plan_pipeline(p: Pipeline, only: Iterable[str] = (), force: Iterable[str] = (), store=None) -> dict[str, StagePlan]:
    """What a run would do, stage by stage (the dry run); validates --only/--force names and every input file."""
    only, force = list(only), list(force)
    for opt, names in (("--only", only), ("--force", force)):
        for s in names:
            if s not in p.stages:
                raise PipelineError(f"{opt} {s}: no stage named {s!r} (stages: {', '.join(p.stages)})")
    store = store or open_store(cache_root(p))
    needed: set[str] = set()
    for s in only:
        needed |= p.ancestors(s)
    plans: dict[str, StagePlan] = {}
    for name in p.order():
        node = p.stages[name]
        cls = type(node.stage)
        fps = input_fingerprints(p, node)
        cfg = key_config(node)
        code = node.stage.code_version()
        upstream: dict[str, str] = {}
        pending = []
        for role, (up, _) in node.refs().items():
            upl = plans[up]
            if upl.action == "reuse" and upl.marker:
                upstream[role] = output_id(upl.marker)
            else:
                pending.append(f"'{role}' ({up})")
        forced_by = "--only" if name in only else ("--force" if name in force else None)
        pl = StagePlan(name, node.kind, cls.executor, "build", "", None, None, code, cfg, fps, upstream,
                       forced=forced_by is not None)
        if pending:
            pl.reason = f"input {', '.join(pending)} is built first, which gives this stage a new key"
        else:
            pl.key = stage_key(name, code, cfg, upstream, fps)
            pl.location = store.location(name, pl.key)
            pl.marker = store.read_marker(name, pl.key)
            if forced_by:
                pl.reason = f"forced ({forced_by} {name})"
            elif pl.marker is not None:
                store.verify(name, pl.key, pl.marker)  # an output deleted behind its marker is an error
                pl.action = "reuse"
                built = pl.marker.get("mlflow") or {}
                pl.reason = (f"complete: built {time.strftime('%Y-%m-%d %H:%M', time.localtime(pl.marker['created']))}"
                             f" in {pl.marker.get('duration_s', 0):.0f}s by run {built.get('run_id') or '?'}")
            else:
                partial = store.partial(name, pl.key)
                pl.reason = ("an interrupted build left a half-written output (removed, then rebuilt)" if partial
                             else why_build(store, name, code, cfg, upstream, fps))
        if only and name not in only:
            if name in needed:
                if pl.action != "reuse" and not pl.forced:  # (an upstream named by --force is rebuilt first)
                    first = next(s for s in only if name in p.ancestors(s))
                    raise PipelineError(f"--only {first}: its upstream stage {name!r} has no complete output "
                                        f"({pl.reason}); run the pipeline without --only first, or add --only {name}")
            else:
                pl.action, pl.reason = "skip", "not selected (--only)"
                pl.marker = pl.marker if pl.key else None
        plans[name] = pl
    return plans


# --------------------------------------------------------------------------- running one stage


def _execute(stage: Stage, ctx: StageContext, inputs: dict[str, tuple], store_root: str, remote: bool):
    """Run a stage where it executes (this process, or a Ray task): resolve its inputs to local paths, run it,
    and for an object-store cache upload its output. Returns (metrics, its own MLflow run id, uploaded files)."""
    for mod in ctx.plugins:  # a Ray task's worker must register plug-in stage kinds too
        importlib.import_module(mod)
    store = open_store(store_root)
    for role, (up, up_key, marker, sub) in inputs.items():
        local = store.local_path(up, up_key, marker)
        path = local / sub if sub else local
        if role in type(stage).inputs:
            ctx.inputs[role] = path
            ctx.upstream[role] = marker
        else:
            stage.bind(role, str(path))
    if remote:
        ctx.out = Path(tempfile.mkdtemp(prefix=f"medvl-{ctx.stage}-"))
    metrics = stage.run(ctx)
    if not isinstance(metrics, dict):
        raise TypeError(f"stage kind {ctx.kind!r}: run() must return a dict of metrics, got {type(metrics).__name__}")
    clean: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"stage {ctx.stage!r}: metric {k!r} = {v!r} is not a number")
        clean[str(k)] = float(v)
    files = None
    if remote:
        files = store.upload(ctx.stage, ctx.key, ctx.out)
        shutil.rmtree(ctx.out, ignore_errors=True)
    return clean, ctx.mlflow_run_id, files


_REMOTE_EXECUTE = None


def _remote_execute():
    global _REMOTE_EXECUTE
    if _REMOTE_EXECUTE is None:
        import ray
        _REMOTE_EXECUTE = ray.remote(max_retries=0)(_execute)
    return _REMOTE_EXECUTE


def lock_kind(p: Pipeline, store) -> str:
    return p.cache.lock if p.cache.lock != "auto" else ("ray" if store.remote else "file")


def make_lock(p: Pipeline, store, name: str, key: str, what: str,
              on_wait: Callable[[dict], None], on_stale: Callable[[str], None]) -> BuildLock:
    kind = lock_kind(p, store)
    common = dict(stale_s=p.cache.stale_lock_s, timeout_s=p.cache.wait_timeout_s, on_wait=on_wait, on_stale=on_stale)
    if kind == "file":
        return FileLock(store.lock_path(name, key), what, **common)
    return RayLock(f"{store.location(name, key)}", what, **common)


class _Run:
    """The state of one pipeline run (store, MLflow ids, the markers of the stages done so far)."""

    def __init__(self, p: Pipeline, plans: dict[str, StagePlan], store, say: Callable[[str], None],
                 run_name: str):
        self.p, self.plans, self.store, self.say, self.run_name = p, plans, store, say, run_name
        self.done: dict[str, dict] = {}
        self.uri: Optional[str] = None
        self.exp_id: Optional[str] = None
        self.run_id: Optional[str] = None
        self.table: list[dict] = []
        self.metrics: dict[str, float] = {}

    # ---------------------------------------------------------------- per stage
    def stage(self, name: str) -> None:
        from medvl.pipelines import tracking
        node, pl = self.p.stages[name], self.plans[name]
        if pl.action == "skip":
            self.say(f"[{name}] skipped: {pl.reason}")
            self.table.append({"stage": name, "kind": node.kind, "action": "skipped", "key": pl.key,
                               "location": pl.location, "seconds": 0.0, "metrics": {}})
            return
        upstream = {role: output_id(self.done[up]) for role, (up, _) in node.refs().items()}
        key = stage_key(name, pl.code, pl.config, upstream, pl.fingerprints)
        loc = self.store.location(name, key)
        t0 = time.time()
        marker = None if pl.forced else self.store.read_marker(name, key)
        waited = False
        if marker is None:
            if not pl.forced:  # the plan's reason may predate the upstream builds of this run
                pl.reason = ("an interrupted build left a half-written output" if self.store.partial(name, key)
                             else why_build(self.store, name, pl.code, pl.config, upstream, pl.fingerprints))
            marker, waited, built = self.build(node, pl, key, upstream)
        else:
            built = False
        if not built:
            self.store.verify(name, key, marker)
            tracking.reused_stage_run(self.uri, self.exp_id, self.run_id, self.p, node, marker, loc, waited)
            self.say(f"[{name}] reused {loc}" + (" (built by another run while this one waited)" if waited else
                                                 f" (built by run {(marker.get('mlflow') or {}).get('run_id')})"))
        self.done[name] = marker
        ms = marker.get("metrics") or {}
        self.metrics.update({f"{name}/{k}": v for k, v in ms.items()})
        self.table.append({"stage": name, "kind": node.kind, "action": "built" if built else "reused", "key": key,
                           "build_id": marker.get("build_id"), "location": loc, "seconds": round(time.time() - t0, 2),
                           "waited": waited, "metrics": ms,
                           "mlflow_run_id": (marker.get("mlflow") or {}).get("run_id")})

    def build(self, node: StageNode, pl: StagePlan, key: str, upstream: dict[str, str]) -> tuple[dict, bool, bool]:
        """Build under the key's lock; returns (marker, waited for another run, built here)."""
        name = node.name
        waited = [False]

        def on_wait(holder: dict) -> None:
            waited[0] = True
            self.say(f"[{name}] waiting: {describe_holder(holder)} is building key {key}")

        def on_stale(reason: str) -> None:
            self.say(f"[{name}] broke a stale build lock of key {key}: {reason}")

        cls = type(node.stage)
        if lock_kind(self.p, self.store) == "ray" or cls.executor == "task" or cls.needs_ray:
            from medvl.train.launcher import ensure_ray
            ensure_ray(self.p)  # [1] only when something is built: a fully cached pipeline runs without Ray
        lock = make_lock(self.p, self.store, name, key, f"pipeline run '{self.run_name}' (stage {name})",
                         on_wait, on_stale)
        with lock:
            if not pl.forced:
                marker = self.store.read_marker(name, key)
                if marker is not None:
                    return marker, waited[0], False
            gone = self.store.clean_partial(name, key)
            if gone:
                self.say(f"[{name}] removed the half-written output of an interrupted build: {', '.join(gone)}")
            return self._build_locked(node, pl, key, upstream), waited[0], True

    def _build_locked(self, node: StageNode, pl: StagePlan, key: str, upstream: dict[str, str]) -> dict:
        from medvl.pipelines import tracking
        name, cls = node.name, type(node.stage)
        store = self.store
        build_id = uuid.uuid4().hex[:12]
        self.say(f"[{name}] building key {key} ({node.kind}, {'Ray task' if cls.executor == 'task' else 'driver'})"
                 f": {pl.reason}")
        stage = copy.deepcopy(node.stage)
        inputs = {role: (up, self.done[up]["key"], self.done[up], sub) for role, (up, sub) in node.refs().items()}
        tags = tracking.stage_tags(self.p, node, key, self.run_id, False)
        run_id = None
        if not cls.owns_mlflow_run:
            run_id = tracking.start_stage_run(self.uri, self.exp_id, self.run_id, self.p, node, key, pl.config, upstream)
        aside = None
        if store.remote:
            if pl.forced:
                store.unpublish(name, key)
        else:
            aside = store.begin(name, key, build_id)
        from medvl.track import runs
        ctx = StageContext(stage=name, kind=node.kind, key=key, build_id=build_id, out=aside or Path("."),
                           pipeline=self.p.name, run_root=str(runs.run_root(self.p)), tracking_uri=self.uri,
                           experiment=self.p.track.experiment, mlflow_run_id=run_id, parent_run_id=self.run_id,
                           run_tags=tags, plugins=list(self.p.plugins), forced=pl.forced)
        t0 = time.time()
        try:
            if cls.executor == "task":
                import ray
                res = {k.lower(): v for k, v in stage.resources().items() if k in ("CPU", "GPU") and v}
                # "DEFAULT": not inside the placement group of a Tune trial running this pipeline (its bundle holds
                # the trial driver's CPU only); sweeps count each stage's resources per trial (cpus_per_trial)
                ref = _remote_execute().options(num_cpus=res.get("cpu", 1), num_gpus=res.get("gpu", 0),
                                                scheduling_strategy="DEFAULT").remote(
                    stage, ctx, inputs, store_root_of(store), store.remote)
                metrics, own_run, files = ray.get(ref)
            else:
                metrics, own_run, files = _execute(stage, ctx, inputs, store_root_of(store), store.remote)
        except BaseException as e:
            store.abort(aside)
            interrupted = isinstance(e, KeyboardInterrupt)
            tracking.fail_run(self.uri, run_id or ctx.mlflow_run_id, f"{type(e).__name__}: {e}",
                              "KILLED" if interrupted else "FAILED")
            if interrupted:
                raise
            raise StageFailed(f"stage '{name}' ({node.kind}) failed: {type(e).__name__}: {e}") from e
        run_id = run_id or own_run
        undeclared = sorted(set(metrics) - stage.metric_names())
        if undeclared:
            log.warning("stage %s reported metrics its kind does not declare in metric_names(): %s", name, undeclared)
        marker = new_marker(stage=name, kind=node.kind, key=key, build_id=build_id, code=pl.code, config=pl.config,
                            upstream=upstream, fingerprints=pl.fingerprints, metrics=metrics,
                            duration_s=time.time() - t0, pipeline=self.p.name,
                            mlflow={"run_id": run_id, "experiment_id": self.exp_id, "tracking_uri": self.uri,
                                    "pipeline_run_id": self.run_id})
        if store.remote:
            marker = store.publish(name, key, marker, files or {})
        else:
            marker = store.commit(name, key, aside, marker, replace=pl.forced)
        if run_id:
            tracking.finish_stage_run(self.uri, run_id, marker, store.location(name, key),
                                      None if cls.owns_mlflow_run else metrics)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())[:6])
        self.say(f"[{name}] built in {marker['duration_s']:.1f}s -> {store.location(name, key)}"
                 + (f": {shown}" if shown else ""))
        return marker


def store_root_of(store) -> str:
    return store.uri if isinstance(store, FsspecStore) else str(store.root)


# --------------------------------------------------------------------------- the pipeline


def run_pipeline(p: Pipeline, only: Iterable[str] = (), force: Iterable[str] = (), *,
                 parent_run_id: Optional[str] = None, tags: Optional[dict[str, str]] = None,
                 run_name: Optional[str] = None, say: Callable[[str], None] = lambda s: print(s, flush=True),
                 run_id_file: Optional[str | Path] = None) -> PipelineOutcome:
    """Build what is missing, reuse the rest; one MLflow parent run with a nested run per stage."""
    from medvl.pipelines import tracking
    from medvl.track import runs

    t0 = time.time()
    store = open_store(cache_root(p))
    plans = plan_pipeline(p, only, force, store)  # every error that needs no cluster, before anything starts
    run_name = run_name or p.run_name
    r = _Run(p, plans, store, say, run_name)
    r.uri = runs.tracking_uri(p)
    r.run_id, r.exp_id = tracking.start_pipeline_run(r.uri, p, run_name, parent_run_id, tags, plans)
    if run_id_file is not None:
        Path(run_id_file).parent.mkdir(parents=True, exist_ok=True)
        Path(run_id_file).write_text(r.run_id)
    say(f"pipeline '{p.name}': {len(p.stages)} stages, outputs in {store_root_of(store)}; MLflow run {r.run_id}")
    try:
        for name in p.order():
            r.stage(name)
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        tracking.fail_run(r.uri, r.run_id, f"{type(e).__name__}: {e}", status)
        raise
    tracking.finish_pipeline_run(r.uri, r.run_id, r.table, r.metrics, "FINISHED")
    return PipelineOutcome(p.name, run_name, r.run_id, r.exp_id, r.uri, store_root_of(store), r.table, r.metrics,
                           time.time() - t0)


__all__ = ["run_pipeline", "plan_pipeline", "StagePlan", "PipelineOutcome", "StageFailed", "cache_root",
           "input_fingerprints", "key_config", "output_id"]
