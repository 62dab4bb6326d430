"""Typed recipe configuration: YAML file -> dataclass tree, strict validation, `key.sub=value` overrides.

A recipe in `jobs/*.yaml` chooses values; the dataclasses below define every key, its type and its meaning.
Unknown keys and wrong types are errors that name the dotted key. Ray passes configs as dicts and Tune samples
flat dotted keys, so everything round-trips: `Recipe` <-> nested dict <-> flat `{"optim.lr": ...}`.

Method sections. Each training method (`recipe.method`, see `medvl.methods`) and each plug-in that wraps a
method (CLIPin) may own a typed section named after it (`cxr_clip: {w_icl: 1.0}`); its dataclass is registered
here with `register_section` by the module that defines the method, so the section is validated, overridden,
swept and logged exactly like the fixed sections. The built-in methods live in the `medvl.methods` package,
which `sections()` imports on first use (plug-in discovery, as timm's and open_clip's model registries do);
third-party methods register through the `medvl.methods` entry-point group.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the dotted key."""


@dataclass
class DataConfig:
    corpus: str = ""
    """Corpus directory (manifest.json + Parquet shards), local path or shared-storage path."""
    train_split: str = "train"
    """Split whose shards are streamed into training."""
    val_split: Optional[str] = "val"
    """Held-out split for evaluation (zero-shot + retrieval); None disables evaluation."""
    val_corpus: Optional[str] = None
    """Evaluate on another corpus' `val_split` instead (default: `corpus`)."""
    batch_size: int = 64
    """Global batch size (split evenly over the train workers)."""
    shuffle_buffer: int = 1024
    """Rows shuffled together on each rank: a rank's rows of an epoch are cut into windows of this many rows and
    each window is permuted, seeded by (seed, epoch, rank, window), so the order is reproducible and a resumed run
    continues at exactly the next unseen row (0 = no shuffle inside windows; windows of `max_unit_rows`). The
    decode task of a window holds its rows' encoded bytes (not pixels)."""
    shuffle_buffer_mb: float = 256
    """Memory bound of a shuffle window: it ends early once its rows hold this many MB of encoded data (by the
    Parquet row-group sizes), so a corpus of large images shuffles in smaller windows instead of a decode task
    holding gigabytes."""
    shuffle_files: bool = True
    """Shuffle the order of the read units (Parquet row groups of the shards) every epoch (seeded by seed, epoch)."""
    max_unit_rows: int = 1024
    """Largest read unit: a bigger Parquet row group is read in pieces of this many rows (each piece re-reads the
    row group, so corpora written by `medvl ingest`, with 256-row groups, never need it)."""
    prefetch_batches: int = 2
    """Batches each worker prefetches from Ray Data."""
    decode_batch_size: int = 64
    """Rows per Ray Data `map_batches` decode+augment call."""
    decode_tasks: int = 2
    """Concurrent Ray Data decode tasks for the whole job, shared by the ranks (each rank's pipeline runs
    ceil(decode_tasks / num_workers)); it changes speed, never the data order."""
    decoded_buffer_mb: float = 0
    """Object-store budget of each rank's decode pipeline (Ray Data backpressure, MB): decode tasks wait once this
    many MB of decoded batches wait for the trainer. 0 = Ray Data's own budget (a share of the whole object store).
    Measured with `bench/data` (2 decode tasks, 224 px): with 16 MB blocks (`decoded_block_mb`, 2026-12-06) 256 MB
    kept the peak memory growth from 1x to 10x / 30x the corpus at 1.09x / 1.10x (PSS; 1.14x / 1.11x without) at
    no cost in decode speed (1335 vs 1223 rows/s at 10x); with Ray Data's 128 MiB blocks (2026-12-03) such budgets
    cut decoding from 1234 to 890-940 rows/s. Off by default because it is one budget per rank whatever the number
    of decode tasks: on a node with many decode tasks (a GPU node) it would throttle them (not measured)."""
    decoded_block_mb: float = 16
    """Size of the blocks the decode tasks hand to Ray Data (its `target_max_block_size` for the decode stage,
    MB; 0 = Ray Data's own 128 MiB). A decode task yields its window in blocks of about this size, so the trainer
    can take a window's first rows while the rest decodes and the pipeline holds parts of windows, not whole ones.
    Measured with `bench/data` (2026-12-06, 2 decode tasks, 224 px, 147 KiB per row): against 128 MiB blocks
    (about 870 rows each), the peak memory at 10x / 30x the corpus was 13 % / 20 % lower at a decode rate within
    the machine's spread, and the first batch came about 0.8 s sooner. It changes speed and memory, never the data
    order."""
    text_sampling: Literal["random", "first", "join"] = "random"
    """How one caption is chosen from a row's `texts`: a random one per epoch, the first, or all joined."""


@dataclass
class ModelConfig:
    name: str = "digits-vit-tiny"
    """open_clip model name (built-in, from this package's configs, or from `config_dir`)."""
    config_dir: Optional[str] = None
    """Directory of extra open_clip JSON model configs (registered with open_clip.add_model_config)."""
    pretrained: Optional[str] = None
    """Path to a local weights file to load (never downloaded): a state dict (optionally under `state_dict` or
    `model`) in a `torch.save` file holding only tensors and plain values, or a `.safetensors` file."""
    allow_partial_load: bool = False
    """Accept a `pretrained` file whose keys do not all match the model (missing and unexpected keys are then
    listed as a warning); by default any mismatch is an error that lists them."""
    lock_image: bool = False
    """Freeze the image tower."""
    lock_text: bool = False
    """Freeze the text tower."""
    init_logit_scale: Optional[float] = None
    """Initial temperature as logit scale = log(1/T); None keeps open_clip's default (log(1/0.07))."""


@dataclass
class LossConfig:
    kind: Literal["clip", "siglip"] = "clip"
    """open_clip loss: `clip` = ClipLoss (InfoNCE), `siglip` = SigLipLoss."""
    local_loss: bool = True
    """ClipLoss: each rank computes local x global logits (linear scaling)."""
    gather_with_grad: bool = True
    """ClipLoss: all-gather features with autograd (exact gradients)."""
    siglip_dist_impl: Literal["bidir", "shift", "reduce", "gather"] = "bidir"
    """SigLipLoss distributed implementation."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.1
    """Weight decay; never applied to norms, biases, logit scale/bias, embeddings of size < 2-D."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine schedule."""
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: Optional[float] = 1.0
    """Max global grad norm (None = no clipping)."""
    accum_freq: int = 1
    """Gradient accumulation over k micro-batches with feature caching (open_clip style)."""
    impl: Literal["fused", "foreach", "for_loop"] = "fused"
    """AdamW kernel: `fused` (one kernel over all parameters, CPU and CUDA; the fastest), `foreach`, or
    `for_loop` (torch's CPU default, which open_clip_train gets). Same update rule either way."""


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs when smaller)."""
    seed: int = 0
    num_workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    launch: Literal["auto", "workers", "in_process"] = "auto"
    """`workers`: Ray Train starts a controller and `num_workers` worker processes per run, and restarts them after
    a crash (`max_failures`). `in_process` (1 worker only): the training function runs in the process that calls
    `fit()` (`medvl train`, a sweep trial's actor) through Ray Train's local mode, with medvl persisting, registering
    and rotating the checkpoints as Ray Train does and retrying a failed attempt from the last one (`max_failures`);
    it saves the ~10 s of processes Ray Train starts per run. A crash of that process is not retried in it: re-run
    the command (a sweep: Tune restarts the trial, `resources.trial_max_failures`), it resumes from the last
    checkpoint. `auto` (the default): `in_process` for the 1-worker trials of a sweep (where Tune restarts a trial
    whose actor died, and the start-up is paid per trial), `workers` everywhere else (`resolve_launch`)."""
    use_gpu: bool = False
    cpus_per_worker: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision: bf16/fp16 on GPU; on CPU bf16 autocast, fp16 runs fp32 (CPU fp16 kernels are slow)."""
    torch_threads: Optional[int] = None
    """torch intra-op threads per worker (default: cpus_per_worker)."""
    log_every: int = 10
    """Log metrics to MLflow every N steps (rank 0)."""
    ckpt_every: int = 50
    """Report a checkpoint every N steps (and at every epoch end)."""
    keep_checkpoints: int = 2
    max_failures: int = 2
    """Worker-group restarts allowed (Ray Train FailureConfig)."""
    max_nonfinite_steps: int = 10
    """A step whose loss (or clipped gradient norm) is NaN/inf on any rank is skipped on every rank (no optimizer
    or scheduler step) and counted (`train/nonfinite_steps`). Up to this many in a row are skipped; one more stops
    the run with an error that names the last good checkpoint (0: the first non-finite step stops it)."""


def resolve_launch(train: "TrainConfig", sweep_trial: bool = False) -> str:
    """What `train.launch` means for this run: `auto` is `in_process` for a sweep's 1-worker trial, else `workers`."""
    if train.launch != "auto":
        return train.launch
    return "in_process" if sweep_trial and train.num_workers == 1 else "workers"


@dataclass
class EvalConfig:
    every_epoch: bool = True
    """Evaluate on `data.val` at the end of each epoch (rank 0)."""
    at_end: bool = False
    """With `every_epoch: false`: evaluate once, at the end of training (the last epoch, or `train.max_steps`), e.g.
    when one pass over the val set costs as much as many steps (sliding-window 3D inference)."""
    classnames: list[str] = field(default_factory=list)
    """Class names for zero-shot classification (index = label id); empty = from the val manifest."""
    templates: list[str] = field(default_factory=lambda: ["a photo of {}."])
    """Prompt templates; the class embedding is the mean of the templates' text embeddings."""
    label_field: Optional[str] = None
    """Which `labels` key holds the class index (default: the manifest's `label_field`)."""
    retrieval_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    batch_size: int = 256
    max_rows: int = 20000
    """Evaluate on at most this many held-out rows (decoded once to uint8, cached on rank 0)."""
    max_memory_mb: float = 4096
    """Memory bound of the cached held-out images (uint8): rows beyond it are left out, with a warning
    (20000 rows at 224 px take 2.9 GB)."""
    linear_probe: bool = False
    """Also fit a logistic-regression probe (scikit-learn) on frozen image features of `probe_train_rows` rows of
    the train split and report its held-out accuracy (`val/linear_probe_accuracy`); needs labels."""
    probe_train_rows: int = 2000
    """Train-split rows whose frozen features train the linear probe."""
    probe_label_fraction: float = 1.0
    """Fraction of those rows whose labels the probe may use (label-efficiency studies: 0.01, 0.1, 1.0)."""

    @property
    def enabled(self) -> bool:
        """Whether the trainer evaluates at all (each epoch, or once at the end)."""
        return self.every_epoch or self.at_end


@dataclass
class TrackConfig:
    tracking_uri: Optional[str] = None
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite in `runtime.run_root`."""
    experiment: str = "medvl"
    run_name: Optional[str] = None
    """MLflow run name and Ray Train run name; default: the recipe name. Same name again = resume."""
    log_model: bool = True
    """Log the final model as the run's MLflow model (`model`: a pyfunc; contrastive methods also log the towers in
    open_clip's format, `open_clip/`)."""
    pictures: bool = True
    """Draw the run's pictures (loss curves; retrieval panel and zero-shot confusion for contrastive methods) after
    each evaluation, as MLflow artifacts under `pictures/` (rank 0, in a background thread)."""
    register_model: Optional[str] = None
    """Register the final model in the MLflow Model Registry under this name (a new version per run); None: not."""
    outage_wait_s: float = 60.0
    """How long the driver waits for an unreachable tracking server at the start of a run (then: a clear error,
    nothing started) and at its end (then: training is kept, the run is finalized later by `medvl sync-metrics`).
    During training an outage never waits: metrics go to a local journal and are delivered when it is back."""


@dataclass
class RuntimeConfig:
    ray_address: Optional[str] = None
    """Ray cluster address; None = $RAY_ADDRESS or an embedded local Ray."""
    num_cpus: Optional[int] = None
    """Logical CPUs for an embedded local Ray (default: max(4, 2*cores) so data + train actors fit)."""
    run_root: str = "runs"
    """Where checkpoints, Ray Train state and the default MLflow store live (shared storage on clusters)."""
    scratch_dir: Optional[str] = None
    """Local directory where rank 0 writes a checkpoint before Ray Train persists it to the run's storage (it is
    deleted right after); default: the system temp dir."""
    allow_recipe_change: bool = False
    """Resume a run although its recipe changed (the changed keys are logged in its MLflow run); without it a
    changed recipe is refused with the list of changes (`medvl train ... --allow-recipe-change`)."""


@dataclass
class SectionInfo:
    name: str
    cls: Optional[type]
    """The section's dataclass (None: a method without knobs of its own)."""
    kind: Literal["method", "plugin"]
    """`method`: selected by `recipe.method`; `plugin`: wraps the selected method when its section says so."""


_SECTIONS: dict[str, SectionInfo] = {}
_discovered = False


def register_section(name: str, cls: Optional[type], kind: str = "method") -> None:
    """Register a method's (or plug-in's) recipe section; a second, different registration is an error."""
    if name in _FIXED_SECTIONS:
        raise ValueError(f"section name {name!r} is a built-in recipe section")
    old = _SECTIONS.get(name)
    if old is not None and (old.cls is not cls or old.kind != kind):
        raise ValueError(f"recipe section {name!r} is already registered (by {old.cls!r}, {old.kind})")
    if cls is not None and not dataclasses.is_dataclass(cls):
        raise TypeError(f"section {name!r}: {cls!r} is not a dataclass")
    _SECTIONS[name] = SectionInfo(name, cls, kind)  # type: ignore[arg-type]


def sections() -> dict[str, SectionInfo]:
    """All registered method/plug-in sections (imports the built-in methods and entry points once)."""
    global _discovered
    if not _discovered:
        _discovered = True
        import importlib
        importlib.import_module("medvl.methods")  # registers the built-in methods (see the module docstring)
        from importlib.metadata import entry_points
        for ep in entry_points(group="medvl.methods"):
            ep.load()
    return dict(_SECTIONS)


def method_names() -> list[str]:
    return sorted(n for n, s in sections().items() if s.kind == "method")


@dataclass
class Recipe:
    name: str = "experiment"
    method: str = "clip"
    """Training method, by registered name (`medvl.methods`: clip, and the methods of later issues)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    plugins: list[str] = field(default_factory=list)
    """Python modules imported before the recipe is validated, for methods defined outside medvl (each module
    registers its methods with `@medvl.methods.register_method`); they must be importable on every Ray node."""
    sections: dict[str, Any] = field(default_factory=dict)
    """Method and plug-in sections by name (typed dataclasses); written at the top level of the YAML
    (`cxr_clip: {...}`), reachable as attributes (`recipe.cxr_clip.w_icl`)."""

    def __getattr__(self, name: str) -> Any:  # only called when normal lookup fails: method sections
        secs = self.__dict__.get("sections")
        if secs is not None and name in secs:
            return secs[name]
        raise AttributeError(f"recipe has no section {name!r}")

    def section(self, name: str, default: Any = None) -> Any:
        return self.sections.get(name, default)

    def validate(self) -> "Recipe":
        checks = [
            (self.data.batch_size > 0, "data.batch_size must be > 0"),
            (self.data.batch_size % max(1, self.train.num_workers) == 0,
             f"data.batch_size ({self.data.batch_size}) must be divisible by train.num_workers ({self.train.num_workers})"),
            (self.train.num_workers >= 1, "train.num_workers must be >= 1"),
            (self.train.launch != "in_process" or self.train.num_workers == 1,
             f"train.launch: in_process runs one rank in the calling process; it needs train.num_workers: 1 "
             f"(got {self.train.num_workers}); use train.launch: workers for data-parallel training"),
            (self.train.epochs >= 1, "train.epochs must be >= 1"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (self.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (self.optim.accum_freq >= 1, "optim.accum_freq must be >= 1"),
            (self.train.log_every >= 1, "train.log_every must be >= 1"),
            (self.train.ckpt_every >= 1, "train.ckpt_every must be >= 1"),
            (self.train.max_failures >= -1, "train.max_failures must be >= -1"),
            (bool(self.data.corpus), "data.corpus must name a corpus directory"),
            (self.train.max_steps is None or self.train.max_steps > 0, "train.max_steps must be > 0"),
            (self.data.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0"),
            (self.data.max_unit_rows >= 1, "data.max_unit_rows must be >= 1"),
            (self.data.shuffle_buffer_mb > 0, "data.shuffle_buffer_mb must be > 0"),
            (self.data.decoded_buffer_mb >= 0, "data.decoded_buffer_mb must be >= 0 (0 = Ray Data's own budget)"),
            (self.data.decoded_block_mb >= 0,
             "data.decoded_block_mb must be >= 0 (0 = Ray Data's own block size)"),
            (self.eval.max_memory_mb > 0, "eval.max_memory_mb must be > 0"),
            (self.train.max_nonfinite_steps >= 0, "train.max_nonfinite_steps must be >= 0"),
            (self.track.outage_wait_s >= 0, "track.outage_wait_s must be >= 0"),
            (self.track.register_model is None or bool(re.fullmatch(r"[\w.\- /]{1,256}", self.track.register_model)),
             f"track.register_model: {self.track.register_model!r} is not a registered-model name (letters, digits, "
             f"'_', '-', '.', '/', spaces)"),
            (self.track.register_model is None or self.track.log_model,
             "track.register_model needs track.log_model: true (there is no model to register otherwise)"),
            (self.train.cpus_per_worker >= 1, "train.cpus_per_worker must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        from medvl.redact import secret_in_recipe
        leaked = secret_in_recipe(flatten(to_dict(self)))
        if leaked:  # every recipe key is logged as an MLflow param and copied into each run's recipe.yaml
            raise ConfigError(f"{leaked}: holds a credential; credentials come from the environment only "
                              f"(MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD, ...), never "
                              f"from a recipe, which is logged and copied into every run")
        for sec in self.sections.values():  # a section may define its own checks (`validate()` naming its keys)
            check = getattr(sec, "validate", None)
            if callable(check):
                check()
        return self

    @property
    def run_name(self) -> str:
        return self.track.run_name or self.name


# --------------------------------------------------------------------------- dict <-> dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert the few safe cases (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = args[:1] or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


_FIXED_SECTIONS = ("name", "method", "data", "model", "loss", "optim", "train", "eval", "track", "runtime",
                   "plugins", "sections")


def import_plugins(plugins: Any) -> list[str]:
    """Import the recipe's `plugins:` modules (they register methods and sections); a clear error otherwise."""
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"plugins: expected a list of module names, got {plugins!r}")
    import importlib
    for mod in plugins:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ConfigError(f"plugins: cannot import {mod!r} ({e})") from None
    return plugins


def _recipe_from_dict(data: dict) -> "Recipe":
    """The fixed sections as dataclass fields; registered method/plug-in sections by name."""
    import_plugins(data.get("plugins") or [])
    regs = sections()
    method = data.get("method", "clip")
    if not isinstance(method, str):
        raise ConfigError(f"method: expected a string, got {method!r}")
    info = regs.get(method)
    if info is None or info.kind != "method":
        raise ConfigError(f"method: unknown method {method!r} (registered: {', '.join(method_names())})")
    fixed = {k: v for k, v in data.items() if k not in regs}
    if "sections" in fixed:
        raise ConfigError("unknown key sections (method sections are written at the top level: `<method>: {...}`)")
    recipe = from_dict(Recipe, fixed, _top=True)
    secs: dict[str, Any] = {}
    for name, raw in data.items():
        if name not in regs:
            continue
        sec = regs[name]
        if sec.kind == "method" and name != method:
            raise ConfigError(f"{name}: this section configures method {name!r}, but the recipe's method is "
                              f"{method!r} (set method: {name}, or remove the section)")
        if sec.cls is None:
            if raw not in (None, {}):
                raise ConfigError(f"{name}: method {name!r} has no settings of its own")
            continue
        secs[name] = from_dict(sec.cls, raw if raw is not None else {}, prefix=name)
    if info.cls is not None and method not in secs:
        secs[method] = info.cls()
    recipe.sections = {k: secs[k] for k in sorted(secs)}
    return recipe


def from_dict(cls: type, data: Any, prefix: str = "", _top: bool = False) -> Any:
    if cls is Recipe and not _top:
        if not isinstance(data, dict):
            raise ConfigError(f"<recipe>: expected a mapping, got {data!r}")
        return _recipe_from_dict(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<recipe>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - ({"sections"} if cls is Recipe else set())
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        valid = sorted(names) + (sorted(sections()) if cls is Recipe else [])
        raise ConfigError(f"unknown key {where}{unknown[0]!s} (valid keys: {', '.join(valid)})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    d = dataclasses.asdict(obj)
    if isinstance(obj, Recipe):  # method sections at the top level, as written in YAML
        d.update(d.pop("sections"))
    return d


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def field_type(path: str, cls: type = Recipe) -> Any:
    """The annotation of a dotted key (`optim.lr` -> float); ConfigError if the path does not exist."""
    tp: Any = cls
    parts = path.split(".")
    if cls is Recipe and parts[0] in sections():
        sec = sections()[parts[0]]
        if sec.cls is None:
            raise ConfigError(f"unknown key {path}: method {parts[0]!r} has no settings of its own")
        if len(parts) == 1:
            return sec.cls
        return field_type(".".join(parts[1:]), sec.cls) if dataclasses.is_dataclass(sec.cls) else Any
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown key {path}: {'.'.join(parts[:i])} has no sub-keys")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise ConfigError(f"unknown key {path} (valid under {'.'.join(parts[:i]) or 'recipe'}: "
                              f"{', '.join(sorted(hints))})")
        tp = hints[part]
    return tp


def set_path(d: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_override(ov: str, form: str = "key.sub=value", error: type[Exception] = ConfigError) -> tuple[str, Any]:
    """`"optim.lr=0.001"` -> `("optim.lr", 0.001)`: the value is parsed as YAML (an empty value is ""). Recipes,
    pipelines and sweeps parse their command-line overrides with it; `form` / `error` word their own complaint."""
    k, sep, v = ov.partition("=")
    if not sep:
        raise error(f"override {ov!r} must look like {form}")
    return k.strip(), (yaml.safe_load(v) if v != "" else "")


def apply_overrides(data: dict, overrides: dict[str, Any] | list[str]) -> dict:
    """Apply `{"optim.lr": 1e-3}` or `["optim.lr=1e-3", ...]` to a nested recipe dict (values parsed as YAML)."""
    data = copy.deepcopy(data)
    items: list[tuple[str, Any]]
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = [parse_override(ov) for ov in overrides]
    for k, v in items:
        field_type(k)  # raises for unknown paths
        set_path(data, k, v)
    return data


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {p}")
    with open(p) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a YAML mapping")
    return data


PATH_KEYS = ("data.corpus", "data.val_corpus", "model.config_dir", "model.pretrained")
"""Fixed recipe keys that hold local paths; a section marks its own with `field(metadata={"path": True})`."""


def path_keys(data: dict) -> list[str]:
    """Dotted keys of `data` (a raw recipe dict) that hold local paths: the fixed ones and the sections'."""
    keys = list(PATH_KEYS)
    for name, sec in sections().items():
        if sec.cls is not None and isinstance(data.get(name), dict):
            keys += [f"{name}.{f.name}" for f in dataclasses.fields(sec.cls) if f.metadata.get("path")]
    return keys


def get_path(data: dict, key: str) -> Any:
    cur: Any = data
    for p in key.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


def _resolve_paths(data: dict, base: Path) -> dict:
    """Local relative paths in a recipe (corpus, model dir/weights, a section's files) become absolute, so Ray
    workers (whose working directory differs) find them: relative to the current directory if they exist there,
    else to the recipe file's directory. URIs (s3://...) and absolute paths are left alone."""
    for key in path_keys(data):
        v = get_path(data, key)
        if not isinstance(v, str) or not v or "://" in v or os.path.isabs(v):
            continue
        cand = Path(v) if os.path.exists(v) or not (base / v).exists() else base / v
        set_path(data, key, str(cand.resolve()))
    return data


def load_recipe(path: str | os.PathLike | None = None, overrides: dict | list[str] | None = None,
                data: dict | None = None) -> Recipe:
    """Load a recipe YAML (or a dict), apply overrides, validate and return the typed `Recipe`."""
    raw = load_yaml(path) if path is not None else copy.deepcopy(data or {})
    if overrides:
        raw = apply_overrides(raw, overrides)
    if path is not None:
        raw = _resolve_paths(raw, Path(path).resolve().parent)
    try:
        recipe = from_dict(Recipe, raw)
    except ConfigError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{e}") from None
    return recipe.validate()


def peek_runtime(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                 data: dict | None = None) -> Optional[RuntimeConfig]:
    """The `runtime` section of a recipe (a file, or a dict, as `load_recipe` takes them) with its `runtime.*`
    overrides, read without validating the rest (no method is imported: it is cheap), so a command can start Ray
    while `load_recipe` runs. None when the section itself is not valid: `load_recipe` reports that."""
    try:
        raw = copy.deepcopy((load_yaml(path) if path is not None else data or {}).get("runtime") or {})
        for ov in overrides or []:
            if ov.split("=", 1)[0].strip().startswith("runtime."):
                k, v = parse_override(ov)
                set_path(raw, k[len("runtime."):], v)
        return from_dict(RuntimeConfig, raw)
    except Exception:  # noqa: BLE001 - anything wrong here is load_recipe's to report, with its context
        return None


def recipe_from_dict(d: dict) -> Recipe:
    return from_dict(Recipe, d).validate()


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
