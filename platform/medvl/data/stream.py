"""Ray Data streaming with an exact, reproducible data position: Parquet read units -> an epoch plan per rank ->
the method's decoder (`medvl.data.decode.RowDecoder`) in Ray Data tasks -> full per-rank batches, epoch by epoch.

The order in which a rank sees samples is a pure function of (seed, epoch, world size, rank) and the corpus:

* **Read units** are the Parquet row groups of the split's shards (split into pieces of at most
  `max_unit_rows`), listed once from the shard footers (`read_units`; no image is read).
* **Epoch plan** (`StreamPlan.windows`): a seeded permutation of the units (the same on every rank) laid end to
  end; rank r gets the contiguous rows [r*P, (r+1)*P) of that sequence, P = rows // world (the few rows
  beyond world*P sit this epoch out, different ones every epoch). Its part is cut into *windows* of
  `data.shuffle_buffer` rows, and each window is permuted (seeded by seed, epoch, rank, window). A rank therefore
  mixes rows across units (the unit permutation) and inside windows of many units (the window shuffle), without
  a nondeterministic shuffle buffer.
* **Position**: (epoch, window, offset) = the next unseen row of the rank's plan. Resuming builds the stream from
  that window and drops exactly `offset` rows of it *before decoding* them.
* **Equal steps on every rank**: P // per-rank batch = rows // global batch = `steps_per_epoch` on every rank; the
  P - steps*b rows left over are each rank's reserve, which replaces rows that fail to decode. A rank that still
  runs short says so (the trainer ends the epoch on every rank with a one-integer all-reduce).

`rank_stream` builds one rank's Ray Data pipeline over all its remaining epochs (one streaming execution, so the
pipeline stays full across epoch boundaries): one generator task per window reads the window's rows (raw
encoded bytes, not pixels), permutes them, decodes them `data.decode_batch_size` at a time with per-sample seeds,
and yields decoded blocks; `DataContext.execution_options.preserve_order` keeps the windows in plan order however
many decode tasks run. Every decoded row carries `_epoch`, `_window`, `_pos` (its index in the permuted
window) and `_sid` (a 63-bit hash of its sample id): the trainer tracks its position, counts skipped rows
exactly (a gap in `_pos`), and, in the audit mode of the tests, records the ids it trained on. `EpochBatcher`
turns the blocks into full per-rank batches that never straddle an epoch.

A row whose image or text cannot be decoded is dropped in its task (logged, never fatal); the trainer counts it
as skipped when its position passes it (`train/skipped_samples`).
"""
from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Optional

import numpy as np
import ray

from medvl.config import DataConfig
from medvl.data.corpus import CorpusError, check_shard_schema, load_manifest, manifest_path, open_file, \
    validate_corpus
from medvl.data.decode import RowDecoder, decode_rows, sample_hash

log = logging.getLogger(__name__)

META_COLUMNS = ("_epoch", "_window", "_pos", "_sid")
"""Columns the stream adds to every decoded row (stripped before the batch reaches the method)."""


@ray.remote(num_cpus=0)
class SkipCounter:
    """Collects the rows a run's decoders dropped: their ids and reasons (the first 20 are logged with the run,
    `data/skipped_samples.json`) and their count. The trainer's `train/skipped_samples` metric comes from the
    stream positions (exact across restarts); a row decoded again after a restart (same id, same epoch) is counted
    here once, so the two agree."""

    def __init__(self):
        self.count = 0
        self.examples: list[tuple[str, str]] = []
        self._seen: set = set()

    def add(self, n: int, examples: list[tuple[str, str]], epoch: Optional[int] = None) -> None:
        """`n` rows dropped; `examples` their (id, reason); a row-group entry stands for all its `n` rows."""
        if epoch is not None and examples:
            new = [e for e in examples if (e[0], epoch) not in self._seen]
            if not new:
                return
            self._seen.update((e[0], epoch) for e in new)
            n = n if len(new) == len(examples) else len(new)
            examples = new
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


def start_ray_data_actors() -> None:
    """Create Ray Data's two per-cluster helper actors now, from the caller, unless they exist: `_StatsActor` and
    the `AutoscalingCoordinator`. Ray Data creates them (named, `get_if_exists`) when a rank's stream starts, and
    each is a new Python process, which that first stream then waits for. The trainer's driver calls this before
    the worker group starts, so they start while the worker group does (on 2 cores, a stream's first block came
    1.5 s sooner: 5.7 vs 7.2 s, medians of 3 alternate runs). Ray Data later finds them by name. Both are Ray
    Data's own getters, private API: where they are missing or fail, Ray Data creates the actors as before."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import \
            get_or_create_autoscaling_coordinator
        from ray.data._internal.stats import get_or_create_stats_actor
        get_or_create_stats_actor()
        get_or_create_autoscaling_coordinator()
    except Exception as e:  # noqa: BLE001 - an optimisation only
        log.debug("Ray Data's helper actors were not started ahead: %s", e)


# --------------------------------------------------------------------------- read units and the epoch plan


@dataclass(frozen=True)
class ReadUnit:
    """Rows [start, stop) of row group `row_group` of one shard; `row_bytes` is the row group's bytes per row
    (Parquet metadata: what a window of its rows holds in memory)."""
    path: str
    row_group: int
    start: int
    stop: int
    row_bytes: int = 0

    @property
    def rows(self) -> int:
        return self.stop - self.start


def read_units(corpus: str, split: str, max_unit_rows: int = 1024) -> list[ReadUnit]:
    """The split's read units from the shard footers (cheap: no row is read). A shard whose row count differs
    from the manifest's is an error naming both (the plan must know every row)."""
    import pyarrow.parquet as pq
    paths = validate_corpus(corpus, split)
    m = load_manifest(corpus)
    listed = {str(manifest_path(corpus).parent / s.path): s.rows for s in m.shards if s.split == split}
    units: list[ReadUnit] = []
    for p in paths:
        with open_file(p) as f:
            md = pq.ParquetFile(f).metadata
        total = 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            total += n
            per_row = -(-md.row_group(g).total_byte_size // max(1, n))
            for a in range(0, n, max(1, max_unit_rows)):
                units.append(ReadUnit(p, g, a, min(n, a + max_unit_rows), per_row))
        if p in listed and listed[p] != total:
            raise CorpusError(f"{p}: the shard has {total} rows but {manifest_path(corpus)} lists {listed[p]}")
    return units


@dataclass
class Window:
    """One window of a rank's epoch part: `slices` are (unit index, first row, end row) in unit coordinates."""
    index: int
    slices: list[tuple[int, int, int]]
    rows: int


@dataclass
class StreamPlan:
    """Everything the data order depends on; `windows(epoch, rank)` is a pure function of it."""
    units: list[ReadUnit]
    seed: int
    world: int
    window_rows: int
    shuffle_units: bool = True
    shuffle_rows: bool = True
    window_bytes: int = 256 * 2**20
    """A window also ends once its rows hold this many bytes (by the row groups' metadata), so large images
    give smaller windows instead of a decode task holding gigabytes."""

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)

    @property
    def rows_per_rank(self) -> int:
        return self.rows // self.world

    def steps_per_epoch(self, global_batch: int) -> int:
        """Full steps every rank can take in an epoch when no row is corrupt (= rows // global batch)."""
        return self.rows_per_rank // (global_batch // self.world)

    def unit_order(self, epoch: int) -> np.ndarray:
        n = len(self.units)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle_units else np.arange(n)

    def windows(self, epoch: int, rank: int) -> list[Window]:
        part = self.rows_per_rank
        lo, hi = rank * part, (rank + 1) * part
        out: list[Window] = []
        cur: list[tuple[int, int, int]] = []
        cur_rows = cur_bytes = 0
        at = 0  # global row offset of the current unit in this epoch's sequence
        for ui in self.unit_order(epoch):
            u = self.units[int(ui)]
            a, b = max(lo, at), min(hi, at + u.rows)
            while a < b:  # cut this unit's share of the part at window boundaries (rows or bytes)
                fit = -(-(self.window_bytes - cur_bytes) // u.row_bytes) if u.row_bytes else b - a
                take = max(1, min(b - a, self.window_rows - cur_rows, fit))
                cur.append((int(ui), u.start + a - at, u.start + a - at + take))
                cur_rows += take
                cur_bytes += take * u.row_bytes
                a += take
                if cur_rows >= self.window_rows or cur_bytes >= self.window_bytes:
                    out.append(Window(len(out), cur, cur_rows))
                    cur, cur_rows, cur_bytes = [], 0, 0
            at += u.rows
            if at >= hi:
                break
        if cur_rows:
            out.append(Window(len(out), cur, cur_rows))
        return out

    def window_order(self, epoch: int, rank: int, window: Window) -> np.ndarray:
        if not self.shuffle_rows:
            return np.arange(window.rows)
        return np.random.default_rng([self.seed, epoch, rank, window.index, 7919]).permutation(window.rows)

    def rank_rows(self, epoch: int, rank: int) -> list[tuple[str, int, int]]:
        """The rank's rows of an epoch in stream order, as (shard path, row group, row): the plan made explicit
        (tests and audits compare it with what training saw)."""
        out = []
        for w in self.windows(epoch, rank):
            rows = [(self.units[ui].path, self.units[ui].row_group, r) for ui, a, b in w.slices for r in range(a, b)]
            out.extend(rows[i] for i in self.window_order(epoch, rank, w))
        return out

    def to_dict(self) -> dict:
        return {"units": [[u.path, u.row_group, u.start, u.stop, u.row_bytes] for u in self.units],
                "seed": self.seed, "world": self.world, "window_rows": self.window_rows,
                "shuffle_units": self.shuffle_units, "shuffle_rows": self.shuffle_rows,
                "window_bytes": self.window_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamPlan":
        return cls([ReadUnit(*u) for u in d["units"]], d["seed"], d["world"], d["window_rows"],
                   d["shuffle_units"], d["shuffle_rows"], d["window_bytes"])

    def fingerprint(self) -> str:
        """Identifies the data order (units, seed, world, windows): a checkpoint's positions are exact only
        under the plan they were taken with. Shards count by file name, so a corpus moved elsewhere (another
        mount point on a cluster) keeps its positions."""
        import hashlib
        import os
        d = self.to_dict()
        d["units"] = [[os.path.basename(u[0])] + u[1:] for u in d["units"]]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def plan_for(data: DataConfig, seed: int, world: int, train: bool = True) -> StreamPlan:
    """The training plan of a recipe's data section (reads only the shard footers)."""
    units = read_units(data.corpus, data.train_split, data.max_unit_rows)
    if not units:
        raise CorpusError(f"{manifest_path(data.corpus)}: split {data.train_split!r} has no rows")
    return StreamPlan(units, seed, world, data.shuffle_buffer or data.max_unit_rows,
                      shuffle_units=train and data.shuffle_files, shuffle_rows=train and data.shuffle_buffer > 0,
                      window_bytes=int(data.shuffle_buffer_mb * 2**20))


# --------------------------------------------------------------------------- the decode tasks


@lru_cache(maxsize=256)
def _checked(path: str) -> tuple[str, ...]:
    return tuple(check_shard_schema(path).names)


def _object_array(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):  # element-wise: lists of equal length must stay lists, not a 2-D array
        arr[i] = v
    return arr


def read_window(items: dict[str, np.ndarray], *, decoder: RowDecoder, decode_rows_n: int, seed: int,
                on_skip_counter: Optional[tuple[str, Optional[str]]] = None) -> Iterator[dict[str, np.ndarray]]:
    """Generator UDF, one item = one window: read its rows (raw columns only), permute them, drop the first
    `skip` (already trained on), decode the rest in chunks and yield them with their stream coordinates."""
    import pyarrow.parquet as pq
    counter = [None]

    cur_epoch = [None]

    def on_skip(bad, n=None):
        if on_skip_counter:
            if counter[0] is None:
                counter[0] = ray.get_actor(on_skip_counter[0], namespace=on_skip_counter[1])
            counter[0].add.remote(len(bad) if n is None else n, bad, cur_epoch[0])

    for spec_json, epoch, win, skip in zip(items["spec"], items["epoch"], items["window"], items["skip"]):
        spec = json.loads(str(spec_json))
        cur_epoch[0] = int(epoch)
        values: dict[str, list] = {}
        unreadable: set[int] = set()  # window rows of a corrupt row group: never delivered (counted as skipped)
        n = 0
        for path, rg, a, b in spec["slices"]:
            names = _checked(path)
            cols = [c for c in decoder.columns if c in names]
            if "sample_id" not in cols:
                cols.append("sample_id")
            try:
                with open_file(path) as f:
                    tbl = pq.ParquetFile(f).read_row_group(rg, columns=cols).slice(a, b - a)
                got = {c: tbl.column(c).to_pylist() for c in cols}
            except Exception as e:  # noqa: BLE001 - pyarrow raises OSError / ArrowInvalid / ... for corrupt pages
                why = f"{path}: row group {rg} is unreadable ({type(e).__name__}: {e})"[:300]
                log.warning("skipped %d rows: %s", b - a, why)
                on_skip([(f"{path}#row-group", why)], b - a)
                unreadable.update(range(n, n + b - a))
                got = {c: [None] * (b - a) for c in cols}
            for c in set(cols) | set(values):
                values.setdefault(c, [None] * n).extend(got.get(c) or [None] * (b - a))
            n += b - a
        order = np.asarray(spec["order"]) if spec.get("order") is not None else np.arange(n)
        for c0 in range(int(skip), n, decode_rows_n):
            idx = order[c0:c0 + decode_rows_n]
            at = np.arange(len(idx))  # the rows' offsets in this chunk (window position = c0 + offset)
            if unreadable:
                at = np.asarray([j for j, i in enumerate(idx) if int(i) not in unreadable], dtype=np.int64)
                if not len(at):
                    continue
            out = _decode_chunk(decoder, values, idx[at], c0 + at, seed, int(epoch), int(win), on_skip)
            if out is not None:
                yield out


def _decode_chunk(decoder, values, rows, positions, seed, epoch, win, on_skip):
    """Decode the window rows `rows` (their window-order positions `positions`) and annotate them with their
    stream coordinates; rows the decoder rejects are left out (counted through `on_skip`)."""
    batch = {c: _object_array([v[i] for i in rows]) for c, v in values.items()}
    kept: list[int] = []
    out = decode_rows(decoder, batch, seed=seed, epoch=epoch, on_skip=on_skip, kept=kept)
    if out is None:
        return None
    k = np.asarray(kept, dtype=np.int64)
    out["_epoch"] = np.full(len(k), epoch, dtype=np.int64)
    out["_window"] = np.full(len(k), win, dtype=np.int64)
    out["_pos"] = np.asarray(positions, dtype=np.int64)[k]
    out["_sid"] = np.asarray([sample_hash(str(batch["sample_id"][i])) for i in k], dtype=np.int64)
    return out


@dataclass
class StreamStart:
    """Where a rank's stream begins: the first window to read and the rows of it already trained on."""
    epoch: int = 0
    window: int = 0
    offset: int = 0


def rank_stream(plan: StreamPlan, decoder: RowDecoder, *, rank: int, start: StreamStart, epochs: int,
                decode_tasks: int, decode_batch_size: int, counter: Optional[tuple[str, Optional[str]]] = None,
                buffer_mb: float = 0, block_mb: float = 16) -> "ray.data.Dataset":
    """One rank's streaming dataset over epochs [start.epoch, epochs), starting at `start`; `buffer_mb` > 0 bounds
    the decoded batches it holds in the object store (`data.decoded_buffer_mb`); `block_mb` > 0 is the size of the
    blocks the decode tasks yield (`data.decoded_block_mb`; Ray Data would coalesce a window's decoded chunks into
    128 MiB blocks, most of a window at 224 px)."""
    items = []
    for e in range(start.epoch, epochs):
        for w in plan.windows(e, rank):
            if e == start.epoch and w.index < start.window:
                continue
            skip = start.offset if (e == start.epoch and w.index == start.window) else 0
            if skip >= w.rows:
                continue
            slices = [[plan.units[ui].path, plan.units[ui].row_group, a, b] for ui, a, b in w.slices]
            order = plan.window_order(e, rank, w) if plan.shuffle_rows else None
            items.append({"epoch": e, "window": w.index, "skip": skip,
                          "spec": json.dumps({"slices": slices,
                                              "order": order.tolist() if order is not None else None})})
    ctx = ray.data.DataContext.get_current()
    old = ctx.execution_options.preserve_order, ctx.execution_options.resource_limits, ctx.target_max_block_size
    ctx.execution_options.preserve_order = True  # the window order is the data order; datasets copy the context
    if buffer_mb > 0:
        ctx.execution_options.resource_limits = old[1].copy(object_store_memory=int(buffer_mb * 2**20))
    if block_mb > 0:
        ctx.target_max_block_size = max(1, int(block_mb * 2**20))
    try:
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        return ds.map_batches(
            read_window,
            fn_kwargs=dict(decoder=decoder, decode_rows_n=max(1, decode_batch_size), seed=plan.seed,
                           on_skip_counter=counter),
            batch_size=1,
            compute=ray.data.TaskPoolStrategy(size=max(1, decode_tasks)),
            num_cpus=1,
        )
    finally:
        ctx.execution_options.preserve_order, ctx.execution_options.resource_limits, ctx.target_max_block_size = old


# --------------------------------------------------------------------------- per-rank batches


class EpochBatcher:
    """Full batches of `rows` rows from a rank's stream of decoded blocks, never straddling an epoch.

    `next_batch(epoch)` returns the next `rows` rows of that epoch, or None when the epoch's rows run out before
    a full batch (the partial rows are dropped; `short_rows` says how many). Rows of earlier epochs still in the
    stream (a finished epoch's unused reserve) are discarded on the way."""

    def __init__(self, blocks: Iterator[dict[str, np.ndarray]], rows: int):
        self.blocks = blocks
        self.rows = rows
        self.pending: deque[dict[str, np.ndarray]] = deque()
        self.done = False
        self.short_rows = 0

    def _fill(self) -> bool:
        if self.done:
            return False
        try:
            blk = next(self.blocks)
        except StopIteration:
            self.done = True
            return False
        ep = blk["_epoch"]
        if len(ep) and ep[0] != ep[-1]:  # never from one window's task, but cheap to be safe
            for e in np.unique(ep):
                m = ep == e
                self.pending.append({k: v[m] for k, v in blk.items()})
        elif len(ep):
            self.pending.append(blk)
        return True

    def next_batch(self, epoch: int) -> Optional[dict[str, np.ndarray]]:
        parts: list[dict[str, np.ndarray]] = []
        have = 0
        while have < self.rows:
            if not self.pending and not self._fill():
                break
            if not self.pending:
                continue
            blk = self.pending[0]
            e = int(blk["_epoch"][0])
            if e < epoch:
                self.pending.popleft()
                continue
            if e > epoch:
                break
            take = min(self.rows - have, len(blk["_epoch"]))
            if take == len(blk["_epoch"]):
                parts.append(self.pending.popleft())
            else:
                parts.append({k: v[:take] for k, v in blk.items()})
                self.pending[0] = {k: v[take:] for k, v in blk.items()}
            have += take
        if have < self.rows:  # this epoch's rows ran out for this rank: the partial batch is dropped
            self.short_rows = have
            return None
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class BatchPrefetcher:
    """`EpochBatcher` in a background thread: forms (and `convert`s: to torch, pinned memory) up to `depth`
    batches ahead of training, epoch by epoch, so batch assembly and copies overlap the training step.

    `next_batch(epoch)` has `EpochBatcher`'s meaning: the next full batch of that epoch, or None when its rows ran
    out (then `short_rows` is the size of the dropped partial batch). Batches of an epoch the caller has left
    (its planned steps were done before the rows ran out) are discarded."""

    def __init__(self, batcher: EpochBatcher, epochs: range, convert=lambda b: b, depth: int = 2):
        import queue
        import threading
        self.short_rows = 0
        self._eof = False
        self._q: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()

        def produce():
            try:
                for e in epochs:
                    while not self._stop.is_set():
                        b = batcher.next_batch(e)
                        if b is None:
                            self._put(("end", e, batcher.short_rows))
                            break
                        self._put(("batch", e, convert(b)))
                self._put(("eof", epochs.stop, None))
            except BaseException as err:  # noqa: BLE001 - re-raised in the training thread
                self._put(("error", -1, err))

        self._thread = threading.Thread(target=produce, name="medvl-batches", daemon=True)
        self._thread.start()

    def _put(self, item) -> None:
        import queue
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def next_batch(self, epoch: int):
        while not self._eof:
            kind, e, payload = self._q.get()
            if kind == "error":
                raise payload
            self._eof = kind == "eof"
            if kind == "eof" or (kind == "end" and e >= epoch):
                self.short_rows = payload if kind == "end" else 0
                return None
            if e < epoch:
                continue
            return payload
        self.short_rows = 0
        return None

    def close(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------- simple whole-split streaming


def build_dataset(data: DataConfig, decoder: RowDecoder, split: str, *, train: bool = True, seed: int = 0,
                  epochs: range = range(1), counter_name: Optional[str] = None,
                  namespace: Optional[str] = None) -> "ray.data.Dataset":
    """All rows of a split for `epochs` passes as one stream (one rank's plan with world size 1, from the first
    window of `epochs.start`), decoded by the method's `decoder`: for benchmarks and data tools. Training uses
    `rank_stream` directly."""
    units = read_units(data.corpus, split, data.max_unit_rows)
    plan = StreamPlan(units, seed, 1, data.shuffle_buffer or data.max_unit_rows,
                      shuffle_units=train and data.shuffle_files, shuffle_rows=train and data.shuffle_buffer > 0,
                      window_bytes=int(data.shuffle_buffer_mb * 2**20))
    return rank_stream(plan, decoder, rank=0, start=StreamStart(epochs.start, 0, 0), epochs=epochs.stop,
                       decode_tasks=data.decode_tasks, decode_batch_size=data.decode_batch_size,
                       counter=(counter_name, namespace) if counter_name else None,
                       buffer_mb=data.decoded_buffer_mb, block_mb=data.decoded_block_mb)


def meta_and_batch(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split a stream batch into (stream coordinates, the method's named arrays)."""
    meta = {k: batch[k] for k in META_COLUMNS if k in batch}
    return meta, {k: v for k, v in batch.items() if k not in META_COLUMNS}


def rows_of(batch: dict[str, Any]) -> int:
    return len(next(iter(batch.values())))
