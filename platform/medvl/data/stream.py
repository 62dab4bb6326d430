"""Ray Data streaming: Parquet shards -> decode + augment (the model's own open_clip preprocessing) ->
tokenise -> per-worker `iter_torch_batches`.

The dataset is a list of shard paths (one entry per shard per epoch, each epoch in its own seeded order);
one `map_batches` generator task reads a shard row group by row group and yields decoded, tokenised batches.
Raw image bytes therefore never sit in the object store: only decoded batches do, and the bounded number of
decode tasks plus Ray Data's streaming backpressure keep memory flat however large the corpus (tested with a
corpus 4x the object store). All epochs stream in one execution, so the pipeline stays full across epoch
boundaries. Each worker also shuffles locally in a buffer. A row whose image or text cannot be decoded is
dropped in `map_batches`, counted by a named `SkipCounter` actor (read by rank 0 as a metric) and never kills
the epoch; iter_torch_batches re-batches, so every batch stays full and ranks stay in step.
"""
from __future__ import annotations

import io
import logging
from typing import Any, Optional

import numpy as np
import ray
from PIL import Image

from medvl.config import DataConfig, ModelConfig
from medvl.data.corpus import validate_corpus

log = logging.getLogger(__name__)

READ_COLUMNS = ["sample_id", "image", "image_uri", "texts"]



@ray.remote(num_cpus=0)
class SkipCounter:
    """Counts rows dropped by the decoder (and keeps the first few ids/reasons for the log)."""

    def __init__(self):
        self.count = 0
        self.examples: list[tuple[str, str]] = []

    def add(self, n: int, examples: list[tuple[str, str]]) -> None:
        self.count += n
        self.examples.extend(examples[: max(0, 20 - len(self.examples))])

    def get(self) -> tuple[int, list[tuple[str, str]]]:
        return self.count, self.examples


def skip_counter(name: str, namespace: Optional[str] = None):
    """Get or create the run's named counter (detached from the driver so worker restarts keep it)."""
    return SkipCounter.options(name=name, namespace=namespace, get_if_exists=True,
                               lifetime="detached").remote()


def load_image_bytes(row: dict) -> bytes:
    data = row.get("image")
    if data:
        return data
    uri = row.get("image_uri")
    if not uri:
        raise ValueError("row has neither image bytes nor image_uri")
    import fsspec
    with fsspec.open(uri, "rb") as f:
        return f.read()


def pick_text(texts: Any, mode: str, rng: np.random.Generator) -> str:
    if texts is None or len(texts) == 0:
        raise ValueError("empty texts")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("empty texts")
    if mode == "first":
        return texts[0]
    if mode == "join":
        return " ".join(texts)
    return texts[int(rng.integers(len(texts)))]


_DECODERS: dict[Any, "Decoder"] = {}


def decode_batch(batch: dict[str, np.ndarray], *, model_cfg: dict, text_sampling: str,
                 counter_name: Optional[str], train: bool, seed: int = 0,
                 namespace: Optional[str] = None) -> dict[str, np.ndarray]:
    """Ray Data task UDF. Ray reuses worker processes, so the decoder (transforms, tokenizer) is built once
    per process and cached here, instead of starting a fresh actor pool every epoch."""
    key = (repr(sorted(model_cfg.items())), text_sampling, counter_name, train, seed, namespace)
    dec = _DECODERS.get(key)
    if dec is None:
        dec = _DECODERS[key] = Decoder(model_cfg, text_sampling, counter_name, train, seed, namespace)
    return dec(batch)


class Decoder:
    """bytes -> augmented float32 CHW images (the model's open_clip preprocessing), texts -> token ids."""

    def __init__(self, model_cfg: dict, text_sampling: str, counter_name: Optional[str], train: bool,
                 seed: int = 0, namespace: Optional[str] = None):
        import os

        import torch

        from medvl.config import from_dict
        from medvl.models.factory import image_transforms, tokenizer
        torch.set_num_threads(1)
        cfg = from_dict(ModelConfig, model_cfg)
        tr, ev = image_transforms(cfg)
        self.transform = tr if train else ev
        self.tokenize = tokenizer(cfg)
        self.mode = text_sampling if train else "first"
        self.rng = np.random.default_rng(seed + os.getpid())
        torch.manual_seed(seed + os.getpid())
        self.counter_name, self.namespace = counter_name, namespace
        self._counter = None

    @property
    def counter(self):
        if self._counter is None and self.counter_name:
            self._counter = ray.get_actor(self.counter_name, namespace=self.namespace)
        return self._counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, texts, bad = [], [], []
        n = len(batch["sample_id"])
        for i in range(n):
            row = {k: batch[k][i] for k in batch}
            try:
                with Image.open(io.BytesIO(load_image_bytes(row))) as im:
                    img = self.transform(im.convert("RGB"))
                txt = pick_text(row.get("texts"), self.mode, self.rng)
            except Exception as e:  # noqa: BLE001 - any corrupt sample is skipped, never fatal
                bad.append((str(row.get("sample_id")), f"{type(e).__name__}: {e}"[:200]))
                continue
            images.append(img.numpy())
            texts.append(txt)
        if bad:
            log.warning("skipped %d corrupt samples, e.g. %s", len(bad), bad[0])
            if self.counter is not None:
                self.counter.add.remote(len(bad), bad)
        if not images:
            return {"image": np.zeros((0, 3, 1, 1), np.float32), "text": np.zeros((0, 1), np.int64)}
        return {"image": np.stack(images).astype(np.float32),
                "text": self.tokenize(texts).numpy().astype(np.int64)}


def epoch_file_order(paths: list[str], epochs: range, seed: int, shuffle: bool) -> list[str]:
    """Shard order for a run of epochs: a seeded permutation per epoch, concatenated."""
    out: list[str] = []
    for e in epochs:
        order = np.random.default_rng([seed, e]).permutation(len(paths)) if shuffle else range(len(paths))
        out.extend(paths[i] for i in order)
    return out


def read_and_decode(paths: dict[str, np.ndarray], *, read_rows: int, **decode_kw):
    """Generator UDF: for each shard path, stream its rows in chunks of `read_rows` and yield decoded batches."""
    import pyarrow.parquet as pq

    from medvl.data.corpus import check_shard_schema, open_file
    for path in paths["path"]:
        path = str(path)
        check_shard_schema(path)
        with open_file(path) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in READ_COLUMNS if c in pf.schema_arrow.names]
            for rb in pf.iter_batches(batch_size=read_rows, columns=cols):
                batch = {c: np.asarray(rb.column(c).to_pylist(), dtype=object) for c in cols}
                out = decode_batch(batch, **decode_kw)
                if len(out["text"]):
                    yield out


def build_dataset(data: DataConfig, model: ModelConfig, split: str, *, train: bool = True, seed: int = 0,
                  epochs: range = range(1), counter_name: Optional[str] = None,
                  namespace: Optional[str] = None) -> "ray.data.Dataset":
    """One streaming execution over `epochs` passes of a split: validated shards, a seeded shard order per
    epoch, `data.decode_tasks` concurrent read+decode tasks."""
    from dataclasses import asdict

    paths = validate_corpus(data.corpus, split)
    ordered = epoch_file_order(paths, epochs, seed, train and data.shuffle_files)
    items = ray.data.from_items([{"path": p} for p in ordered], override_num_blocks=len(ordered))
    return items.map_batches(
        read_and_decode,
        fn_kwargs=dict(read_rows=data.decode_batch_size, model_cfg=asdict(model), text_sampling=data.text_sampling,
                       counter_name=counter_name, train=train, seed=seed, namespace=namespace),
        batch_size=1,
        compute=ray.data.TaskPoolStrategy(size=max(1, data.decode_tasks)),
        num_cpus=1,
    )


class TrainStreamFactory:
    """Passed to TorchTrainer(datasets={"train": factory}); Ray Train calls it at every worker-group start,
    so after a failure the stream restarts at the epoch of the newest checkpoint (the worker then skips the
    batches of that epoch it already trained on)."""

    def __init__(self, recipe_dict: dict, storage_dir: str, counter_name: Optional[str],
                 namespace: Optional[str] = None):
        self.recipe_dict, self.storage_dir = recipe_dict, storage_dir
        self.counter_name, self.namespace = counter_name, namespace

    def __call__(self) -> "ray.data.Dataset":
        from medvl.config import recipe_from_dict
        from medvl.train.worker import latest_position
        r = recipe_from_dict(self.recipe_dict)
        pos = latest_position(self.storage_dir) or {"epoch": 0}
        epochs = range(min(pos["epoch"], r.train.epochs - 1), r.train.epochs)
        return build_dataset(r.data, r.model, r.data.train_split, train=True, seed=r.train.seed, epochs=epochs,
                             counter_name=self.counter_name, namespace=self.namespace)

