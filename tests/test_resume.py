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


def test_batches_never_straddle_epochs_and_short_epochs_say_so():
    from medvl.data.stream import BatchPrefetcher, EpochBatcher

    def blocks():  # epoch 1's second window lost most rows to corrupt images
        for e in range(3):
            for w in range(2):
                n = 3 if (e, w) == (1, 1) else 10
                yield {"_epoch": np.full(n, e), "_window": np.full(n, w), "_pos": np.arange(n),
                       "_sid": np.arange(n) + 100 * e, "x": np.arange(n)}

    b = BatchPrefetcher(EpochBatcher(blocks(), 4), range(3), depth=2)
    seen = []
    for e in range(3):
        while (x := b.next_batch(e)) is not None:
            assert set(x["_epoch"]) == {e}
            seen.append((e, len(x["x"])))
            if e == 0 and len(seen) == 2:
                break  # epoch 0's planned steps are done: its last full batch must not leak into epoch 1
        if e == 1:
            assert b.short_rows == 1  # 13 rows: 3 full batches and one dropped row
    assert seen == [(0, 4), (0, 4), (1, 4), (1, 4), (1, 4), (2, 4), (2, 4), (2, 4), (2, 4), (2, 4)]
    assert b.next_batch(3) is None


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
    windows: out-of-order completion must not reorder them), starting mid-window on resume, minus corrupt rows.
    The resumed stream runs under a tiny object-store budget (`data.decoded_buffer_mb`) and in tiny blocks
    (`data.decoded_block_mb`): backpressure and block size change speed, never the rows or their order."""
    from dataclasses import asdict

    from medvl.data.stream import StreamStart, rank_stream
    from medvl.methods.clip import ClipDecoder
    corpus = tmp_path / "c"
    bad = {sample_hash(s) for s in _corrupt_copy(digits_corpus, corpus, every=37)}
    ids = {k: v[0] for k, v in _labels_by_row(str(corpus)).items()}
    plan = StreamPlan(read_units(str(corpus), "train"), seed=3, world=2, window_rows=120)
    dec = ClipDecoder(asdict(ModelConfig(name="test-vit-micro")), train=True)

    blocks: dict[int, list[int]] = {}

    def stream(rank, start, buffer_mb=0, block_mb=16):
        import ray.data
        ds = rank_stream(plan, dec, rank=rank, start=start, epochs=2, decode_tasks=2, decode_batch_size=16,
                         buffer_mb=buffer_mb, block_mb=block_mb)
        limit = ds.context.execution_options.resource_limits.object_store_memory
        assert limit == (buffer_mb * 2**20 if buffer_mb else float("inf"))
        assert ds.context.target_max_block_size == int(block_mb * 2**20)
        here = ray.data.DataContext.get_current()  # the budget and block size are the dataset's own:
        assert here.execution_options.resource_limits.object_store_memory == float("inf")  # the process's
        assert here.target_max_block_size == 128 * 2**20  # context is left as it was
        out = []
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            blocks.setdefault(rank, []).append(len(b["_sid"]))
            out += [(int(e), int(w), int(p), int(s)) for e, w, p, s in zip(b["_epoch"], b["_window"], b["_pos"],
                                                                           b["_sid"])]
        return out

    got = stream(0, StreamStart(0, 0, 0))
    want = [sample_hash(ids[x]) for e in range(2) for x in plan.rank_rows(e, 0)]
    assert [s for *_, s in got] == [s for s in want if s not in bad]
    assert len(plan.windows(0, 0)) >= 6 and len(want) - len(got) >= 20  # many windows, many corrupt rows
    # resume in the middle of window 3 of epoch 0 (rank 1): exactly the rest, in order
    start = StreamStart(0, 3, 17)
    got = stream(1, start, buffer_mb=2, block_mb=0.02)  # 20 KiB blocks: a 16-row chunk (48 KiB) is cut in pieces
    skip = sum(w.rows for w in plan.windows(0, 1)[:3]) + 17
    want = [sample_hash(ids[x]) for x in plan.rank_rows(0, 1)[skip:] + plan.rank_rows(1, 1)]
    assert [s for *_, s in got] == [s for s in want if s not in bad]
    assert got[0][:2] == (0, 3) and got[0][2] >= 17
    # 16 MB blocks hold whole 120-row windows of these tiny images (the decode chunks of 16 rows joined); 20 KiB
    # blocks are smaller than one chunk
    assert max(blocks[0]) > 16 and max(blocks[1]) < 16, {r: sorted(set(v)) for r, v in blocks.items()}


# --------------------------------------------------------------------------- training runs (real Ray Train)

AUDIT = "MEDVL_AUDIT_SAMPLES"


def _recipe(corpus: str, name: str, scratch: Path, **over):
    base = {"name": name, "data": {"corpus": corpus, "batch_size": 64, "shuffle_buffer": 256},
            "model": {"name": "test-vit-micro"},
            "train": {"epochs": 2, "num_workers": 2, "log_every": 5, "ckpt_every": 5, "max_failures": 3},
            "eval": {"templates": ["a photo of the digit {}."]},
            "track": {"experiment": "tests", "log_model": False}, "runtime": {"scratch_dir": str(scratch)}}
    for k, v in over.items():
        sect, key = k.split("__")
        base.setdefault(sect, {})[key] = v
    return load_recipe(data=base)


def _audit(directory: Path) -> dict[int, dict[int, dict]]:
    """rank -> step -> the record of the *last* attempt that trained that step (what the model kept)."""
    out: dict[int, dict[int, dict]] = {}
    for f in sorted(Path(directory).glob("rank*.jsonl")):
        steps: dict[int, dict] = {}
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            steps[rec["step"]] = rec
        out[int(f.stem[4:])] = steps
    return out


def _attempts(directory: Path, rank: int) -> list[str]:
    seen: list[str] = []
    for line in (Path(directory) / f"rank{rank}.jsonl").read_text().splitlines():
        a = json.loads(line)["attempt"]
        if a not in seen:
            seen.append(a)
    return seen


def _same_samples(a: dict, b: dict) -> None:
    """Step by step and rank by rank the same sample ids (hence per epoch the same multiset)."""
    assert sorted(a) == sorted(b)
    for rank in a:
        assert sorted(a[rank]) == sorted(b[rank]), rank
        for step in a[rank]:
            assert a[rank][step]["sids"] == b[rank][step]["sids"], (rank, step)
            assert a[rank][step]["epoch"] == b[rank][step]["epoch"], (rank, step)
    for epoch in {r["epoch"] for r in a[0].values()}:
        ma = Counter(s for rk in a for r in a[rk].values() if r["epoch"] == epoch for s in r["sids"])
        mb = Counter(s for rk in b for r in b[rk].values() if r["epoch"] == epoch for s in r["sids"])
        assert ma == mb and max(ma.values()) == 1  # nothing trained twice within an epoch


def _kill_worker_when(audit_dir: Path, rank: int, min_step: int, storage: Path, out: dict, timeout=400) -> tuple:
    """SIGKILL the rank's train worker process (its pid is in the audit records) once it trained `min_step` steps
    and a checkpoint is registered."""
    from medvl.train.worker import latest_position
    f = audit_dir / f"rank{rank}.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and "error" not in out and "metrics" not in out:
        lines = f.read_text().splitlines() if f.exists() else []
        pos = latest_position(storage)
        if lines and json.loads(lines[-1])["step"] >= min_step and pos and pos["step"] >= 5:
            rec = json.loads(lines[-1])
            pid = int(rec["attempt"].split("-")[0])
            os.kill(pid, signal.SIGKILL)  # a real worker process dies mid-run
            return pid, rec["step"], time.time()
        time.sleep(0.02)
    raise AssertionError(f"run did not reach step {min_step} with a checkpoint (out={out})")


def _train_in_thread(recipe, out):
    from medvl.train.launcher import run_training

    def fit():
        try:
            out["job"], out["metrics"] = run_training(recipe)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e
    th = threading.Thread(target=fit)
    th.start()
    return th


def _metric(recipe, run_id, key):
    from mlflow.tracking import MlflowClient

    from medvl.track import runs
    return sorted(MlflowClient(runs.tracking_uri(recipe)).get_metric_history(run_id, key), key=lambda m: m.step)


def _final_weights(run_root: str, name: str) -> dict[str, torch.Tensor]:
    found, bad = ck.latest_valid_checkpoint(Path(run_root) / "ray" / name)
    assert found is not None and not bad, bad
    return ck.load_checkpoint(found)["model"]


def _no_scratch_left(scratch: Path, name: str) -> None:
    assert scratch.is_dir() and not list(scratch.iterdir()), list(scratch.iterdir())
    import tempfile
    assert not list(Path(tempfile.gettempdir()).glob(f"{ck.SCRATCH_PREFIX}{name}-*"))


def _patch_dropout_model(tmp_path: Path) -> str:
    """test-vit-micro with patch dropout: training draws from torch's RNG every step, so resuming with the same
    weights needs the RNG state restored too."""
    d = tmp_path / "models"
    d.mkdir()
    cfg = json.loads((Path(__file__).parents[1] / "platform/medvl/models/configs/test-vit-micro.json").read_text())
    cfg["vision_cfg"]["patch_dropout"] = 0.5
    (d / "test-vit-micro-pd.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_one_worker_killed_resumes_exactly_and_a_corrupt_latest_checkpoint_falls_back(
        ray_local, digits_corpus, run_root, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from medvl.track import runs
    from medvl.train.cli import eval_main
    from medvl.train.launcher import run_training
    scratch = tmp_path / "scratch"
    models = _patch_dropout_model(tmp_path)
    kw = dict(train__num_workers=1, model__name="test-vit-micro-pd", model__config_dir=models)

    # (1) uninterrupted reference
    monkeypatch.setenv(AUDIT, str(tmp_path / "audit-ref"))
    ref = _recipe(digits_corpus, "exact1-ref", scratch, data__val_split=None, **kw)
    job_ref, m_ref = run_training(ref)
    assert m_ref["step"] == job_ref.total_steps == 2 * (1437 // 64)
    _no_scratch_left(scratch, "exact1-ref")

    # (2) the same training, its only worker SIGKILLed after step 8: Ray restarts it from the step-5 checkpoint
    monkeypatch.setenv(AUDIT, str(tmp_path / "audit-kill"))
    rk = _recipe(digits_corpus, "exact1-kill", scratch, **kw)
    out: dict = {}
    th = _train_in_thread(rk, out)
    pid, killed_at_step, killed_at = _kill_worker_when(tmp_path / "audit-kill", 0, 8,
                                                       Path(run_root) / "ray" / "exact1-kill", out)
    th.join(900)
    assert "error" not in out, out.get("error")
    assert out["metrics"]["step"] == 44 and out["metrics"]["epoch"] == 2
    resumed = _metric(rk, out["job"].mlflow_run_id, "train/resumed_from_step")
    assert resumed and 5 <= resumed[-1].value <= killed_at_step and resumed[-1].timestamp / 1000 >= killed_at - 1
    measured = (f"[measured] train worker SIGKILLed at step {killed_at_step} -> training again (resumed from step "
                f"{int(resumed[-1].value)}) after {resumed[-1].timestamp / 1000 - killed_at:.1f}s")
    assert len(_attempts(tmp_path / "audit-kill", 0)) >= 2 and str(pid) in _attempts(tmp_path / "audit-kill", 0)[0]
    _same_samples(_audit(tmp_path / "audit-ref"), _audit(tmp_path / "audit-kill"))
    w_ref, w_kill = _final_weights(run_root, "exact1-ref"), _final_weights(run_root, "exact1-kill")
    assert all(torch.equal(w_ref[k], w_kill[k]) for k in w_ref)  # bit for bit
    _no_scratch_left(scratch, "exact1-kill")

    # (3) the latest checkpoint rots on disk: `medvl eval` and a re-run skip it, with a warning naming it
    storage = Path(run_root) / "ray" / "exact1-kill"
    latest = storage / "checkpoint_step=0000044"
    raw = bytearray((latest / ck.STATE_FILE).read_bytes())
    raw[len(raw) // 3] ^= 0x01
    (latest / ck.STATE_FILE).write_bytes(bytes(raw))
    rfile = tmp_path / "exact1-kill.yaml"
    rfile.write_text(dump_yaml(rk))
    assert eval_main([str(rfile)]) == 0
    said = capsys.readouterr().out
    assert "skipping checkpoint checkpoint_step=0000044" in said and "checkpoint checkpoint_step=0000040" in said
    job3, m3 = run_training(rk)  # restarts from step 40, re-trains steps 41-44 exactly
    assert job3.mlflow_run_id == out["job"].mlflow_run_id and m3["step"] == 44
    client = MlflowClient(runs.tracking_uri(rk))
    run = client.get_run(job3.mlflow_run_id)
    assert "checkpoint_step=0000044 corrupt -> resumed from checkpoint_step=0000040" in \
        run.data.tags["medvl.checkpoint_fallback"]
    assert _metric(rk, job3.mlflow_run_id, "train/resumed_from_step")[-1].value == 40
    assert (storage / "checkpoint_step=0000044.1").is_dir()  # never written into the corrupt one's directory
    w_fb = _final_weights(run_root, "exact1-kill")
    assert all(torch.equal(w_ref[k], w_fb[k]) for k in w_ref)
    assert run.info.status == "FINISHED" and "val/zero_shot_accuracy" in run.data.metrics
    _no_scratch_left(scratch, "exact1-kill")

    # (4) the same command once more: nothing left to train, the same MLflow run (never a duplicate), and
    # `medvl eval` takes the newest checkpoint that verifies and logs into that run
    job4, m4 = run_training(rk)
    assert job4.mlflow_run_id == job3.mlflow_run_id and m4["step"] == 44
    capsys.readouterr()
    assert eval_main([str(rfile)]) == 0
    assert "checkpoint checkpoint_step=0000044.1 (step 44)" in capsys.readouterr().out
    print(f"\n{measured}")  # printed last: the capsys reads above would consume it
    assert client.get_metric_history(job3.mlflow_run_id, "eval/zero_shot_accuracy")[-1].step == 44
    found = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                               filter_string="tags.mlflow.runName = 'exact1-kill'")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    assert "plots/loss_curve.png" in {a.path for a in client.list_artifacts(job3.mlflow_run_id, "plots")}


def _fail_steps(monkeypatch, at: set[int], seen: list) -> None:
    """In-process runs train in this process: make `train_step` raise at the given (1-based) calls."""
    import medvl.train.worker as worker
    from medvl.train.step import train_step as real

    def flaky(*a, **kw):
        seen.append(1)
        if len(seen) in at:
            raise RuntimeError(f"injected failure at call {len(seen)}")
        return real(*a, **kw)
    monkeypatch.setattr(worker, "train_step", flaky)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_in_process_run_retries_exactly_and_keeps_ray_trains_checkpoint_registry(
        ray_local, digits_corpus, run_root, tmp_path, monkeypatch, capsys):
    """`train.launch: in_process` (Ray Train's local mode): an attempt that fails is retried from the last
    registered checkpoint and ends bit for bit where an uninterrupted run ends; its checkpoints are persisted,
    registered and rotated so that Ray Train's own checkpoint manager takes them over (`launch: workers`)."""
    import ray.train.v2._internal.execution.checkpoint.checkpoint_manager as cm

    from medvl.train.launcher import run_training
    scratch = tmp_path / "scratch"
    kw = dict(train__num_workers=1, train__launch="in_process", data__val_split=None)

    # (1) uninterrupted reference, in process
    monkeypatch.setenv(AUDIT, str(tmp_path / "audit-ref"))
    job_ref, m_ref = run_training(_recipe(digits_corpus, "inproc-ref", scratch, **kw))
    assert m_ref["step"] == job_ref.total_steps == 44

    # (2) the same run, its 9th step raising: the retry resumes at the step-5 checkpoint, nothing else changes
    monkeypatch.setenv(AUDIT, str(tmp_path / "audit-fail"))
    calls: list = []
    _fail_steps(monkeypatch, {9}, calls)
    rf = _recipe(digits_corpus, "inproc-fail", scratch, **kw)
    job, m = run_training(rf)
    assert m["step"] == 44 and m["epoch"] == 2
    said = capsys.readouterr().out
    assert "in-process training attempt failed (RuntimeError: injected failure at call 9); retrying from the " \
           "last registered checkpoint (retry 1 of 3)" in said
    assert [p.value for p in _metric(rf, job.mlflow_run_id, "train/resumed_from_step")] == [5]
    assert len(_attempts(tmp_path / "audit-fail", 0)) == 2
    _same_samples(_audit(tmp_path / "audit-ref"), _audit(tmp_path / "audit-fail"))
    w_ref, w_fail = _final_weights(run_root, "inproc-ref"), _final_weights(run_root, "inproc-fail")
    assert all(torch.equal(w_ref[k], w_fail[k]) for k in w_ref)  # bit for bit
    _no_scratch_left(scratch, "inproc-fail")
    storage = Path(run_root) / "ray" / "inproc-fail"
    snap = json.loads((storage / ck.SNAPSHOT_FILE).read_text())
    state = cm._CheckpointManagerState
    getattr(state, "model_validate", state.parse_obj)(snap)  # Ray's own schema
    kept = [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]]
    assert kept == ["checkpoint_step=0000040", "checkpoint_step=0000044"]  # train.keep_checkpoints: 2, rotated
    assert sorted(p.name for p in storage.glob("checkpoint_step=*")) == kept
    assert snap["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_step=0000044"

    # (3) one more epoch with Ray Train's workers: its checkpoint manager loads medvl's registry and rotates it
    more = _recipe(digits_corpus, "inproc-fail", scratch, train__num_workers=1, train__launch="workers",
                   train__epochs=3, data__val_split=None, runtime__allow_recipe_change=True)
    job3, m3 = run_training(more)
    assert job3.mlflow_run_id == job.mlflow_run_id and m3["step"] == 66
    assert [p.value for p in _metric(more, job.mlflow_run_id, "train/resumed_from_step")] == [5, 44]
    assert sorted(p.name for p in storage.glob("checkpoint_step=*")) == ["checkpoint_step=0000065",
                                                                   "checkpoint_step=0000066"]

    # (4) every attempt failing: max_failures retries, then the error, and the MLflow run is FAILED
    calls.clear()
    _fail_steps(monkeypatch, set(range(1, 100)), calls)
    rx = _recipe(digits_corpus, "inproc-broken", scratch, **kw, train__max_failures=1)
    with pytest.raises(RuntimeError, match="injected failure at call 2"):
        run_training(rx)
    assert len(calls) == 2
    from mlflow.tracking import MlflowClient

    from medvl.track import runs
    client = MlflowClient(runs.tracking_uri(rx))
    found = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                               filter_string="tags.mlflow.runName = 'inproc-broken'")
    assert len(found) == 1 and found[0].info.status == "FAILED"


def _simulate(plan: StreamPlan, ids: dict, bad: set[int], epochs: int, per_rank: int) -> tuple[dict, int, list]:
    """What training must do on a corpus with corrupt rows, from the plan alone: rank -> step -> sample ids, the
    skipped rows the ranks passed, and the steps of each epoch."""
    S = plan.steps_per_epoch(per_rank * plan.world)
    steps: dict[int, dict[int, list[int]]] = {r: {} for r in range(plan.world)}
    skipped, step, per_epoch = 0, 0, []
    for e in range(epochs):
        seqs = [[sample_hash(ids[x]) for x in plan.rank_rows(e, r)] for r in range(plan.world)]
        goods = [[s for s in q if s not in bad] for q in seqs]
        k = min(min(S, len(g) // per_rank) for g in goods)
        for r in range(plan.world):
            for i in range(k):
                steps[r][step + i + 1] = goods[r][i * per_rank:(i + 1) * per_rank]
            if k < S and len(goods[r]) // per_rank == k:  # this rank ran short: it passed its whole part
                skipped += len(seqs[r]) - len(goods[r])
            elif k:
                last = seqs[r].index(goods[r][k * per_rank - 1])
                skipped += last + 1 - k * per_rank
        step += k
        per_epoch.append(k)
    return steps, skipped, per_epoch


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_workers_corrupt_rows_complete_epochs_and_killed_worker_or_driver_resume_exactly(
        ray_local, digits_corpus, run_root, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from medvl.track import runs
    from medvl.train.launcher import run_training
    scratch = tmp_path / "scratch"
    corpus = tmp_path / "corrupt"
    bad_ids = _corrupt_copy(digits_corpus, corpus, every=24)
    bad = {sample_hash(s) for s in bad_ids}
    ids = {k: v[0] for k, v in _labels_by_row(str(corpus)).items()}

    # (1) uninterrupted, 2 workers: ~30 corrupt rows per rank and epoch, 14 rows of reserve each
    monkeypatch.setenv(AUDIT, str(tmp_path / "audit-ref"))
    ref = _recipe(str(corpus), "corrupt2-ref", scratch, train__keep_checkpoints=50)  # keep every checkpoint
    assert len(bad_ids) > 1437 % 64
    job, m = run_training(ref)
    plan = job.plan
    want, want_skipped, per_epoch = _simulate(plan, ids, bad, 2, 32)
    assert all(k < 22 for k in per_epoch)  # the ranks ran out of rows: the epochs ended early ...
    assert m["step"] == sum(per_epoch) and m["epoch"] == 2  # ... and the run reports the steps it took
    got = _audit(tmp_path / "audit-ref")
    assert {r: {s: rec["sids"] for s, rec in got[r].items()} for r in got} == want
    client = MlflowClient(runs.tracking_uri(ref))
    run = client.get_run(job.mlflow_run_id)
    assert run.info.status == "FINISHED"
    ends = [per_epoch[0], sum(per_epoch)]
    assert [x.step for x in _metric(ref, job.mlflow_run_id, "val/zero_shot_accuracy")] == ends  # eval each epoch
    regs = {r.name for r in ck.registered_checkpoints(Path(run_root) / "ray" / "corrupt2-ref")}
    assert {f"checkpoint_step={s:07d}" for s in ends} <= regs  # and a checkpoint each epoch
    assert _metric(ref, job.mlflow_run_id, "train/skipped_samples")[-1].value == want_skipped
    # train/loss is the mean over ranks (and steps since the last log) of the ranks' local losses
    prev = 0
    for pt in _metric(ref, job.mlflow_run_id, "train/loss"):
        window = [got[r][s]["loss"] for r in got for s in range(prev + 1, pt.step + 1)]
        assert pt.value == pytest.approx(sum(window) / len(window), rel=1e-5), pt.step
        prev = pt.step
    assert prev == m["step"]
    _no_scratch_left(scratch, "corrupt2-ref")

    # (2) rank 1's worker SIGKILLed mid-epoch: the group restarts from the last checkpoint, exactly
    monkeypatch.setenv(AUDIT, str(tmp_path / "audit-kill"))
    rk = _recipe(str(corpus), "corrupt2-kill", scratch, data__val_split=None)  # eval never changes the order
    out: dict = {}
    th = _train_in_thread(rk, out)
    _kill_worker_when(tmp_path / "audit-kill", 1, 8, Path(run_root) / "ray" / "corrupt2-kill", out)
    th.join(900)
    assert "error" not in out, out.get("error")
    assert out["metrics"]["step"] == m["step"]
    assert len(_attempts(tmp_path / "audit-kill", 1)) >= 2
    _same_samples(got, _audit(tmp_path / "audit-kill"))
    assert _metric(rk, out["job"].mlflow_run_id, "train/skipped_samples")[-1].value == want_skipped
    assert _metric(rk, out["job"].mlflow_run_id, "train/resumed_from_step")
    found = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                               filter_string="tags.mlflow.runName = 'corrupt2-kill'")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    _no_scratch_left(scratch, "corrupt2-kill")

    # (3) the driver (`medvl train` in its own process, embedded Ray) SIGKILLed mid-run, then run again. This
    # module's cluster is not needed any more: stop it, so that on a 2-core machine the driver's own Ray starts
    # next to nothing else of ours.
    import ray
    ray.shutdown()
    rd = _recipe(str(corpus), "corrupt2-driver", scratch, data__val_split=None)
    rfile = tmp_path / "corrupt2-driver.yaml"
    rfile.write_text(dump_yaml(rd))
    env = {**os.environ, AUDIT: str(tmp_path / "audit-driver"), "MEDVL_RUN_ROOT": run_root,
           "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "medvl.cli", "train", str(rfile)]
    log1 = open(tmp_path / "driver1.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        f = tmp_path / "audit-driver" / "rank0.jsonl"
        from medvl.train.worker import latest_position
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            pos = latest_position(Path(run_root) / "ray" / "corrupt2-driver")
            if f.exists() and f.read_text().count("\n") >= 8 and pos and pos["step"] >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "driver1.log").read_text()[-3000:]
    finally:
        tree = _descendants(proc.pid)  # Ray's workers run in sessions of their own: collect them first
        for pid in [proc.pid] + tree:  # the driver and every Ray process it started die at once
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(60)
    steps_before = max(_audit(tmp_path / "audit-driver")[0])
    assert steps_before < m["step"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"step {m['step']}, epoch 2" in done.stdout
    _same_samples(got, _audit(tmp_path / "audit-driver"))
    found = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                               filter_string="tags.mlflow.runName = 'corrupt2-driver'")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    rid = found[0].info.run_id
    assert _metric(rd, rid, "train/resumed_from_step")[-1].value >= 5
    assert _metric(rd, rid, "train/skipped_samples")[-1].value == want_skipped
    _no_scratch_left(scratch, "corrupt2-driver")


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        frontier += kids
    return out

