"""The method seam: what a training method declares, the registry that picks it by `recipe.method`, and the
plug-in mechanism that wraps one method in another (CLIPin over CLIP or CXR-CLIP).

A method owns everything that differs between methods; the trainer (`medvl.train`) owns everything that does not
(Ray Train, DDP, AMP, gradient accumulation, clipping, the LR schedule, checkpoints and resume, MLflow logging,
skip counting). Methods never touch Ray. The per-step calls, in order, on every rank:

    batch = method.prepare_batch(batch, device)     # e.g. uint8 -> normalised float images, on the device
    out   = method.forward(model, batch)            # calls model(batch) once (DDP), plus any no-grad parts
    terms = method.loss(out)                        # {"loss": total, "<term>": ...}: each logged as train/<term>
    ... backward / clip / optimizer / scheduler (the trainer) ...
    method.after_step(unwrapped_model)              # EMA updates, clamps: after the optimizer step, every rank

Gradient accumulation (`optim.accum_freq = k`) is the trainer's, for every method, open_clip style: `forward` runs
on all k micro-batches without grad, then each is re-run with grad and the per-sample outputs named in
`feature_keys` are concatenated with the cached ones, so every loss term sees the whole batch (all negatives).
Learnable scalars a loss uses (temperature, loss weights) must reach `loss` through `out` under a name in
`global_keys`, so that exactly one of the k passes carries their gradient.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import nn

from medvl.config import Recipe, register_section
from medvl.data.decode import RowDecoder
from medvl.losses import Dist

_NP_TO_TORCH = {"uint8": torch.uint8, "int64": torch.long, "int32": torch.int32, "float32": torch.float32,
                "float16": torch.float16, "bool": torch.bool}


class Method:
    """Base class of a training method. Subclasses set `name` (and `config_cls`, the dataclass of the recipe
    section `<name>:`) and implement the methods marked abstract; `@register_method` makes them selectable."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[Optional[type]] = None
    plugin: ClassVar[bool] = False
    version: ClassVar[str] = "1"
    """Code version: bump it when a change to the method changes what it trains. Pipelines put it in the cache
    key of every stage that trains this method (`medvl.pipelines`), so such stages are rebuilt."""
    feature_keys: ClassVar[tuple[str, ...]] = ()
    """Per-sample outputs of `forward` (batch dimension first), concatenated across accumulation micro-batches."""
    global_keys: ClassVar[tuple[str, ...]] = ("logit_scale", "logit_bias")
    """Learnable scalars in `forward`'s output: only one accumulation pass keeps their gradient."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.dist = Dist()
        self.device = torch.device("cpu")

    @property
    def cfg(self) -> Any:
        """This method's recipe section (None for a method without one)."""
        return self.recipe.section(self.name)

    def describe(self) -> str:
        return self.name

    # ---------------------------------------------------------------- data
    def decoder(self, train: bool) -> RowDecoder:  # abstract
        """The Ray Data decoder of training (`train=True`) or evaluation rows (see `medvl.data.decode`)."""
        raise NotImplementedError

    def batch_dtypes(self) -> dict[str, torch.dtype]:
        return {k: _NP_TO_TORCH[v] for k, v in self.decoder(train=True).output_dtypes().items()}

    def prepare_batch(self, batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        """On the training worker, after the batch reached `device`: normalise images, build masks, ..."""
        return batch

    # ---------------------------------------------------------------- model and loss
    def build_model(self) -> nn.Module:  # abstract
        """The trainable module (its `forward(batch)` returns the output dict); the trainer wraps it in DDP."""
        raise NotImplementedError

    def bind(self, dist: Dist, device: torch.device) -> None:
        """Called once per worker before training: where this rank sits, and its device."""
        self.dist, self.device = dist, device

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Must call `model(...)` exactly once (DDP); may add outputs computed without grad (target branches)."""
        return model(batch)

    def loss(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # abstract
        """Named loss terms plus their weighted total under "loss"."""
        raise NotImplementedError

    def loss_terms(self) -> tuple[str, ...]:
        """Names of the terms `loss` returns besides "loss" (each logged as `train/<term>`)."""
        return ()

    def after_step(self, model: nn.Module) -> None:
        """After every optimizer step, on every rank, with the unwrapped model (EMA updates, clamps)."""

    def train_metrics(self, model: nn.Module) -> dict[str, float]:
        """Extra rank-0 metrics at each logging step (e.g. the temperature)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State kept outside the model (target networks, ...), saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no extra state, but the checkpoint has {sorted(state)}")

    # ---------------------------------------------------------------- evaluation
    def evaluator(self):
        """A callable `(model, device) -> metrics` built once on rank 0 (loads held-out data), or None. The trainer
        builds it in a background thread while training starts, so it must not draw from the global RNGs."""
        return None

    def metric_names(self) -> set[str]:
        """Exactly the names the evaluator reports at epoch ends (sweeps validate objectives against them)."""
        return set()

    def image_features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings of a prepared batch (`prepare_batch` output), for batch inference outside training
        (pipeline stages that embed a corpus). Default: the open_clip model's `encode_image`."""
        enc = getattr(getattr(model, "clip", model), "encode_image", None)
        if enc is None:
            raise NotImplementedError(f"method {self.name!r}: its model has no encode_image; override "
                                      f"Method.image_features")
        return enc(images)

    def text_features(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings of token ids (the model's tokenizer), the tower the evaluation measures; for the
        exported embedding model and `medvl embed`. Default: the open_clip model's `encode_text`."""
        enc = getattr(getattr(model, "clip", model), "encode_text", None)
        if enc is None:
            raise NotImplementedError(f"method {self.name!r}: its model has no encode_text; override "
                                      f"Method.text_features")
        return enc(tokens)

    # ---------------------------------------------------------------- export
    def export(self, model: nn.Module, tracking_uri: str, run_id: str) -> None:
        """Log the final model to the MLflow run (default: the whole module with mlflow.pytorch)."""
        import mlflow
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            mlflow.pytorch.log_model(pytorch_model=model, name="model", serialization_format="pickle")


class Plugin(Method):
    """A method that wraps another (switched on by its own recipe section, `<name>: {enabled: true}`): it sees
    the inner method's pieces and delegates whatever it does not change. To reach the features *before* the
    inner model's projection, call the inner module with `hook=` (see `ClipModule.forward`)."""

    plugin = True

    def __init__(self, recipe: Recipe, inner: Method):
        super().__init__(recipe)
        self.inner = inner
        self.feature_keys = inner.feature_keys + type(self).feature_keys
        self.global_keys = inner.global_keys + type(self).global_keys

    @classmethod
    def enabled(cls, recipe: Recipe) -> bool:
        sec = recipe.section(cls.name)
        return sec is not None and bool(getattr(sec, "enabled", True))

    def describe(self) -> str:
        return f"{self.name}({self.inner.describe()})"

    def decoder(self, train):
        return self.inner.decoder(train)

    def prepare_batch(self, batch, device):
        return self.inner.prepare_batch(batch, device)

    def build_model(self):
        return self.inner.build_model()

    def bind(self, dist, device):
        super().bind(dist, device)
        self.inner.bind(dist, device)

    def forward(self, model, batch):
        return self.inner.forward(model, batch)

    def loss(self, out):
        return self.inner.loss(out)

    def loss_terms(self):
        return self.inner.loss_terms()

    def after_step(self, model):
        self.inner.after_step(model)

    def train_metrics(self, model):
        return self.inner.train_metrics(model)

    def state_dict(self):
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state):
        self.inner.load_state_dict((state or {}).get("inner", {}))

    def evaluator(self):
        return self.inner.evaluator()

    def metric_names(self):
        return self.inner.metric_names()

    def image_features(self, model, images):
        return self.inner.image_features(model, images)

    def text_features(self, model, tokens):
        return self.inner.text_features(model, tokens)

    def export(self, model, tracking_uri, run_id):
        return self.inner.export(model, tracking_uri, run_id)


# --------------------------------------------------------------------------- registry

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method (or plug-in) selectable by its `name`; a duplicate name is an error."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__}: a method needs a `name`")
    old = _METHODS.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method name {cls.name!r} is already registered by {old.__module__}.{old.__qualname__}")
    register_section(cls.name, cls.config_cls, "plugin" if cls.plugin else "method")
    _METHODS[cls.name] = cls
    return cls


def registered() -> dict[str, type[Method]]:
    from medvl.config import sections
    sections()  # imports the built-in methods
    return dict(_METHODS)


def resolve_method(recipe: Recipe) -> Method:
    """The recipe's method, wrapped by every plug-in its recipe switches on (in registration order)."""
    methods = registered()
    cls = methods.get(recipe.method)
    if cls is None or cls.plugin:
        raise ValueError(f"method: unknown method {recipe.method!r}")
    m: Method = cls(recipe)
    for pcls in methods.values():
        if pcls.plugin and pcls.enabled(recipe):
            m = pcls(recipe, m)
    return m


def decoded_batch(method: Method, corpus: str, n: int, split: str = "train", device="cpu",
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """The first `n` rows of a corpus split through the method's own training decoder (per-sample seeding as in
    training) and `prepare_batch`: one real batch for benchmarks and step tests, without Ray."""
    import numpy as np

    from medvl.data.corpus import iter_rows, shard_paths
    from medvl.data.decode import decode_rows
    from medvl.data.stream import meta_and_batch
    rows: list[dict] = []
    for r in iter_rows(shard_paths(corpus, split)):
        rows.append(r)
        if len(rows) == n:
            break
    if not rows:
        raise ValueError(f"{corpus}: no rows in split {split!r}")
    cols = {k: np.empty(len(rows), dtype=object) for k in rows[0]}
    for i, r in enumerate(rows):
        for k in cols:
            cols[k][i] = r[k]
    threads = torch.get_num_threads()
    try:
        decoded = decode_rows(method.decoder(train=True), cols, seed=seed, epoch=0)
    finally:
        torch.set_num_threads(threads)  # the decoder's set-up pins torch to 1 thread (right in a decode task only)
    if decoded is None:
        raise ValueError(f"{corpus}: none of the first {len(rows)} rows of split {split!r} decoded")
    _, arrays = meta_and_batch(decoded)
    dtypes = method.batch_dtypes()
    tensors = {k: torch.as_tensor(np.array(v), dtype=dtypes.get(k)).to(device) for k, v in arrays.items()}
    return method.prepare_batch(tensors, device)
