"""Ray Data streaming: Parquet shards -> the method's decoder (`medvl.data.decode.RowDecoder`: decode, augment,
tokenise, ...) -> per-worker `iter_torch_batches`.

The dataset is a list of (shard path, epoch) items (one per shard per epoch, each epoch in its own seeded
order); one `map_batches` generator task reads a shard row group by row group and yields decoded batches.
Raw image bytes therefore never sit in the object store: only decoded batches do, and the bounded number of
decode tasks plus Ray Data's streaming backpressure keep memory flat however large the corpus (tested with a
corpus 4x the object store). All epochs stream in one execution, so the pipeline stays full across epoch
boundaries. Each worker also shuffles locally in a buffer. A row whose image or text cannot be decoded is
dropped in `map_batches`, counted by a named `SkipCounter` actor (read by rank 0 as a metric) and never kills
the epoch; iter_torch_batches re-batches, so every batch stays full and ranks stay in step.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import ray

from medvl.config import DataConfig
from medvl.data.corpus import validate_corpus
from medvl.data.decode import RowDecoder, decode_rows

log = logging.getLogger(__name__)

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
    """Get or create the run's named counter (detached from the driver so worker restarts keep it), on the
    driver's node (a 0-CPU actor could land anywhere, and a lost worker node would take the count with it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return SkipCounter.options(name=name, namespace=namespace, get_if_exists=True, lifetime="detached",
                               scheduling_strategy=here).remote()


def epoch_file_order(paths: list[str], epochs: range, seed: int, shuffle: bool) -> list[tuple[str, int]]:
    """(shard, epoch) order for a run of epochs: a seeded permutation per epoch, concatenated."""
    out: list[tuple[str, int]] = []
    for e in epochs:
        order = np.random.default_rng([seed, e]).permutation(len(paths)) if shuffle else range(len(paths))
        out.extend((paths[i], e) for i in order)
    return out


def read_and_decode(items: dict[str, np.ndarray], *, decoder: RowDecoder, read_rows: int, seed: int,
                    counter_name: Optional[str] = None, namespace: Optional[str] = None):
    """Generator UDF: for each (shard path, epoch) item, stream the shard's rows in chunks of `read_rows` and yield
    the method decoder's batches (rows that fail to decode are dropped and counted)."""
    import pyarrow.parquet as pq

    from medvl.data.corpus import check_shard_schema, iter_shard_batches, open_file
    counter = [None]

    def on_skip(bad, n=None):
        if counter_name:
            if counter[0] is None:
                counter[0] = ray.get_actor(counter_name, namespace=namespace)
            counter[0].add.remote(len(bad) if n is None else n, bad)

    for path, epoch in zip(items["path"], items["epoch"]):
        path = str(path)
        check_shard_schema(path)
        with open_file(path) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in decoder.columns if c in pf.schema_arrow.names]
            def bad_group(rows: int, why: str, path=path) -> None:  # a corrupt row group: skipped and counted
                log.warning("skipped %s", why)
                on_skip([(f"{path}#row-group", why)], rows)

            for rb in iter_shard_batches(pf, path, cols, read_rows, bad_group):
                batch = {c: np.asarray(rb.column(c).to_pylist(), dtype=object) for c in cols}
                out = decode_rows(decoder, batch, seed=seed, epoch=int(epoch), on_skip=on_skip)
                if out is not None:
                    yield out


def build_dataset(data: DataConfig, decoder: RowDecoder, split: str, *, train: bool = True, seed: int = 0,
                  epochs: range = range(1), counter_name: Optional[str] = None,
                  namespace: Optional[str] = None) -> "ray.data.Dataset":
    """One streaming execution over `epochs` passes of a split: validated shards, a seeded shard order per
    epoch, `data.decode_tasks` concurrent read+decode tasks running the method's `decoder`."""
    paths = validate_corpus(data.corpus, split)
    ordered = epoch_file_order(paths, epochs, seed, train and data.shuffle_files)
    items = ray.data.from_items([{"path": p, "epoch": e} for p, e in ordered], override_num_blocks=len(ordered))
    return items.map_batches(
        read_and_decode,
        fn_kwargs=dict(decoder=decoder, read_rows=data.decode_batch_size, seed=seed, counter_name=counter_name,
                       namespace=namespace),
        batch_size=1,
        compute=ray.data.TaskPoolStrategy(size=max(1, data.decode_tasks)),
        num_cpus=1,
    )
