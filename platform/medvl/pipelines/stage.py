"""What a pipeline stage declares, and the registry that picks stage kinds by name (like `medvl.methods`).

A stage *kind* is a `Stage` subclass decorated `@register_stage`. It declares:

- `kind` (its name in a pipeline recipe) and `version`, a code version: bump it whenever the kind's code changes
  what it writes, and every cached output of that kind is rebuilt (the version is part of the cache key);
- `config_cls`, the dataclass of the settings it reads (one docstring per key). A stage's entry in the pipeline
  recipe is validated against it, overridden as `<stage>.<key>=value`, swept as `search_space: {<stage>.<key>:
  ...}` and logged as the stage run's MLflow params. This *config slice* is hashed into the cache key (minus
  `ignore_keys`, settings that cannot change the output, such as logging intervals);
- its inputs: upstream stages by role (`inputs = {"model": Input(...)}`, wired by name in the recipe:
  `inputs: {model: clip}`), and corpora / files named by its config (fields marked
  `field(metadata={"input": "corpus"})` or `{"input": "file"}`), which are fingerprinted (see
  `medvl.pipelines.fingerprint`). A path-valued config key can also be bound to an upstream stage's output
  (`inputs: {data.corpus: pair/corpus}`): the key then holds that output directory (plus a sub-path) at run time;
- how it runs (`executor`): `"task"`, a Ray task on any node (CPU-bound Python: scikit-learn, file conversion); or
  `"driver"`, in the pipeline's own process, for stages that start distributed work themselves: a Ray Data job
  (batch inference with an actor pool) or a Ray Train job (a method run through the seam, `run_training`);
- `run(ctx)`: writes its output into the directory `ctx.out` and returns its metrics (name -> float). It reads
  upstream outputs from `ctx.inputs[role]` (local directories). Everything else (keys, locks, atomic publication,
  MLflow runs, reuse) is the runner's.

Stage kinds that live outside medvl load through `plugins: [my_module]` in the pipeline recipe (or the
`medvl.stages` entry-point group), exactly like methods.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from medvl.config import ConfigError, field_type, flatten, from_dict


class PipelineError(ConfigError):
    """A pipeline recipe, a stage's inputs or a cached output is invalid; the message names the stage/key/path."""


@dataclass(frozen=True)
class Input:
    """An upstream stage a kind reads, by role."""
    doc: str = ""
    required: bool = True
    kinds: tuple[str, ...] = ()
    """Stage kinds accepted for this role (empty: any)."""


@dataclass
class StageContext:
    """Everything a running stage may use (picklable: it travels to the Ray task of a `task` stage)."""
    stage: str
    kind: str
    key: str
    build_id: str
    out: Path
    """The directory to write the output into (empty, local to the process running the stage)."""
    inputs: dict[str, Path] = field(default_factory=dict)
    """Upstream outputs by role (local directories, complete and read-only)."""
    upstream: dict[str, dict] = field(default_factory=dict)
    """Upstream completion markers by role (their metrics, config, key, MLflow run)."""
    pipeline: str = ""
    run_root: str = ""
    tracking_uri: str = ""
    experiment: str = "medvl"
    mlflow_run_id: Optional[str] = None
    """The stage's nested MLflow run (None for kinds that create their own: `owns_mlflow_run`)."""
    parent_run_id: Optional[str] = None
    """The pipeline's MLflow run (a kind that creates its own run nests it there)."""
    run_tags: dict[str, str] = field(default_factory=dict)
    """Tags for a run the stage creates itself (stage name, key, kind, pipeline)."""
    plugins: list[str] = field(default_factory=list)
    forced: bool = False
    """The build was forced (`--force` / `--only`): a kind that resumes interrupted work starts over instead."""

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """Log a file of the output (or any file) to the stage's MLflow run."""
        if not self.mlflow_run_id or not self.tracking_uri:
            return
        from mlflow.tracking import MlflowClient
        MlflowClient(self.tracking_uri).log_artifact(self.mlflow_run_id, str(path), artifact_path=artifact_path)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Intermediate metrics (curves); the metrics `run` returns are logged by the runner."""
        if not self.mlflow_run_id or not self.tracking_uri:
            return
        import time

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient
        ts = int(time.time() * 1000)
        MlflowClient(self.tracking_uri).log_batch(
            self.mlflow_run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


class Stage:
    """Base class of a stage kind; an instance is one stage of a pipeline (its name and typed config)."""

    kind: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    config_cls: ClassVar[type] = type(None)
    executor: ClassVar[str] = "task"
    """`task` (a Ray task; resources from `resources()`) or `driver` (the pipeline process starts Ray Data / Ray
    Train work itself)."""
    inputs: ClassVar[dict[str, Input]] = {}
    ignore_keys: ClassVar[tuple[str, ...]] = ()
    """Dotted config keys (or prefixes ending in '.') that cannot change the output: left out of the cache key."""
    reserved_keys: ClassVar[tuple[str, ...]] = ()
    """Dotted keys (or prefixes ending in '.') a sweep may not search (run identity, resources)."""
    needs_ray: ClassVar[bool] = True
    """False for a `driver` kind that uses no Ray at all: a pipeline that builds only such stages (and reuses the
    rest) never starts or connects to Ray."""
    owns_mlflow_run: ClassVar[bool] = False
    """True for kinds that create their stage run themselves (a Ray Train stage: the training run is the stage run)."""

    def __init__(self, name: str, config: Any):
        self.name = name
        self.config = config
        self.bound: set[str] = set()
        """Config keys bound to an upstream output (`inputs: {<key>: <stage>}`): filled at run time."""

    # ------------------------------------------------------------------ configuration
    @classmethod
    def parse_config(cls, raw: dict) -> Any:
        """The typed config of a stage entry (ConfigError names the key)."""
        return from_dict(cls.config_cls, raw)

    @classmethod
    def path_keys(cls, raw: dict) -> list[str]:
        """Dotted config keys holding local paths (resolved against the recipe's directory): fields marked
        `metadata={"path": True}` or `{"input": ...}`."""
        return [k for k, _ in _marked_fields(cls.config_cls, ("path", "input"))]

    @classmethod
    def key_type(cls, key: str) -> Any:
        """The annotation of a dotted config key (ConfigError when it does not exist)."""
        return field_type(key, cls.config_cls)

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def validate(self) -> None:
        """Value checks naming `<stage>.<key>`; default: the config's own `validate()` if it has one."""
        check = getattr(self.config, "validate", None)
        if callable(check):
            check()

    def code_version(self) -> str:
        return f"{self.kind}:{self.version}"

    def key_config(self) -> dict:
        """The config slice hashed into the cache key (flat dotted keys, without `ignore_keys`)."""
        return {k: v for k, v in flatten(self.config_dict()).items() if not _matches(k, self.ignore_keys)}

    # ------------------------------------------------------------------ inputs
    def corpora(self) -> dict[str, str]:
        """Corpus directories this stage reads, by config key (fingerprinted: manifest + shards)."""
        return self._marked_values("corpus")

    def files(self) -> dict[str, str]:
        """Files or directories this stage reads, by config key (fingerprinted by content)."""
        return self._marked_values("file")

    def _marked_values(self, what: str) -> dict[str, str]:
        out = {}
        flat = flatten(self.config_dict())
        for key, meta in _marked_fields(type(self.config), ("input",)):
            if meta.get("input") == what and flat.get(key) and key not in self.bound:
                out[key] = str(flat[key])
        return out

    def bindable_keys(self) -> list[str]:
        """Config keys an upstream output may be bound to (`inputs: {<key>: <stage>[/<sub-path>]}`)."""
        return self.path_keys(self.config_dict())

    def bind(self, key: str, path: str) -> None:
        """Set a path-valued config key to an upstream output directory (at run time, after keys are computed)."""
        from medvl.config import set_path
        d = self.config_dict()
        set_path(d, key, path)
        self.config = self.parse_config(d)

    # ------------------------------------------------------------------ running
    def resources(self) -> dict[str, float]:
        """Logical resources the stage uses while it runs (`CPU`, `GPU`): a `task` stage's Ray task asks for
        them; sweeps add them up to plan how many trials fit."""
        return {"CPU": 1.0}

    def metric_names(self) -> set[str]:
        """Exactly the metric names `run` returns (sweep objectives are checked against them)."""
        return set()

    def run(self, ctx: StageContext) -> dict[str, float]:  # abstract
        raise NotImplementedError


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _marked_fields(cls: Any, marks: tuple[str, ...], prefix: str = "") -> list[tuple[str, dict]]:
    """(dotted key, metadata) of the dataclass fields carrying any of `marks` in their metadata (recursing into
    nested dataclass fields)."""
    if not dataclasses.is_dataclass(cls):
        return []
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if any(m in f.metadata for m in marks):
            out.append((key, dict(f.metadata)))
        tp = hints.get(f.name)
        if dataclasses.is_dataclass(tp):
            out.extend(_marked_fields(tp, marks, key + "."))
    return out


# --------------------------------------------------------------------------- registry

_KINDS: dict[str, type[Stage]] = {}
_discovered = False


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage kind selectable by its `kind`; a duplicate name is an error."""
    if not cls.kind:
        raise ValueError(f"{cls.__qualname__}: a stage kind needs a `kind` name")
    if cls.executor not in ("task", "driver"):
        raise ValueError(f"stage kind {cls.kind!r}: executor must be 'task' or 'driver', got {cls.executor!r}")
    old = _KINDS.get(cls.kind)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"stage kind {cls.kind!r} is already registered by {old.__module__}.{old.__qualname__}")
    _KINDS[cls.kind] = cls
    return cls


def stage_kinds() -> dict[str, type[Stage]]:
    """All registered stage kinds (imports the built-in kinds and the `medvl.stages` entry points once)."""
    global _discovered
    if not _discovered:
        _discovered = True
        import importlib
        importlib.import_module("medvl.pipelines.kinds")
        from importlib.metadata import entry_points
        for ep in entry_points(group="medvl.stages"):
            ep.load()
    return dict(_KINDS)


__all__ = ["Stage", "StageContext", "Input", "PipelineError", "register_stage", "stage_kinds"]
