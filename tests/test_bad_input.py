"""Bad input: every case ends in a one-line error naming the file / row / key, or in a counted skip that MLflow
shows; none kills an epoch half-way or trains silently on bad data. Valid but unusual input (16-bit and palette
images, overlong captions) trains.

    .venv/bin/python -m pytest tests/test_bad_input.py -m "not slow"   # the unit-level cases, no training
    .venv/bin/python -m pytest tests/test_bad_input.py                 # + one real run over a corpus with bad rows

Duplicated sample ids are rejected at ingest (the first row with the id is kept, the others go to rejects.jsonl):
training seeds each row's augmentation from its id and evaluation matches rows by id. Corpora written by other
tools are not scanned for duplicates at training time (that would read every id of every shard before each run).
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medvl.config import ConfigError, ModelConfig, load_recipe
from medvl.data.corpus import (SCHEMA, CorpusError, Manifest, ShardWriter, iter_rows, load_manifest, shard_paths,
                               validate_corpus, write_manifest)
from medvl.data.decode import decode_rows, open_image
from medvl.methods.clip import ClipDecoder

MODEL = asdict(ModelConfig(name="test-vit-micro"))  # 32 px, context length 16


def _png(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    b = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(b, format="PNG", **save)
    return b.getvalue()


GOOD = _png((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8))
GRADIENT16 = np.tile(np.linspace(0, 4095, 32).astype(np.uint16), (32, 1))  # 12-bit data in a 16-bit PNG


def _palette_png(transparency: bool = False) -> bytes:
    idx = np.zeros((32, 32), np.uint8)
    idx[:16, 16:], idx[16:, :16], idx[16:, 16:] = 1, 2, 3
    im = Image.fromarray(idx, "P")
    im.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200, 90, 90, 90] + [0] * (252 * 3))
    b = io.BytesIO()
    im.save(b, format="PNG", **({"transparency": 3} if transparency else {}))
    return b.getvalue()


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    cols = {}
    for c in ("sample_id", "image", "image_uri", "texts"):
        a = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            a[i] = r.get(c)
        cols[c] = a
    return cols


def _decode(rows: list[dict], train: bool = False):
    bad: list = []
    out = decode_rows(ClipDecoder(MODEL, train=train), _batch(rows), seed=0, epoch=0, on_skip=bad.extend)
    return out, bad


def _row(sid: str, **kw) -> dict:
    return {"sample_id": sid, "image": GOOD, "image_uri": None, "texts": ["a photo of a thing."], **kw}


def _nan_tiff() -> bytes:
    f = np.ones((32, 32), np.float32)
    f[3, 4] = np.nan
    b = io.BytesIO()
    Image.fromarray(f, mode="F").save(b, format="TIFF")
    return b.getvalue()


# --------------------------------------------------------------------------- rows the decoder skips (and counts)


@pytest.mark.parametrize("case, change, reason", [
    ("corrupt-bytes", {"image": b"\x00not an image at all"},
     "ValueError: not an image format PIL reads (20 bytes starting b'\\x00not an ')"),
    ("truncated-png", {"image": GOOD[:60]}, "OSError: image file is truncated"),
    ("zero-byte-image", {"image": b""}, "ValueError: image is empty (0 bytes)"),
    ("no-image-at-all", {"image": None}, "ValueError: row has neither image bytes nor image_uri"),
    ("missing-image-file", {"image": None, "image_uri": "/nonexistent/medvl/x.png"},
     "FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/medvl/x.png'"),
    ("nan-pixels", {"image": _nan_tiff()}, "ValueError: image (mode F) has NaN or infinite pixel values"),
    ("missing-text", {"texts": None}, "ValueError: no text: texts is missing"),
    ("empty-text-list", {"texts": []}, "ValueError: no text: texts is an empty list"),
    ("blank-texts", {"texts": ["", "   "]}, "ValueError: no text: every entry of texts is empty"),
])
def test_a_bad_row_is_skipped_with_its_id_and_reason(case, change, reason):
    out, bad = _decode([_row("ok-1"), _row(f"bad-{case}", **change), _row("ok-2")])
    assert out is not None and out["image"].shape == (2, 3, 32, 32)  # the batch goes on without the bad row
    assert bad == [(f"bad-{case}", reason)]


# --------------------------------------------------------------------------- valid but unusual rows train


def test_16bit_grayscale_is_rescaled_not_clipped():
    out, bad = _decode([_row("x16", image=_png(GRADIENT16))])
    assert bad == []
    img = out["image"][0]
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    row = img[0, 16]  # the horizontal ramp survives (PIL's convert would make 31 of 32 columns 255)
    assert (np.diff(row.astype(int)) >= 0).all() and (row == 255).mean() < 0.1


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_images_keep_their_colours(transparency, recwarn):
    img = np.asarray(open_image({"image": _palette_png(transparency)}))
    assert [tuple(img[y, x]) for y, x in ((0, 0), (0, 31), (31, 0), (31, 31))] == \
        [(200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90)]
    out, bad = _decode([_row("p", image=_palette_png(transparency))])
    assert bad == [] and out["image"].shape == (1, 3, 32, 32)
    assert not [w for w in recwarn if "Palette" in str(w.message)]


@pytest.mark.parametrize("mode", ["LA", "RGBA", "CMYK", "1", "I"])
def test_other_pil_modes_decode(mode):
    im = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)).convert(mode)
    b = io.BytesIO()
    im.save(b, format="TIFF" if mode in ("CMYK", "I") else "PNG")
    out, bad = _decode([_row(mode, image=b.getvalue())])
    assert bad == [] and out["image"].dtype == np.uint8


def test_overlong_text_is_truncated_to_the_context():
    out, bad = _decode([_row("long", texts=["word " * 5000])])
    assert bad == [] and out["text"].shape == (1, 16)
    from medvl.models.factory import tokenizer
    eot = tokenizer(ModelConfig(name="test-vit-micro"))("x")[0].max().item()  # open_clip ends with <end_of_text>
    assert out["text"][0, -1] == eot


# --------------------------------------------------------------------------- ingest: rejects.jsonl names file/row/field


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    from medvl.data.ingest import ingest_table
    d = tmp_path_factory.mktemp("ingest")
    (d / "good.png").write_bytes(GOOD)
    (d / "corrupt.png").write_bytes(b"\x89PNG but not really")
    (d / "empty.png").write_bytes(b"")
    lines = [
        {"image": "good.png", "text": "a first image", "id": "a", "Effusion": 1},       # row 1: kept
        {"image": "corrupt.png", "text": "x", "id": "b"},                                # 2: corrupt image
        {"image": "missing.png", "text": "x", "id": "c"},                                # 3: no such file
        {"image": "empty.png", "text": "x", "id": "d"},                                  # 4: zero bytes
        {"image": "good.png", "id": "e"},                                                # 5: no text
        {"image": "good.png", "text": 5, "id": "f"},                                     # 6: wrong type
        {"image": "good.png", "text": "x", "id": "g", "Effusion": "yes"},                # 7: non-numeric label
        {"image": "good.png", "text": "again", "id": "a"},                               # 8: duplicate id
    ]
    src = d / "rows.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")              # 9: invalid JSON
    ingest_table(str(src), str(d / "corpus"), image_key="image", text_keys=["text"], label_keys=["Effusion"],
                 id_key="id", shard_size=16)
    rejects = [json.loads(x) for x in (d / "corpus" / "rejects.jsonl").read_text().splitlines()]
    return src, d, {r["row"]: r for r in rejects}


@pytest.mark.parametrize("row, field, reason", [
    (2, "image", "unreadable image (UnidentifiedImageError: cannot identify image file"),
    (3, "image", "cannot read {d}/missing.png (No such file or directory)"),
    (4, "image", "empty image file"),
    (5, "text", "missing text column"),
    (6, "texts", "expected text, got int 5"),
    (7, "labels.Effusion", "expected a number, got 'yes'"),
    (8, "sample_id", "duplicate sample_id 'a' (first seen at row 1; that row is kept)"),
    (9, "row", "invalid JSON"),
])
def test_ingest_rejects_name_file_row_field_and_reason(ingested, row, field, reason):
    src, d, rejects = ingested
    r = rejects[row]
    assert r["file"] == str(src) and r["field"] == field and r["reason"].startswith(reason.format(d=d)), r


def test_ingest_keeps_the_good_row_and_counts_the_rest(ingested):
    _, d, rejects = ingested
    m = load_manifest(d / "corpus")
    assert m.rows() == 1 and m.rejected == len(rejects) == 8
    assert [r["sample_id"] for r in iter_rows(shard_paths(d / "corpus", None))] == ["a"]


# --------------------------------------------------------------------------- corpora: schema, shards, Parquet


def _corpus(tmp: Path, tables: dict[str, pa.Table], row_group_size: int = 64) -> Path:
    (tmp / "shards").mkdir(parents=True)
    shards = []
    for name, t in tables.items():
        pq.write_table(t, tmp / "shards" / name, row_group_size=row_group_size)
        shards.append({"path": f"shards/{name}", "split": "train", "rows": t.num_rows})
    from medvl.data.corpus import Shard
    write_manifest(tmp, Manifest(source="test", shards=[Shard(**s) for s in shards]))
    return tmp


def _table(n: int, start: int = 0, **over) -> pa.Table:
    cols = {"sample_id": [f"s{i}" for i in range(start, start + n)], "image": [GOOD] * n, "image_uri": [None] * n,
            "texts": [["a caption"]] * n, "study_id": [None] * n, "view": [None] * n, "labels": [[]] * n,
            "split": ["train"] * n, "patient_id": [None] * n, "other_images": [None] * n}
    cols.update(over)
    return pa.Table.from_pydict(cols, schema=SCHEMA) if not over else pa.table(cols)


def test_a_column_of_the_wrong_type_names_shard_and_field(tmp_path):
    c = _corpus(tmp_path, {"train-00000.parquet": _table(4, texts=["just a string"] * 4)})
    with pytest.raises(CorpusError) as e:
        validate_corpus(c, "train")
    assert str(e.value) == (f"{c}/shards/train-00000.parquet: field 'texts' has type string, expected "
                            f"list<item: string>")


def test_a_shard_with_another_schema_names_the_missing_field(tmp_path):
    t = _table(4).drop_columns(["sample_id"])
    c = _corpus(tmp_path, {"train-00000.parquet": t})
    with pytest.raises(CorpusError, match=r"train-00000\.parquet: required field 'sample_id' is missing \(has: image, "):
        validate_corpus(c, "train")


def test_a_missing_shard_is_named_with_its_manifest(tmp_path):
    c = _corpus(tmp_path, {"train-00000.parquet": _table(4), "train-00001.parquet": _table(4, 4)})
    (c / "shards" / "train-00001.parquet").unlink()
    with pytest.raises(CorpusError) as e:
        validate_corpus(c, "train")
    assert str(e.value) == f"{c}/shards/train-00001.parquet: shard listed in {c}/manifest.json does not exist"


def test_a_corrupted_parquet_footer_is_named(tmp_path):
    c = _corpus(tmp_path, {"train-00000.parquet": _table(4)})
    p = c / "shards" / "train-00000.parquet"
    data = bytearray(p.read_bytes())
    data[-12:-4] = b"\xff" * 8  # the footer length / metadata end
    p.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=rf"^{p}: not a readable Parquet file \("):
        validate_corpus(c, "train")


def _corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the page header of one row group's image column (the footer stays valid)."""
    md = pq.ParquetFile(path).metadata
    col = [md.row_group(group).column(j).path_in_schema for j in range(md.num_columns)].index("image")
    off = md.row_group(group).column(col).data_page_offset
    data = bytearray(path.read_bytes())
    data[off:off + 24] = b"\xde\xad\xbe\xef" * 6
    path.write_bytes(bytes(data))


def test_a_corrupt_row_group_is_skipped_and_counted_not_fatal(tmp_path):
    c = _corpus(tmp_path, {"train-00000.parquet": _table(24)}, row_group_size=8)
    p = c / "shards" / "train-00000.parquet"
    _corrupt_row_group(p, 1)
    validate_corpus(c, "train")  # the footer is fine: only reading that row group fails
    bad: list = []
    ids = [r["sample_id"] for r in iter_rows([str(p)], on_bad=lambda n, why: bad.append((n, why)))]
    assert ids == [f"s{i}" for i in list(range(8)) + list(range(16, 24))]
    assert len(bad) == 1 and bad[0][0] == 8 and bad[0][1].startswith(f"{p}: row group 1 (8 rows) is unreadable (")
    with pytest.raises(CorpusError, match=r"row group 1 \(8 rows\) is unreadable"):
        list(iter_rows([str(p)]))  # without a handler: an error naming shard and row group


def test_manifest_missing_or_not_json(tmp_path):
    with pytest.raises(CorpusError, match=rf"^{tmp_path}/manifest.json: corpus manifest not found \(run `medvl ingest`"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(CorpusError, match=rf"^{tmp_path}/manifest.json: not valid JSON"):
        load_manifest(tmp_path)


def test_an_empty_corpus_fails_before_anything_starts(tmp_path, monkeypatch):
    from medvl.data.ingest import ingest_folder
    from medvl.train.launcher import prepare_job
    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "notes.txt").write_text("no images here")
    m = ingest_folder(str(tmp_path / "images"), str(tmp_path / "corpus"))
    assert m.rows() == 0
    with pytest.raises(CorpusError, match=r"no shards for split 'train' \(splits: \[\]\)"):
        validate_corpus(tmp_path / "corpus", "train")
    monkeypatch.setenv("MEDVL_RUN_ROOT", str(tmp_path / "runs"))
    recipe = load_recipe(data={"data": {"corpus": str(tmp_path / "corpus")}, "track": {"outage_wait_s": 0}})
    with pytest.raises(CorpusError) as e:
        prepare_job(recipe)
    assert str(e.value).startswith(f"{tmp_path / 'corpus'}: split 'train' has no rows (an empty corpus")
    assert not (tmp_path / "runs" / "mlflow.db").exists(), "an MLflow run was started for an empty corpus"


# --------------------------------------------------------------------------- recipes and sweeps


BASE = {"data": {"corpus": "x"}}


@pytest.mark.parametrize("data, overrides, message", [
    ({"optim": {"lrr": 0.1}}, None, r"unknown key optim\.lrr \(valid keys: "),
    ({"bogus": 1}, None, r"unknown key bogus \(valid keys: "),
    ({"data": {"corpus": "x", "batch_size": "big"}}, None, r"data\.batch_size: expected an integer, got 'big'"),
    ({"train": {"use_gpu": "yes"}}, None, r"train\.use_gpu: expected true/false, got 'yes'"),
    ({"data": {"corpus": "x", "batch_size": 0}}, None, r"^data\.batch_size must be > 0$"),
    ({"optim": {"lr": -0.001}}, None, r"^optim\.lr must be > 0$"),
    ({"train": {"epochs": 0}}, None, r"^train\.epochs must be >= 1$"),
    ({}, ["train.num_wrkers=2"], r"unknown key train\.num_wrkers"),
    ({}, ["data.batch_size=[1]"], r"data\.batch_size: expected an integer, got \[1\]"),
    ({"track": {"tracking_uri": "https://u:hunter22@mlflow.example.org"}}, None,
     r"^track\.tracking_uri: holds a credential; credentials come from the environment only"),
])
def test_bad_recipes_name_the_key(data, overrides, message):
    raw = {**BASE, **data}
    with pytest.raises(ConfigError, match=message):
        load_recipe(data=raw, overrides=overrides)


def test_a_sweep_over_a_missing_key_fails_before_any_trial(digits_corpus, tmp_path):
    from medvl.tune.spec import SweepError, load_sweep, validate_sweep
    (tmp_path / "base.yaml").write_text(json.dumps({"name": "b", "data": {"corpus": digits_corpus}}))
    (tmp_path / "sweep.yaml").write_text(json.dumps({
        "base": "base.yaml", "search_space": {"optim.lrr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        "metric": "train/loss", "mode": "min", "num_samples": 2, "scheduler": {"kind": "none"}}))
    with pytest.raises(SweepError, match=r"search_space\.optim\.lrr: unknown key optim\.lrr"):
        validate_sweep(load_sweep(tmp_path / "sweep.yaml"))


@pytest.mark.timeout(120)
def test_more_workers_than_the_cluster_has_fails_fast(ray_local, digits_corpus, run_root):
    from medvl.train.launcher import run_training
    recipe = load_recipe(data={"name": "too-big", "data": {"corpus": digits_corpus, "batch_size": 64},
                               "train": {"num_workers": 8}})
    t0 = time.time()
    with pytest.raises(ConfigError) as e:
        run_training(recipe)
    assert time.time() - t0 < 30
    assert str(e.value).startswith("train.num_workers=8 x train.cpus_per_worker=1 needs 8 CPUs, the Ray cluster has 4")
    assert "cannot grow" in str(e.value)
    assert not (Path(run_root) / "jobs" / "too-big").exists(), "nothing may start for a job that cannot run"


# --------------------------------------------------------------------------- one real run over a bad corpus


def _mixed_corpus(src: str, dst: Path) -> tuple[list[str], list[str], int]:
    """400 real digits rows plus valid odd images (16-bit, palette) and bad rows, and one shard with a corrupt row
    group (8 rows): returns (bad ids, odd valid ids, rows lost with the row group)."""
    w = ShardWriter(dst, shard_size=1000)
    bad, odd = [], []
    for i, row in enumerate(iter_rows(shard_paths(src, "train"))):
        if i >= 400:
            break
        row["labels"] = dict(row["labels"] or [])
        if i % 50 == 7:
            row["image"], bad = row["image"][:50], bad + [row["sample_id"]]       # truncated
        elif i % 50 == 19:
            row["image"], bad = b"", bad + [row["sample_id"]]                     # zero bytes
        elif i % 50 == 31:
            row["texts"], bad = [], bad + [row["sample_id"]]                      # no text
        elif i % 50 == 11:
            row["image"], odd = _png(GRADIENT16), odd + [row["sample_id"]]        # 16-bit: valid
        elif i % 50 == 23:
            row["image"], odd = _palette_png(True), odd + [row["sample_id"]]      # palette: valid
        w.add(row)
    shards = w.close()
    extra = _table(24, start=10_000)  # a second shard whose middle row group is corrupt
    pq.write_table(extra, dst / "shards" / "train-extra.parquet", row_group_size=8)
    _corrupt_row_group(dst / "shards" / "train-extra.parquet", 1)
    from medvl.data.corpus import Shard
    write_manifest(dst, Manifest(source="bad-input test", shards=shards + [Shard("shards/train-extra.parquet",
                                                                                  "train", 24)]))
    return bad, odd, 8


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_over_bad_rows_completes_and_mlflow_counts_every_skip(ray_local, digits_corpus, run_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from medvl.track import runs
    from medvl.train.launcher import run_training
    bad, odd, lost = _mixed_corpus(digits_corpus, tmp_path / "mixed")
    assert len(bad) == 24 and len(odd) == 16
    recipe = load_recipe(data={
        "name": "bad-input", "data": {"corpus": str(tmp_path / "mixed"), "batch_size": 32, "val_split": None,
                                      "shuffle_buffer": 0},
        "model": {"name": "test-vit-micro"},
        "train": {"epochs": 1, "num_workers": 1, "log_every": 2, "ckpt_every": 100},
        "track": {"experiment": "bad-input", "log_model": False}})
    job, metrics = run_training(recipe)
    # 424 rows listed (13 batches planned), 24 bad + 8 in the corrupt row group skipped: 392 rows, 12 full batches;
    # the epoch still ends properly (evaluated, checkpointed, reported) one step early
    assert job.total_steps == 13 and metrics["step"] == 12 and metrics["epoch"] == 1
    client = MlflowClient(runs.tracking_uri(recipe))
    skipped = client.get_metric_history(job.mlflow_run_id, "train/skipped_samples")
    assert max(m.value for m in skipped) == len(bad) + lost == 32
    run = client.get_run(job.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["medvl.skipped_samples"] == "32"
    report = json.loads(Path(client.download_artifacts(job.mlflow_run_id, "data/skipped_samples.json",
                                                       str(tmp_path))).read_text())
    assert report["count"] == 32
    reasons = {r["sample_id"]: r["reason"] for r in report["first"]}
    assert set(reasons) - {f"{tmp_path / 'mixed' / 'shards' / 'train-extra.parquet'}#row-group"} <= set(bad)
    assert not set(reasons) & set(odd), "a valid 16-bit or palette image was skipped"
    assert any("image file is truncated" in r for r in reasons.values())
    import ray
    left = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("medvl-skips-")]
    assert left == [], f"skip-counter actors survived the run: {left}"
