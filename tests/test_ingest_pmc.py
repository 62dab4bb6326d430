"""Figure-caption ingest (`medvl ingest pmc-oa | roco | webdataset`), MedMNIST `.npz` reading and transfer, and the
PMC-OA-format plumbing run (ingest -> PMC-CLIP training on Ray -> retrieval eval), on files the tests write from
real images and text that installed packages ship (see tests/pmc_fixtures.py)."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from medvl.data.corpus import CorpusError, iter_rows, load_manifest, shard_paths
from pmc_fixtures import real_images, write_medmnist, write_pmc_oa, write_webdataset

MODEL = ["--model", "test-vit-micro"]  # its 16-token context: every real caption here is longer (counted)


def _rows(corpus, split=None):
    return list(iter_rows(shard_paths(corpus, split)))


def _rejects(corpus):
    return [json.loads(x) for x in (Path(corpus) / "rejects.jsonl").read_text().splitlines()]


def test_pmc_oa_jsonl_zip_rejects_bad_rows_with_reasons(tmp_path, capsys):
    from medvl.data.ingest import main
    jp, zp = write_pmc_oa(tmp_path / "src", n_per_source=4)
    out = tmp_path / "corpus"
    assert main(["pmc-oa", str(jp), "--images", str(zp), "--out", str(out), "--workers", "0",
                 "--min-alignment-score", "0.6", *MODEL]) == 0
    rej = _rejects(out)
    by_row = {r["row"]: r for r in rej}
    assert sorted(by_row) == [17, 18, 19, 20]  # the four bad lines after 16 good ones
    assert by_row[17]["field"] == "image" and "PMC9999_Fig1_1.jpg" in by_row[17]["reason"] \
        and "not in archive" in by_row[17]["reason"] and str(zp) in by_row[17]["reason"]
    assert by_row[18] == {"file": str(jp), "row": 18, "field": "caption", "reason": "empty caption"}
    assert by_row[19]["field"] == "caption" and "no letters or digits" in by_row[19]["reason"]
    assert by_row[20]["field"] == "row" and "invalid JSON" in by_row[20]["reason"]
    stats = json.loads((out / "ingest_stats.json").read_text())
    # scores cycle 0.50..0.95 by row: rows with score < 0.6 (2 of every 10) are filtered, not rejected
    scores = [json.loads(x).get("alignment_score") for x in jp.read_text().splitlines()[:16]]
    n_low = sum(s < 0.6 for s in scores)
    assert stats["filtered"] == n_low and stats["rejected"] == 4 and stats["accepted"] == 16 - n_low
    assert stats["truncated_captions"] == stats["accepted"] and stats["context_length"] == 16  # counted, kept
    rows = _rows(out)
    assert len(rows) == 16 - n_low and all(r["image"] and r["study_id"].startswith("PMC") for r in rows)
    assert "rows/s" in capsys.readouterr().out
    # the member was found inside the archive's sub-folder, bytes equal
    with zipfile.ZipFile(zp) as z:
        assert rows[0]["image"] == z.read(f"caption_subfigures/{rows[0]['sample_id']}")


def test_pmc_oa_store_uri_reads_zip_members_in_place_and_file_splits(tmp_path):
    from medvl.data.decode import open_image
    from medvl.data.ingest_pmc import ingest_pmc_oa
    jp, zp = write_pmc_oa(tmp_path / "src", n_per_source=4, bad_rows=False, scores=False)
    lines = jp.read_text().splitlines()
    (tmp_path / "src" / "train.jsonl").write_text("\n".join(lines[:12]) + "\n")  # the older per-split files
    (tmp_path / "src" / "valid.jsonl").write_text("\n".join(lines[12:]) + "\n")
    m = ingest_pmc_oa([str(tmp_path / "src" / "train.jsonl"), str(tmp_path / "src" / "valid.jsonl")], str(zp),
                      str(tmp_path / "c"), store="uri", workers=0, model=None)
    assert m.splits == {"train": 12, "val": 4}
    row = _rows(tmp_path / "c", "val")[0]
    assert row["image"] is None and row["image_uri"].startswith("zip://caption_subfigures/") \
        and row["image_uri"].endswith(f"::{zp.resolve()}")
    assert open_image(row).size == (48, 48)  # read from the archive in place, nothing extracted
    assert not any(p.suffix == ".jpg" for p in tmp_path.rglob("*"))


@pytest.mark.timeout(300)
def test_parallel_ingest_on_ray_equals_in_process(ray_local, tmp_path, capsys):
    from medvl.data.ingest_pmc import ingest_pmc_oa
    jp, zp = write_pmc_oa(tmp_path / "src", n_per_source=6)
    a = ingest_pmc_oa([str(jp)], str(zp), str(tmp_path / "a"), workers=0, chunk_size=5, model="test-vit-micro")
    b = ingest_pmc_oa([str(jp)], str(zp), str(tmp_path / "b"), workers=2, chunk_size=5, model="test-vit-micro")
    assert "2 Ray workers" in capsys.readouterr().out
    assert a.splits == b.splits and _rejects(tmp_path / "a") == _rejects(tmp_path / "b")
    assert [r["sample_id"] for r in _rows(tmp_path / "a")] == [r["sample_id"] for r in _rows(tmp_path / "b")]
    assert json.loads((tmp_path / "b" / "ingest_stats.json").read_text())["workers"] == 2


def test_roco_layout_and_captions_csv(tmp_path):
    from medvl.data.ingest_pmc import ingest_roco
    items = real_images(3)
    root = tmp_path / "roco-dataset" / "data"
    k = 0
    for split, sub in (("train", "radiology"), ("train", "non-radiology"), ("validation", "radiology")):
        d = root / split / sub
        (d / "images").mkdir(parents=True)
        lines = []
        for _ in range(3):
            name, data, cap = items[k]
            k += 1
            rid = f"ROCO_{k:05d}"
            (d / "images" / f"{rid}.jpg").write_bytes(data)
            lines.append(f"{rid}\t {cap}")
        lines.append("ROCO_99999\t a caption whose image was never fetched")
        (d / "captions.txt").write_text("\n".join(lines) + "\n")
    m = ingest_roco(str(root), str(tmp_path / "c"), workers=0, model=None)
    assert m.splits == {"train": 6, "val": 3}
    rej = _rejects(tmp_path / "c")
    assert len(rej) == 3 and all(r["field"] == "image" and "ROCO_99999" in r["reason"] for r in rej)
    assert {r["row"] for r in rej} == {4}
    m = ingest_roco(str(root), str(tmp_path / "r"), subset="radiology", workers=0, model=None)
    assert m.splits == {"train": 3, "val": 3}
    # a ROCOv2-style CSV (ID, Caption) with its image folder
    csv = tmp_path / "v2" / "train_captions.csv"
    (tmp_path / "v2" / "imgs").mkdir(parents=True)
    rows = ["ID,Caption"]
    for i, (name, data, cap) in enumerate(items[:4]):
        (tmp_path / "v2" / "imgs" / f"ROCOv2_{i}.jpg").write_bytes(data)
        rows.append(f'ROCOv2_{i},"{cap}"')
    csv.write_text("\n".join(rows) + "\n")
    m = ingest_roco(str(csv), str(tmp_path / "c2"), images=str(tmp_path / "v2" / "imgs"), split="train",
                    workers=0, model=None)
    assert m.splits == {"train": 4}
    with pytest.raises(CorpusError, match="Caption"):
        ingest_roco(str(csv), str(tmp_path / "c3"), images=str(tmp_path / "v2" / "imgs"), caption_col="Caption2",
                    workers=0, model=None)


def test_webdataset_shard_conversion(tmp_path):
    from medvl.data.ingest import main
    write_webdataset(tmp_path / "wds" / "shard-00000.tar", n_per_source=2)
    write_webdataset(tmp_path / "wds" / "shard-00001.tar", n_per_source=1, broken=False)
    out = tmp_path / "c"
    assert main(["webdataset", str(tmp_path / "wds" / "shard-{00000..00001}.tar"), "--out", str(out),
                 "--split", "train", "--workers", "0", "--model", "none"]) == 0
    rows = _rows(out)
    assert len(rows) == 8 + 4 and load_manifest(out).splits == {"train": 12}
    first = next(r for r in rows if r["sample_id"] == "sample00000")
    assert first["texts"][0].startswith("Immunohistochemical")  # caption from its .json member
    rej = {r["reason"].split(" (")[0]: r for r in _rejects(out)}
    assert "sample 'noimage' has no image member" in rej and rej["sample 'noimage' has no image member"]["field"] == "row"
    assert any("unreadable image" in r["reason"] for r in _rejects(out))
    with pytest.raises(CorpusError, match="shard not found"):
        main(["webdataset", str(tmp_path / "wds" / "missing.tar"), "--out", str(tmp_path / "x"), "--workers", "0"])


# --------------------------------------------------------------------------- MedMNIST


def test_medmnist_reader_exact_layout_and_bad_files(tmp_path):
    from medvl.eval.medmnist import load_medmnist, to_model_images
    p = write_medmnist(tmp_path / "pneumoniamnist.npz")
    d = load_medmnist(p)
    assert d.name == "pneumoniamnist" and not d.multilabel and d.num_classes == 2
    assert d.images["train"].shape == (60, 28, 28) and d.labels["test"].shape == (30, 1)
    assert d.targets("val").shape == (20,)
    x = to_model_images(d.images["test"][:3], 32)
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.uint8
    rgb = load_medmnist(write_medmnist(tmp_path / "dermamnist.npz", channels=3, classes=4))
    assert rgb.images["train"].shape[-1] == 3 and rgb.num_classes == 4
    arrays = dict(np.load(p))
    del arrays["val_labels"]
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(CorpusError, match=r"broken\.npz: missing key 'val_labels'"):
        load_medmnist(tmp_path / "broken.npz")
    arrays = dict(np.load(p))
    arrays["train_images"] = arrays["train_images"].astype(np.float32)
    np.savez(tmp_path / "float.npz", **arrays)
    with pytest.raises(CorpusError, match=r"float\.npz: key 'train_images' must be uint8"):
        load_medmnist(tmp_path / "float.npz")
    arrays = dict(np.load(p))
    arrays["test_labels"] = arrays["test_labels"][:-1]
    np.savez(tmp_path / "count.npz", **arrays)
    with pytest.raises(CorpusError, match=r"count\.npz: key 'test_labels' has 29 rows but 'test_images' has 30"):
        load_medmnist(tmp_path / "count.npz")
    with pytest.raises(CorpusError, match="not found"):
        load_medmnist(tmp_path / "nope.npz")


def test_medmnist_transfer_probe_and_finetune(tmp_path):
    import torch

    from medvl.config import load_recipe
    from medvl.eval.medmnist import load_medmnist
    from medvl.eval.transfer import classification_scores, medmnist_transfer
    from medvl.methods import resolve_method
    from medvl.models.factory import image_norm
    torch.manual_seed(0)
    r = load_recipe(data={"method": "pmc_clip", "data": {"corpus": "x", "batch_size": 8},
                          "model": {"name": "test-vit-micro"}, "train": {"num_workers": 1},
                          "pmc_clip": {"fusion_layers": 1}})
    model = resolve_method(r).build_model()
    d = load_medmnist(write_medmnist(tmp_path / "breastmnist.npz"))
    m = medmnist_transfer(model, d, 32, image_norm(r.model), epochs=3, lr=1e-3, batch_size=16)
    assert set(m) == {f"transfer/breastmnist/{k}" for k in ("probe_accuracy", "probe_auc", "finetune_accuracy",
                                                              "finetune_auc", "finetune_best_epoch",
                                                              "finetune_val_auc")}
    assert m["transfer/breastmnist/probe_auc"] > 0.75  # two tissue regions: separable even from random features
    assert 0.5 < m["transfer/breastmnist/finetune_auc"] <= 1.0
    # the scoring conventions on hand-checkable cases
    y = np.array([0, 1, 1, 0])
    s = classification_scores(y, np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]), False)
    assert s["accuracy"] == 0.5 and s["auc"] == 0.75
    ml = classification_scores(np.array([[1, 0], [0, 1]]), np.array([[0.7, 0.2], [0.4, 0.9]]), True)
    assert ml == {"accuracy": 1.0, "auc": 1.0}


# --------------------------------------------------------------------------- the plumbing run


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pmc_oa_plumbing_ingest_train_retrieval(ray_local, run_root, tmp_path):
    """PMC-OA-format JSONL + images.zip -> `medvl ingest pmc-oa --store uri` (members read in place) -> PMC-CLIP
    on Ray Train with a WordPiece (MiniLM) text tower -> retrieval R@k and mean/median rank on held-out pairs."""
    import yaml

    from medvl.cli import main
    from medvl.models.pretrained import minilm_path
    jp, zp = write_pmc_oa(tmp_path / "src", n_per_source=10, bad_rows=True)
    corpus = tmp_path / "pmcoa"
    assert main(["ingest", "pmc-oa", str(jp), "--images", str(zp), "--out", str(corpus), "--store", "uri",
                 "--val-fraction", "0.25", "--workers", "0", "--model", "none"]) == 0
    assert load_manifest(corpus).splits["val"] >= 4
    cfg = tmp_path / "models"
    cfg.mkdir()
    (cfg / "tiny-vit-minilm.json").write_text(json.dumps({
        "embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"hf_model_name": minilm_path(), "hf_tokenizer_name": minilm_path(), "hf_model_pretrained": True,
                     "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": 32}}))
    recipe = {"name": "pmc-plumbing", "method": "pmc_clip",
              "data": {"corpus": str(corpus), "batch_size": 8, "decode_tasks": 1},
              "model": {"name": "tiny-vit-minilm", "config_dir": str(cfg), "lock_text": True},
              "train": {"epochs": 1, "max_steps": 3, "num_workers": 1, "log_every": 1, "ckpt_every": 100},
              "optim": {"warmup_steps": 1}, "eval": {"max_rows": 64},
              "pmc_clip": {"fusion_layers": 1, "mask_ratio": 0.3}, "track": {"experiment": "tests-pmc", "log_model": False}}
    path = tmp_path / "pmc.yaml"
    path.write_text(yaml.safe_dump(recipe))
    from medvl.config import load_recipe
    from medvl.train.launcher import run_training
    job, metrics = run_training(load_recipe(path))
    assert metrics["step"] == 3
    for k in ("val/i2t_r1", "val/t2i_r10", "val/i2t_mean_rank", "val/t2i_median_rank", "val/mlm_accuracy",
              "val/mlm_accuracy_no_image", "train/itc", "train/mlm"):
        assert k in metrics and np.isfinite(metrics[k]), k
    n_val = load_manifest(corpus).splits["val"]
    assert 1.0 <= metrics["val/i2t_mean_rank"] <= n_val and 0.0 <= metrics["val/i2t_r1"] <= 1.0
