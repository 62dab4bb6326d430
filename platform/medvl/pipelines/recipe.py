"""Pipeline recipes: `jobs/pipeline_*.yaml` -> a typed, validated `Pipeline` (as strict as a training recipe).

    name: digits-probe
    track: {experiment: medvl-pipelines}          # one parent MLflow run per pipeline run, a nested run per stage
    cache: {lock: auto}                           # where outputs live and how builds are locked (CacheConfig)
    stages:                                       # any order; they run in dependency order
      clip:                                       # stage name: letters, digits, '_' and '-'
        kind: train                               # a registered stage kind (medvl.pipelines.kinds, plug-ins)
        base: digits_clip.yaml                    # optional: a YAML file with this stage's defaults
        train: {epochs: 3, num_workers: 1}        # the kind's config keys (here: a training recipe's)
      embed:
        kind: embed
        inputs: {model: clip}                     # upstream stages by role
        splits: [train, val]
      probe:
        kind: linear_probe
        inputs: {features: embed}

A stage entry holds `kind`, `inputs` (role or path-valued config key -> `<stage>[/<sub-path>]`), `base` and the
kind's config keys, nested (`train: {epochs: 3}`) or dotted (`train.epochs: 3`). Relative paths are resolved like
a training recipe's: against the current directory if they exist there, else against the file that names them
(the base file for its own keys). Unknown keys, wrong types, an unknown kind, an input naming no stage, a missing
required input and a dependency cycle are errors naming the dotted key.

Overrides (`medvl pipeline FILE key=value ...`, a sweep's `overrides:` and `search_space:`) address a stage's key
as `<stage>.<key>` (`clip.optim.lr=3e-4`, `probe.C=0.1`, `clip.base=other.yaml`, `embed.inputs.model=clip2`) and
the pipeline's own settings by their section (`track.experiment=x`, `cache.lock=ray`, `name=y`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from medvl.config import (ConfigError, RuntimeConfig, field_type, flatten, from_dict, get_path, import_plugins,
                          load_yaml, parse_override, set_path)
from medvl.pipelines.stage import PipelineError, Stage, stage_kinds

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
ENTRY_KEYS = ("kind", "inputs", "base")


@dataclass
class PipelineTrack:
    experiment: str = "medvl"
    """MLflow experiment of the pipeline's parent run and of every stage run nested under it."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite in `runtime.run_root`."""
    run_name: Optional[str] = None
    """Name of the pipeline's MLflow parent run (default: the pipeline's name)."""


@dataclass
class CacheConfig:
    root: Optional[str] = None
    """Where stage outputs live: a path (local or shared file system) or an fsspec URI (s3://bucket/prefix);
    default `<run_root>/stages`."""
    lock: Literal["auto", "file", "ray"] = "auto"
    """Build lock: `file` (O_EXCL lock files: across processes, clusters and nodes sharing the file system),
    `ray` (a named Ray actor: everything on one Ray cluster, also with an object-store cache), `auto` (file for a
    path, ray for a URI)."""
    stale_lock_s: float = 120.0
    """A lock without a heartbeat for this long is stale (its holder died) and is broken by a waiting run; a holder
    on the same host whose process is gone is detected at once."""
    wait_timeout_s: Optional[float] = None
    """Give up waiting for another run's build after this long (None: as long as its holder is alive)."""
    corpus_fingerprint: Literal["stat", "content"] = "stat"
    """Corpus inputs: manifest bytes + shard (size, mtime) (`stat`), or + shard content hashes (`content`)."""

    def validate(self) -> None:
        if self.stale_lock_s <= 0:
            raise ConfigError("cache.stale_lock_s must be > 0")
        if self.wait_timeout_s is not None and self.wait_timeout_s <= 0:
            raise ConfigError("cache.wait_timeout_s must be > 0 (or null)")
        if self.lock == "file" and self.root and "://" in self.root:
            raise ConfigError(f"cache.lock: file needs a cache on a file system, but cache.root is the URI "
                              f"{self.root!r}; use cache.lock: ray (or auto)")


TOP_SECTIONS: dict[str, type] = {"track": PipelineTrack, "runtime": RuntimeConfig, "cache": CacheConfig}
TOP_KEYS = ("name", "description", "stages", "plugins", *TOP_SECTIONS)


@dataclass
class StageNode:
    name: str
    kind: str
    stage: Stage
    inputs: dict[str, str] = field(default_factory=dict)
    """Role (or path-valued config key) -> `<upstream stage>[/<sub-path>]`."""
    relative_paths: dict[str, str] = field(default_factory=dict)
    """Config keys whose value was a relative path in a file, with that raw value (`medvl submit` re-maps them)."""

    def refs(self) -> dict[str, tuple[str, str]]:
        """Role/key -> (upstream stage, sub-path)."""
        out = {}
        for role, ref in self.inputs.items():
            up, _, sub = ref.partition("/")
            out[role] = (up, sub)
        return out

    @property
    def bound_keys(self) -> dict[str, tuple[str, str]]:
        """Inputs that bind a config key (not a declared role) to an upstream output."""
        return {k: v for k, v in self.refs().items() if k not in type(self.stage).inputs}


@dataclass
class Pipeline:
    name: str = "pipeline"
    description: str = ""
    stages: dict[str, StageNode] = field(default_factory=dict)
    track: PipelineTrack = field(default_factory=PipelineTrack)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    plugins: list[str] = field(default_factory=list)
    source: str = ""
    """The file the pipeline was read from (set by `load_pipeline`)."""

    @property
    def run_name(self) -> str:
        return self.track.run_name or self.name

    def order(self) -> list[str]:
        """Stages in dependency order (ties in file order)."""
        done: list[str] = []
        left = list(self.stages)
        while left:
            for n in left:
                if all(up in done for up, _ in self.stages[n].refs().values()):
                    done.append(n)
                    left.remove(n)
                    break
            else:  # pragma: no cover - cycles are rejected when loading
                raise PipelineError(f"cycle among stages {left}")
        return done

    def ancestors(self, name: str) -> set[str]:
        out: set[str] = set()
        todo = [up for up, _ in self.stages[name].refs().values()]
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo.extend(up for up, _ in self.stages[n].refs().values())
        return out

    def descendants(self, name: str) -> set[str]:
        return {n for n in self.stages if name in self.ancestors(n)}

    def metric_names(self) -> set[str]:
        """What a pipeline run reports: `<stage>/<metric>` for every metric every stage reports."""
        return {f"{n}/{m}" for n, node in self.stages.items() for m in node.stage.metric_names()}

    def peak_resources(self) -> dict[str, float]:
        """The most CPUs / GPUs any one stage uses (stages run one after another)."""
        out = {"CPU": 0.0, "GPU": 0.0}
        for node in self.stages.values():
            r = node.stage.resources()
            for k in out:
                out[k] = max(out[k], float(r.get(k, 0)))
        return out

    # -------------------------------------------------------------- dotted keys
    def field_type(self, path: str) -> Any:
        return pipeline_key_type(path, {n: type(s.stage) for n, s in self.stages.items()})

    def flat_values(self) -> dict[str, Any]:
        """Every key's current value under the override naming (`<stage>.<key>`, `track.experiment`, ...)."""
        d = pipeline_to_dict(self)
        out = {k: v for k, v in flatten({k: d[k] for k in TOP_SECTIONS}).items()}
        out.update({"name": self.name, "description": self.description})
        for n, node in self.stages.items():
            out.update({f"{n}.{k}": v for k, v in flatten(node.stage.config_dict()).items()})
            out.update({f"{n}.inputs.{k}": v for k, v in node.inputs.items()})
        return out

    def reserved(self, path: str) -> Optional[str]:
        """Why a key cannot be searched (None if it can)."""
        head, _, rest = path.partition(".")
        if head in ("name", "description", "plugins", *TOP_SECTIONS):
            return "a pipeline setting (run identity, tracking, cluster, cache) is the same for every trial"
        node = self.stages.get(head)
        if node is not None:
            if rest == "base" or rest.startswith("inputs"):
                return "the stage graph is the same for every trial"
            if any(rest == p or (p.endswith(".") and rest.startswith(p)) for p in type(node.stage).reserved_keys):
                return (f"stage {head!r} ({node.kind}) sets it itself (run names, tracking, cluster, per-stage "
                        f"resources)")
        return None


# --------------------------------------------------------------------------- key types


def pipeline_key_type(path: str, kinds: dict[str, type[Stage]]) -> Any:
    """The annotation of a pipeline override key; ConfigError naming it when it does not exist."""
    head, _, rest = path.partition(".")
    if head == "stages" and rest:  # `stages.<stage>.<key>` is accepted too
        head, _, rest = rest.partition(".")
    if head in kinds:
        if not rest:
            raise ConfigError(f"unknown key {path}: name a key of stage {head!r} (`{head}.<key>`)")
        if rest == "base" or rest.startswith("inputs."):
            return str
        if rest == "kind":
            raise ConfigError(f"{path}: a stage's kind cannot be overridden")
        try:
            return kinds[head].key_type(rest)
        except ConfigError as e:
            raise ConfigError(f"unknown key {path}: stage {head!r} (kind {kinds[head].kind}): {e}") from None
    if head in TOP_SECTIONS:
        if not rest:
            return TOP_SECTIONS[head]
        try:
            return field_type(rest, TOP_SECTIONS[head])
        except ConfigError:
            valid = ", ".join(f.name for f in dataclasses.fields(TOP_SECTIONS[head]))
            raise ConfigError(f"unknown key {path} (valid keys of {head}: {valid})") from None
    if head in ("name", "description") and not rest:
        return str
    raise ConfigError(f"unknown key {path}: no stage named {head!r} (stages: {', '.join(kinds) or 'none'}) and "
                      f"no pipeline setting ({', '.join(k for k in TOP_KEYS if k != 'stages')})")


def _normal(path: str) -> str:
    return path[len("stages."):] if path.startswith("stages.") else path


# --------------------------------------------------------------------------- loading


def is_pipeline_data(data: Any) -> bool:
    return isinstance(data, dict) and "stages" in data


def is_pipeline_file(path: str | os.PathLike) -> bool:
    try:
        return is_pipeline_data(load_yaml(path))
    except ConfigError:
        return False


def _parse_overrides(overrides: dict[str, Any] | list[str] | None) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return [(_normal(k), v) for k, v in overrides.items()]
    items = []
    for ov in overrides:
        k, v = parse_override(ov, "<stage>.<key>=value or <section>.<key>=value")
        items.append((_normal(k), v))
    return items


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _expand_dotted(d: dict) -> dict:
    """`{"train.epochs": 3}` -> `{"train": {"epochs": 3}}` (entries may use either form)."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(k, str) and "." in k:
            nested: dict = {}
            set_path(nested, k, v)
            out = _merge(out, nested)
        else:
            out = _merge(out, {k: v})
    return out


def _resolve_paths(cfg: dict, keys: list[str], base: Path, record: Optional[dict] = None) -> None:
    """Relative paths -> absolute: against the current directory if they exist there, else against `base`
    (the rule of `medvl.config.load_recipe`). URIs and absolute paths are left alone."""
    for key in keys:
        v = get_path(cfg, key)
        if not isinstance(v, str) or not v or "://" in v or os.path.isabs(v):
            continue
        cand = Path(v) if os.path.exists(v) or not (base / v).exists() else base / v
        set_path(cfg, key, str(cand.resolve()))
        if record is not None:
            record[key] = v


def _find_file(name: str, base: Path, what: str) -> Path:
    cands = [Path(name)] if os.path.isabs(name) else [base / name, Path(name)]
    for c in cands:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"{what}: file {name!r} not found (looked at {', '.join(str(c) for c in cands)})")


def _parse(raw: Any, base_dir: Path, overrides: list[tuple[str, Any]]) -> Pipeline:
    if not isinstance(raw, dict):
        raise ConfigError("a pipeline recipe must be a YAML mapping")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        hint = (" (is this a training recipe? run it with `medvl train`)" if unknown[0] in
                ("data", "model", "optim", "train", "loss", "eval", "method") else "")
        raise ConfigError(f"unknown key {unknown[0]} (valid keys: {', '.join(TOP_KEYS)}){hint}")
    plugins = import_plugins(raw.get("plugins") or [])
    kinds = stage_kinds()

    entries = raw.get("stages")
    if not isinstance(entries, dict) or not entries:
        raise ConfigError("stages: expected a non-empty mapping of stage names to stage entries")
    entries = {str(k): v for k, v in entries.items()}
    for name in entries:
        if not NAME_RE.match(name):
            raise ConfigError(f"stages.{name}: a stage name is letters, digits, '_' and '-' (starting with a "
                              f"letter); it names dotted keys and output folders")
        if name in TOP_KEYS:
            raise ConfigError(f"stages.{name}: {name!r} is a pipeline setting; give the stage another name")

    # overrides: per stage, and of the pipeline's own settings
    stage_ov: dict[str, list[tuple[str, Any]]] = {n: [] for n in entries}
    top = {k: copy.deepcopy(v) for k, v in raw.items() if k != "stages"}
    entry_kinds: dict[str, type[Stage]] = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"stages.{name}: expected a mapping with `kind:` and the stage's settings")
        kind = entry.get("kind")
        if not isinstance(kind, str):
            raise ConfigError(f"stages.{name}.kind: missing (registered stage kinds: {', '.join(sorted(kinds))})")
        if kind not in kinds:
            raise ConfigError(f"stages.{name}.kind: unknown stage kind {kind!r} (registered: "
                              f"{', '.join(sorted(kinds))})")
        entry_kinds[name] = kinds[kind]
    for key, value in overrides:
        pipeline_key_type(key, entry_kinds)  # raises for unknown keys, naming them
        head, _, rest = key.partition(".")
        if head in entries:
            stage_ov[head].append((rest, value))
        else:
            set_path(top, key, value)

    stages: dict[str, StageNode] = {}
    for name, entry in entries.items():
        cls = entry_kinds[name]
        where = f"stages.{name}"
        entry = dict(entry)
        inputs = entry.pop("inputs", None) or {}
        base = entry.pop("base", None)
        entry.pop("kind")
        if not isinstance(inputs, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in inputs.items()):
            raise ConfigError(f"{where}.inputs: expected a mapping of roles to stage names, got {inputs!r}")
        inputs = dict(inputs)
        cli: list[tuple[str, Any]] = []
        for k, v in stage_ov[name]:
            if k == "base":
                base = v
            elif k.startswith("inputs."):
                inputs[k[len("inputs."):]] = v
            else:
                cli.append((k, v))
        record: dict[str, str] = {}
        cfg: dict = {}
        if base is not None:
            if not isinstance(base, str) or not base:
                raise ConfigError(f"{where}.base: expected a file name, got {base!r}")
            bpath = _find_file(base, base_dir, f"{where}.base")
            cfg = _expand_dotted(load_yaml(bpath))
            _resolve_paths(cfg, cls.path_keys(cfg), bpath.parent, record)
        own = _expand_dotted(entry)
        _resolve_paths(own, cls.path_keys(own), base_dir, record)
        cfg = _merge(cfg, own)
        for k, v in cli:
            set_path(cfg, k, v)
            record.pop(k, None)  # no longer the file's relative path
        _resolve_paths(cfg, [k for k, _ in cli if k in cls.path_keys(cfg)], Path.cwd())
        try:
            config = cls.parse_config(cfg)
            stage = cls(name, config)
            stage.bound = {k for k in inputs if k not in cls.inputs}
            stage.validate()
        except ConfigError as e:
            raise ConfigError(f"{where} (kind {cls.kind}): {e}") from None
        stages[name] = StageNode(name, cls.kind, stage, inputs, record)

    try:
        name = top.get("name", "pipeline")
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name):
            raise ConfigError(f"name: {name!r} must be letters, digits, '.', '_' or '-' (it names runs)")
        sections = {k: from_dict(cls, top.get(k) or {}, prefix=k) for k, cls in TOP_SECTIONS.items()}
        sections["cache"].validate()
    except ConfigError:
        raise
    if sections["cache"].root and "://" not in sections["cache"].root:
        sections["cache"].root = str(Path(sections["cache"].root).expanduser().resolve())
    p = Pipeline(name=name, description=str(top.get("description") or ""), stages=stages, plugins=plugins,
                 **sections)
    _check_graph(p)
    return p


def _check_graph(p: Pipeline) -> None:
    names = list(p.stages)
    for n, node in p.stages.items():
        cls = type(node.stage)
        bindable = set(node.stage.bindable_keys())
        for role, (up, sub) in node.refs().items():
            where = f"stages.{n}.inputs.{role}"
            if role not in cls.inputs and role not in bindable:
                valid = sorted(cls.inputs) + sorted(bindable)
                raise PipelineError(f"{where}: stage kind {cls.kind!r} has no input {role!r} (inputs: "
                                    f"{', '.join(sorted(cls.inputs)) or 'none'}; path-valued keys an upstream "
                                    f"output can fill: {', '.join(sorted(bindable)) or 'none'})"
                                    if valid else f"{where}: stage kind {cls.kind!r} takes no inputs")
            if up not in p.stages:
                raise PipelineError(f"{where}: no stage named {up!r} (stages: {', '.join(names)})")
            spec = cls.inputs.get(role)
            if spec is not None and spec.kinds and p.stages[up].kind not in spec.kinds:
                raise PipelineError(f"{where}: stage {up!r} is a {p.stages[up].kind!r} stage; input {role!r} of "
                                    f"kind {cls.kind!r} takes {' or '.join(repr(k) for k in spec.kinds)}")
            if spec is not None and sub:
                raise PipelineError(f"{where}: a role input names a whole stage ({up!r}), not a sub-path")
        for role, spec in cls.inputs.items():
            if spec.required and role not in node.inputs:
                raise PipelineError(f"stages.{n}.inputs: missing input {role!r} (kind {cls.kind!r}: {spec.doc or role})")
    # cycles: depth-first search with the path on the stack
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for up, _ in p.stages[n].refs().values():
            if state.get(up) == 1:
                cyc = path[path.index(up):] + [up] if up in path else [n, up]
                raise PipelineError(f"stages: dependency cycle {' -> '.join(reversed(cyc))} (a stage cannot "
                                    f"depend on its own output)")
            if state.get(up) is None:
                visit(up, path + [up])
        state[n] = 2

    for n in names:
        if state.get(n) is None:
            visit(n, [n])


def load_pipeline(path: str | os.PathLike | None = None, overrides: dict | list[str] | None = None,
                  data: dict | None = None) -> Pipeline:
    """Read a pipeline recipe (or a dict such as `pipeline_to_dict`'s), apply overrides, validate everything
    that needs no cluster and no input files (those are checked when keys are computed)."""
    raw = load_yaml(path) if path is not None else copy.deepcopy(data or {})
    base_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    try:
        p = _parse(raw, base_dir, _parse_overrides(overrides))
    except ConfigError as e:
        where = f"{path}: " if path else ""
        raise PipelineError(f"{where}{e}") from None
    p.source = str(Path(path).resolve()) if path is not None else ""
    return p


def pipeline_to_dict(p: Pipeline) -> dict:
    """The fully resolved pipeline (bases merged, paths absolute) as a dict that `load_pipeline(data=...)` reads."""
    return {
        "name": p.name, "description": p.description, "plugins": list(p.plugins),
        **{k: dataclasses.asdict(getattr(p, k)) for k in TOP_SECTIONS},
        "stages": {n: {"kind": node.kind, **({"inputs": dict(node.inputs)} if node.inputs else {}),
                       **node.stage.config_dict()} for n, node in p.stages.items()},
    }


def dump_pipeline(p: Pipeline) -> str:
    return yaml.safe_dump(pipeline_to_dict(p), sort_keys=False)


__all__ = ["Pipeline", "StageNode", "CacheConfig", "PipelineTrack", "load_pipeline", "pipeline_to_dict",
           "dump_pipeline", "is_pipeline_file", "is_pipeline_data", "pipeline_key_type", "PipelineError"]
