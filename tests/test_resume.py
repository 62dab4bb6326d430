"""Nothing lost, nothing trained twice: the data plan, exact resume after a killed worker or a killed driver, complete
epochs with corrupt rows on 2 workers, safe checkpoints (checksums, fallback, weights_only, RNG), no scratch
checkpoint left behind, changed recipes refused, pretrained files loaded strictly.

The training tests run in audit mode (`MEDVL_AUDIT_SAMPLES`): every rank records the sample-id hashes (and its
local loss) of each step it trains, so an interrupted run is compared step by step with an uninterrupted one.
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medvl.config import ConfigError, ModelConfig, dump_yaml, load_recipe
from medvl.data.corpus import Manifest, ShardWriter, iter_rows, shard_paths, write_manifest
from medvl.data.decode import sample_hash
from medvl.data.stream import StreamPlan, plan_for, read_units
from medvl.train import checkpoint as ck

# --------------------------------------------------------------------------- the data plan (no Ray)


def _labels_by_row(corpus: str) -> dict[tuple[str, int, int], tuple[str, int]]:
    """(shard, row group, row in group) -> (sample id, class) for the train split."""
    import pyarrow.parquet as pq
    out = {}
    for p in shard_paths(corpus, "train"):
        pf = pq.ParquetFile(p)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=["sample_id", "labels"]).to_pylist()
            for i, r in enumerate(t):
                out[(p, g, i)] = (r["sample_id"], int(dict(r["labels"])["digit"]))
    return out


def test_plan_is_a_partition_reproducible_and_reshuffled_every_epoch(digits_corpus):
    units = read_units(digits_corpus, "train")
    n = sum(u.rows for u in units)
    assert n == 1437
    for world in (1, 2, 3):
        plan = StreamPlan(units, seed=0, world=world, window_rows=100)
        per_epoch = []
        for epoch in range(2):
            rows = [plan.rank_rows(epoch, r) for r in range(world)]
            assert all(len(x) == n // world for x in rows)  # equal parts: equal steps on every rank
            flat = [x for rr in rows for x in rr]
            assert len(set(flat)) == len(flat)  # no row twice in an epoch
            per_epoch.append(rows)
        assert per_epoch[0] != per_epoch[1]  # another order every epoch
        assert StreamPlan(units, 0, world, 100).rank_rows(1, 0) == per_epoch[1][0]  # a pure function
        assert plan.steps_per_epoch(60 if world == 3 else 64) == n // (60 if world == 3 else 64)
    assert StreamPlan(units, 1, 2, 100).rank_rows(0, 0) != StreamPlan(units, 0, 2, 100).rank_rows(0, 0)


def test_ingest_and_plan_mix_classes_in_every_batch(digits_corpus):
    """Folder ingest used to write rows class by class; every 64-sample batch of the first epoch (2 ranks x 32,
    the demo's settings) must now hold >= 8 of the 10 digits."""
    labels = _labels_by_row(digits_corpus)
    for p in shard_paths(digits_corpus, "train"):  # the shards themselves are mixed
        first = [int(dict(r["labels"])["digit"]) for r in list(iter_rows([p], columns=["labels"]))[:64]]
        assert len(set(first)) >= 8, p
    recipe = load_recipe(data={"data": {"corpus": digits_corpus, "batch_size": 64}, "train": {"num_workers": 2}})
    plan = plan_for(recipe.data, recipe.train.seed, 2)
    r0, r1 = plan.rank_rows(0, 0), plan.rank_rows(0, 1)
    for k in range(plan.steps_per_epoch(64)):
        batch = r0[32 * k:32 * (k + 1)] + r1[32 * k:32 * (k + 1)]
        classes = Counter(labels[x][1] for x in batch)
        assert len(classes) >= 8, (k, classes)


# --------------------------------------------------------------------------- checkpoints (no Ray)


def _state():
    torch.manual_seed(0)
    return {"model": {"w": torch.randn(4, 4)}, "step": 3, "rng": [ck.capture_rng()]}


def test_checkpoint_is_checksummed_and_verified(tmp_path):
    d = ck.write_checkpoint(tmp_path / "c", _state(), {"step": 3})
    assert ck.load_checkpoint(d)["step"] == 3
    assert not list(d.glob("*.tmp"))
    raw = bytearray((d / ck.STATE_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped bit in the middle of the tensor data
    (d / ck.STATE_FILE).write_bytes(bytes(raw))
    with pytest.raises(ck.CheckpointError, match="sha256"):
        ck.load_checkpoint(d)
    (d / ck.STATE_FILE).write_bytes(bytes(raw[:100]))
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.verify_checkpoint(d)
    (d / ck.MANIFEST_FILE).unlink()
    with pytest.raises(ck.CheckpointError, match="incomplete"):
        ck.verify_checkpoint(d)


class _Payload:  # a class inside a checkpoint: loading it would need arbitrary unpickling
    pass


def test_checkpoint_needing_arbitrary_unpickling_is_refused(tmp_path):
    state = _state()
    state["extra"] = _Payload()
    d = ck.write_checkpoint(tmp_path / "c", state, {"step": 3})
    with pytest.raises(ck.CheckpointError, match=r"refusing to load.*_Payload.*weights_only=True"):
        ck.load_checkpoint(d)


def test_rng_states_round_trip():
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    torch.rand(3), np.random.rand(3), random.random()
    saved = ck.capture_rng()
    a = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    buf = io.BytesIO()
    torch.save(saved, buf)  # through a checkpoint file, as training does
    buf.seek(0)
    ck.restore_rng(torch.load(buf, weights_only=True))
    b = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


def test_checkpoint_names_never_reuse_a_stored_directory():
    taken = {"checkpoint_step=0000040", "checkpoint_step=0000040.1"}
    assert ck.checkpoint_dir_name(40, taken.__contains__) == "checkpoint_step=0000040.2"
    assert ck.checkpoint_dir_name(45, taken.__contains__) == "checkpoint_step=0000045"


# --------------------------------------------------------------------------- pretrained weights (no Ray)


def test_pretrained_partial_or_unsafe_file_is_refused(tmp_path):
    from medvl.models.factory import create_model
    torch.manual_seed(3)
    src = create_model(ModelConfig(name="test-vit-micro"))
    sd = src.state_dict()
    partial = {k: v for i, (k, v) in enumerate(sd.items()) if i % 2 == 0}  # half the keys: once silently accepted
    partial["head.extra.weight"] = torch.zeros(2)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match=r"missing keys.*1 unexpected keys \['head.extra.weight'\].*allow_partial"):
        create_model(ModelConfig(name="test-vit-micro", pretrained=str(tmp_path / "partial.pt")))
    m = create_model(ModelConfig(name="test-vit-micro", pretrained=str(tmp_path / "partial.pt"),
                                 allow_partial_load=True))
    k0 = next(iter(partial))
    assert torch.equal(m.state_dict()[k0], partial[k0])
    torch.save({"state_dict": sd, "args": _Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(ConfigError, match=r"refusing to load.*_Payload"):
        create_model(ModelConfig(name="test-vit-micro", pretrained=str(tmp_path / "unsafe.pt")))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    m = create_model(ModelConfig(name="test-vit-micro", pretrained=str(tmp_path / "w.safetensors")))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())


# --------------------------------------------------------------------------- changed recipes (MLflow, no Ray)


def test_resuming_with_a_changed_recipe_is_refused_unless_allowed(digits_corpus, run_root):
    from mlflow.tracking import MlflowClient

    from medvl.track import runs
    from medvl.train.launcher import prepare_job
    base = {"name": "change", "data": {"corpus": digits_corpus}, "model": {"name": "test-vit-micro"},
            "track": {"experiment": "tests"}}
    job = prepare_job(load_recipe(data=base))
    # operational keys may change freely
    prepare_job(load_recipe(data=base, overrides=["train.log_every=3", "data.decode_tasks=1"]))
    changed = load_recipe(data=base, overrides=["optim.lr=0.002", "train.epochs=12"])
    with pytest.raises(ConfigError) as e:
        prepare_job(changed)
    assert "optim.lr: 0.001 -> 0.002" in str(e.value) and "train.epochs: 10 -> 12" in str(e.value)
    assert "--allow-recipe-change" in str(e.value)
    allowed = load_recipe(data=base, overrides=["optim.lr=0.002", "train.epochs=12",
                                                "runtime.allow_recipe_change=true"])
    job2 = prepare_job(allowed)
    assert job2.mlflow_run_id == job.mlflow_run_id
    tags = MlflowClient(runs.tracking_uri(allowed)).get_run(job.mlflow_run_id).data.tags
    assert tags["medvl.recipe_changes"] == "1"
    assert "optim.lr: 0.001 -> 0.002" in tags["medvl.recipe_change.1"]
    assert yaml.safe_load((job.run_dir / "recipe.yaml").read_text())["optim"]["lr"] == 0.002
    assert yaml.safe_load((job.run_dir / "recipe.before_change_1.yaml").read_text())["optim"]["lr"] == 0.001
    prepare_job(allowed)  # the new recipe is now the run's own: resuming with it again is no change


# --------------------------------------------------------------------------- Ray Data follows the plan


def _corrupt_copy(src: str, dst: Path, every: int, offset: int = 3, limit: int = 10**9) -> list[str]:
    """Copy the digits train split, truncating the image bytes of some rows *after* ingest (storage bit rot)."""
    w = ShardWriter(dst, shard_size=400)
    bad = []
    for i, row in enumerate(iter_rows(shard_paths(src, "train"))):
        row["labels"] = dict(row["labels"] or [])
        if i % every == offset and len(bad) < limit:
            row["image"] = row["image"][:40]
            bad.append(row["sample_id"])
        w.add(row)
    for row in iter_rows(shard_paths(src, "val")):
        row["labels"] = dict(row["labels"] or [])
        w.add(row)
    write_manifest(dst, Manifest(source="corrupted copy", shards=w.close(), label_field="digit",
                                 classnames=[str(i) for i in range(10)]))
    return bad


@pytest.mark.timeout(300)
def test_stream_follows_the_plan_resumes_exactly_and_skips_corrupt_rows(ray_local, digits_corpus, tmp_path):
    """Each rank's Ray Data stream delivers exactly its plan's rows in plan order (2 decode tasks, many small
    windows: out-of-order completion must not reorder them), starting mid-window on resume, minus corrupt rows."""
    from dataclasses import asdict

    from medvl.data.stream import StreamStart, rank_stream
    from medvl.methods.clip import ClipDecoder
    corpus = tmp_path / "c"
    bad = {sample_hash(s) for s in _corrupt_copy(digits_corpus, corpus, every=37)}
    ids = {k: v[0] for k, v in _labels_by_row(str(corpus)).items()}
    plan = StreamPlan(read_units(str(corpus), "train"), seed=3, world=2, window_rows=50)
    dec = ClipDecoder(asdict(ModelConfig(name="test-vit-micro")), train=True)

    def stream(rank, start):
        ds = rank_stream(plan, dec, rank=rank, start=start, epochs=2, decode_tasks=2, decode_batch_size=16)
        return [(int(e), int(w), int(p), int(s)) for b in ds.iter_batches(batch_size=None, batch_format="numpy")
                for e, w, p, s in zip(b["_epoch"], b["_window"], b["_pos"], b["_sid"])]

    for rank in (0, 1):
        got = stream(rank, StreamStart(0, 0, 0))
        want = [sample_hash(ids[x]) for e in range(2) for x in plan.rank_rows(e, rank)]
        assert [s for *_, s in got] == [s for s in want if s not in bad]
    # resume in the middle of window 3 of epoch 0 (rank 1): exactly the rest, in order
    start = StreamStart(0, 3, 17)
    got = stream(1, start)
    skip = sum(w.rows for w in plan.windows(0, 1)[:3]) + 17
    want = [sample_hash(ids[x]) for x in plan.rank_rows(0, 1)[skip:] + plan.rank_rows(1, 1)]
    assert [s for *_, s in got] == [s for s in want if s not in bad]
    assert got[0][:2] == (0, 3) and got[0][2] >= 17
