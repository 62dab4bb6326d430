"""`kind: embed`: batch inference with Ray Data: a train stage's image encoder over splits of a corpus.

    embed:
      kind: embed
      inputs: {model: clip}       # a `train` stage
      splits: [train, val]
      actors: 2                   # Ray Data actor pool: each actor loads the model once

Per split, the corpus shards stream through Ray Data: read + decode tasks (the method's own eval decoder, the
`RowDecoder` contract: uint8 images, per-sample seeded) -> an actor pool (`ActorPoolStrategy`) where each actor
holds the model and runs `method.prepare_batch` + `method.image_features` (L2-normalised by default) -> the
driver, which appends each batch to `<split>.parquet` (columns `sample_id`, `label` (the manifest's label field,
-1 when a row has none), `features` (fixed-size list of float32)). Memory stays bounded on the driver (one batch at
a time) and in the object store (streaming backpressure). Row order follows completion, not the corpus: join on
`sample_id`. `info.json` holds the feature size, rows per split and the class names.

The corpus defaults to the model's training corpus (`data.corpus` of its recipe), which the model stage's key
already covers; a corpus named here is fingerprinted. Pool size, CPUs per actor and decode tasks are left out of
the key (they change speed, not features).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from medvl.config import ConfigError
from medvl.data.decode import RowDecoder
from medvl.pipelines.stage import Input, Stage, StageContext, register_stage


@dataclass
class EmbedConfig:
    corpus: Optional[str] = field(default=None, metadata={"input": "corpus"})
    """Corpus to embed (default: the model stage's training corpus)."""
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    """Splits to embed, one `<split>.parquet` each."""
    max_rows: Optional[int] = None
    """Embed at most the first this many rows of each split, in shard order: a quick look, not a random sample
    (None: all)."""
    batch_size: int = 128
    """Rows per model call."""
    normalize: bool = True
    """L2-normalise the features (what CLIP-style similarity and probes use)."""
    actors: int = 2
    """Size of the Ray Data actor pool (each actor holds one copy of the model)."""
    cpus_per_actor: float = 1.0
    use_gpu: bool = False
    """One GPU per actor."""
    decode_tasks: int = 1
    """Concurrent Ray Data read + decode tasks feeding the actors."""

    def validate(self) -> None:
        if not self.splits:
            raise ConfigError("splits: name at least one split")
        for key in ("batch_size", "actors", "decode_tasks"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError("max_rows must be >= 1 (or null)")
        if self.cpus_per_actor <= 0:
            raise ConfigError("cpus_per_actor must be > 0")


class EmbedDecoder(RowDecoder):
    """The method's eval image decoding, plus the row's id, class index and split."""

    columns = ("sample_id", "image", "image_uri", "labels")

    def __init__(self, inner: RowDecoder, label_field: Optional[str], split: str):
        self.inner, self.label_field, self.split = inner, label_field, split

    def output_dtypes(self) -> dict[str, str]:
        return {"image": "uint8", "label": "int64"}

    def cache_key(self) -> Any:
        return (type(self).__qualname__, self.inner.cache_key(), self.label_field, self.split)

    def setup(self) -> None:
        self.inner.setup()

    def decode(self, row: dict, rng: np.random.Generator) -> dict:
        image_fn = getattr(self.inner, "image", None)  # the eval decoders' image-only path (ClipDecoder)
        img = image_fn(row) if image_fn is not None else self.inner.decode(row, rng)["image"]
        raw = row.get("labels")  # a map column arrives as (key, value) pairs, possibly as a 2-D object array
        labels = {str(k): v for k, v in raw} if raw is not None else {}
        lab = labels.get(self.label_field) if self.label_field else None
        return {"image": img, "label": int(lab) if lab is not None else -1, "sample_id": str(row["sample_id"]),
                "split": self.split}

    def collate(self, rows: list[dict]) -> dict[str, np.ndarray]:
        return {"image": np.stack([r["image"] for r in rows]).astype(np.uint8, copy=False),
                "label": np.asarray([r["label"] for r in rows], dtype=np.int64),
                "sample_id": np.asarray([r["sample_id"] for r in rows], dtype=object),
                "split": np.asarray([r["split"] for r in rows], dtype=object)}


def load_encoder(model_dir: Optional[str] = None, recipe: Optional[dict] = None):
    """(recipe, method, model in eval mode): a train stage's output (`model_dir`), or a model described by a
    recipe dict (`recipe`: e.g. `method: clip` with `model.pretrained` naming a user's open_clip checkpoint)."""
    if model_dir is not None:
        from medvl.pipelines.kinds.train import load_trained
        return load_trained(model_dir)
    from medvl.config import Recipe, from_dict
    from medvl.methods import resolve_method
    r = from_dict(Recipe, recipe or {})
    method = resolve_method(r)
    return r, method, method.build_model().eval()


class Embedder:
    """Ray Data actor: loads the model once (`load_encoder`), embeds batches of uint8 images."""

    def __init__(self, model_dir: Optional[str], normalize: bool, use_gpu: bool, threads: int,
                 recipe: Optional[dict] = None):
        import torch

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        _, self.method, model = load_encoder(model_dir, recipe)
        self.model = model.to(self.device)
        self.normalize = normalize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F
        imgs = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
        with torch.no_grad():
            x = self.method.prepare_batch({"image": imgs}, self.device)["image"]
            f = self.method.image_features(self.model, x).float()
            if self.normalize:
                f = F.normalize(f, dim=-1)
        return {"sample_id": batch["sample_id"], "label": batch["label"], "split": batch["split"],
                "features": f.cpu().numpy().astype(np.float32)}


@register_stage
class EmbedStage(Stage):
    kind = "embed"
    version = "1"
    config_cls = EmbedConfig
    executor = "driver"  # it runs a Ray Data job (tasks + an actor pool) and writes what streams back
    inputs = {"model": Input("a train stage whose final model encodes the images", kinds=("train",))}
    ignore_keys = ("actors", "cpus_per_actor", "decode_tasks", "use_gpu")

    def resources(self) -> dict[str, float]:
        c = self.config
        return {"CPU": float(c.actors * c.cpus_per_actor + c.decode_tasks),
                "GPU": float(c.actors if c.use_gpu else 0)}

    def metric_names(self) -> set[str]:
        return {f"rows/{s}" for s in self.config.splits} | {"dim", "rows_per_s"}

    def run(self, ctx: StageContext) -> dict[str, float]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from medvl.data.corpus import load_manifest
        from medvl.pipelines.kinds.train import load_trained

        c = self.config
        model_dir = ctx.inputs["model"]
        recipe, method, _ = load_trained(model_dir)  # fails early (here, not in every actor) if it cannot load
        corpus = c.corpus or recipe.data.corpus
        manifest = load_manifest(corpus)
        label_field = recipe.eval.label_field or manifest.label_field
        ds = embedding_stream(method, corpus, c.splits, label_field, seed=recipe.train.seed,
                              batch_size=c.batch_size, decode_tasks=c.decode_tasks, actors=c.actors,
                              cpus_per_actor=c.cpus_per_actor, use_gpu=c.use_gpu, normalize=c.normalize,
                              model_dir=str(model_dir), max_rows=c.max_rows)
        writers: dict[str, Any] = {}
        rows = {s: 0 for s in c.splits}
        dim = 0
        t0 = time.perf_counter()
        try:
            for b in ds.iter_batches(batch_format="numpy", batch_size=None):  # [2] streams back to the driver
                f = np.asarray(b["features"], dtype=np.float32)
                dim = f.shape[1]
                splits = np.asarray([str(x) for x in b["split"]])
                for split in np.unique(splits):
                    sel = splits == split
                    table = pa.table({
                        "sample_id": pa.array([str(x) for x in np.asarray(b["sample_id"])[sel]], pa.string()),
                        "label": pa.array(np.asarray(b["label"], dtype=np.int64)[sel]),
                        "features": pa.FixedSizeListArray.from_arrays(pa.array(f[sel].reshape(-1)), dim)})
                    if split not in writers:
                        writers[split] = pq.ParquetWriter(ctx.out / f"{split}.parquet", table.schema)
                    writers[split].write_table(table)
                    rows[split] = rows.get(split, 0) + int(sel.sum())
        finally:
            for w in writers.values():
                w.close()
        empty = [s for s in c.splits if not rows.get(s)]
        if empty:
            raise RuntimeError(f"split(s) {', '.join(empty)} of {corpus}: no row could be embedded")
        wall = time.perf_counter() - t0
        info = {"dim": dim, "rows": rows, "corpus": corpus, "label_field": label_field,
                "classnames": list(manifest.classnames), "normalized": c.normalize,
                "model_stage_key": ctx.upstream.get("model", {}).get("key")}
        (ctx.out / "info.json").write_text(json.dumps(info, indent=1))
        return {**{f"rows/{s}": float(n) for s, n in rows.items()}, "dim": float(dim),
                "rows_per_s": sum(rows.values()) / max(wall, 1e-9)}


def embedding_stream(method, corpus: str, splits: list[str], label_field: Optional[str], *, seed: int,
                     batch_size: int, decode_tasks: int, actors: int, cpus_per_actor: float, use_gpu: bool,
                     normalize: bool = True, model_dir: Optional[str] = None, recipe: Optional[dict] = None,
                     max_rows: Optional[int] = None):
    """A Ray Data stream of image features over `splits` of `corpus` (shared by `embed` and CLIP-IT's `pair`):
    read + decode tasks (the method's eval decoder; a row that fails to decode is dropped and logged, never
    given a feature) -> an `ActorPoolStrategy` pool of `Embedder` actors, each loading the model once
    (`model_dir`: a train stage's output, or `recipe`: a recipe dict, see `load_encoder`). Batches carry
    `sample_id`, `label` (-1: none), `split`, `features` [B, D] float32."""
    import ray

    from medvl.config import DataConfig
    from medvl.data.stream import build_dataset
    from medvl.train.launcher import quiet_ray_data
    inner = method.decoder(train=False)
    quiet_ray_data()
    data = DataConfig(corpus=corpus, decode_batch_size=batch_size, decode_tasks=decode_tasks, shuffle_files=False)
    parts = []
    for split in splits:
        ds = build_dataset(data, EmbedDecoder(inner, label_field, split), split, train=False, seed=seed)
        parts.append(ds.limit(max_rows) if max_rows else ds)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]  # one job, one actor pool for all splits
    return ds.map_batches(  # [1] the actor pool: one model copy per actor, reused across batches
        Embedder, fn_constructor_kwargs={"model_dir": model_dir, "recipe": recipe, "normalize": normalize,
                                         "use_gpu": use_gpu, "threads": int(cpus_per_actor)},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size,
        num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else 0)


def read_features(path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features [N, D] float32, labels [N] int64, sample ids) of an embed stage's `<split>.parquet`."""
    import pyarrow.parquet as pq
    t = pq.read_table(path)
    col = t.column("features").combine_chunks()
    dim = col.type.list_size
    feats = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    return feats, t.column("label").to_numpy(), t.column("sample_id").to_pylist()
