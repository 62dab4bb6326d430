"""CLIP-IT (`kind: pair`, `kind: subset`, `method: clip_it`): k-th neighbour pairing and its cutoff, the
distillation loss on a hand-computed case, no gradient into the frozen teacher, bad inputs (empty text corpus,
texts over the context, undecodable images, a checkpoint that does not fit), and on a real local Ray cluster a
pipeline pair -> distil whose `pair` stage is reused when only λ changes and whose exported MLflow model predicts
from images alone in a fresh process.

    .venv/bin/python -m pytest tests/test_clip_it.py -m "not slow"    # pure pieces, a few seconds
    .venv/bin/python -m pytest tests/test_clip_it.py                  # + the Ray pipeline (~2-3 min)
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from medvl.config import ConfigError  # noqa: E402
from medvl.pipelines.kinds.pair import kth_neighbour, read_texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- pairing


def test_kth_neighbour_and_cutoff():
    s = 1 / math.sqrt(2)
    txt = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [s, s, 0]], np.float32)
    img = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, -1]], np.float32)
    # cosines: img0 -> [1, 0, 0, .707]; img1 -> [.6, .8, 0, .990]; img2 -> [0, 0, -1, 0]
    idx, sim, ok = kth_neighbour(img, txt, k=1)
    assert idx.tolist() == [0, 3, 0] and ok.all()  # img2: three-way tie at 0 -> the lowest index
    np.testing.assert_allclose(sim, [1.0, 0.98995, 0.0], atol=1e-4)
    idx, sim, _ = kth_neighbour(img, txt, k=2)
    assert idx.tolist() == [3, 1, 1]
    np.testing.assert_allclose(sim, [s, 0.8, 0.0], atol=1e-4)
    idx, sim, _ = kth_neighbour(img, txt, k=4)
    assert idx.tolist() == [2, 2, 2]
    idx, sim, ok = kth_neighbour(img, txt, k=1, min_similarity=0.995)  # only img0 passes
    assert idx.tolist() == [0, -1, -1] and ok.tolist() == [True, False, False]
    np.testing.assert_allclose(sim[1], 0.98995, atol=1e-4)  # the similarity of a cut image is still reported
    with pytest.raises(ValueError, match="k=5: the text corpus has 4 distinct texts"):
        kth_neighbour(img, txt, k=5)


def test_read_texts_dedupes_and_names_bad_files(tmp_path):
    f = tmp_path / "reports.txt"
    f.write_text("no acute findings.\n\nno acute findings.\ncardiomegaly.\n")
    t = read_texts(str(f))
    assert t.texts == ["no acute findings.", "cardiomegaly."] and t.read == 3 and not t.has_labels
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match=r"texts: .*empty\.txt: the text corpus is empty"):
        read_texts(str(empty))
    with pytest.raises(ConfigError, match=r"texts: .*nope\.txt: text corpus not found"):
        read_texts(str(tmp_path / "nope.txt"))
    c = tmp_path / "t.csv"
    c.write_text("text,digit\na 3.,3\na 3.,3\nsmudge.,\nan eight.,8\n")
    t = read_texts(str(c), "text", "digit", classnames=[str(i) for i in range(10)])
    assert t.texts == ["a 3.", "smudge.", "an eight."] and t.labels == [3, None, 8] and t.has_labels
    with pytest.raises(ConfigError, match=r"texts_column: .*t\.csv has no column 'report' \(columns: text, digit\)"):
        read_texts(str(c), "report")
    bad = tmp_path / "bad.csv"
    bad.write_text("text,digit\na thing.,eleven\n")
    with pytest.raises(ConfigError, match=r"class 'eleven' is neither an index nor a class name"):
        read_texts(str(bad), "text", "digit", classnames=["0", "1"])


def test_texts_over_the_context_are_counted():
    from medvl.config import ModelConfig
    from medvl.models.factory import create_model, tokenizer
    from medvl.pipelines.kinds.pair import embed_texts
    cfg = ModelConfig(name="test-vit-micro")  # context length 16
    model = create_model(cfg).eval()
    tok = tokenizer(cfg)
    long = "the quick brown fox jumps over the lazy dog " * 4
    feats, truncated = embed_texts(model.encode_text, tok, ["a 3.", long, "an eight."], 2, "cpu")
    assert truncated == 1 and feats.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- the method


def test_distillation_loss_on_a_hand_computed_case():
    from medvl.methods.clip_it import distill_loss
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    t_hat = torch.tensor([[1.0, 0.0], [1.0, 1.0], [5.0, -3.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0], [2.0, 2.0], [1.0, 0.0]])
    has_text = torch.tensor([True, True, False])  # row 2 fell below the pairing cutoff: CE only
    out = distill_loss(logits, labels, t_hat, t, has_text, weight=0.5)
    ce = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1)) + math.log(2)) / 3  # one softmax, on logits
    kd = ((1 - 0.0) + (1 - 1.0)) / 2  # cos = 0 and 1 for the two rows with a text
    assert out["ce"].item() == pytest.approx(ce, abs=1e-6)
    assert out["kd"].item() == pytest.approx(kd, abs=1e-6)
    assert out["loss"].item() == pytest.approx(ce + 0.5 * kd, abs=1e-6)
    out["loss"].backward()
    assert t_hat.grad[2].abs().sum() == 0  # the row without a text gets no distillation gradient
    none = distill_loss(logits, labels, t_hat, t, torch.zeros(3, dtype=torch.bool), weight=1.0)
    assert none["kd"].item() == 0.0 and none["loss"].item() == pytest.approx(ce, abs=1e-6)


def make_teacher(root: Path, name: str = "test-vit-micro") -> Path:
    """A pair stage's `teacher/` directory: an open_clip model's weights + its architecture."""
    from safetensors.torch import save_file

    from medvl.config import ModelConfig
    from medvl.models.factory import create_model
    torch.manual_seed(0)
    m = create_model(ModelConfig(name=name))
    d = root / "teacher"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "model.safetensors"))
    (d / "teacher.json").write_text(json.dumps({"model": {"name": name}}))
    return d


def clip_it_recipe(corpus: str, teacher: Path, **section):
    from medvl.config import load_recipe
    return load_recipe(data={"name": "t", "method": "clip_it", "data": {"corpus": corpus, "batch_size": 8},
                             "model": {"name": "test-vit-micro"},
                             "clip_it": {"teacher": str(teacher), **section}})


def fake_batch(method, n: int = 6) -> dict:
    from medvl.config import ModelConfig
    from medvl.models.factory import tokenizer
    tok = tokenizer(ModelConfig(name="test-vit-micro"))
    b = {"image": torch.randint(0, 255, (n, 3, 32, 32), dtype=torch.uint8),
         "text": tok([f"a handwritten {i}." for i in range(n)]),
         "label": torch.arange(n) % 10, "has_text": torch.tensor([True] * (n - 1) + [False])}
    return method.prepare_batch(b, "cpu")


@pytest.mark.parametrize("section", [{}, {"fusion": "late", "kd_layers": 2}, {"lora_r": 4},
                                     {"backbone": "timm", "timm_model": "resnet18", "freeze_backbone": True}])
def test_no_gradient_reaches_the_frozen_text_encoder(tmp_path, digits_corpus, section):
    from medvl.methods import resolve_method
    method = resolve_method(clip_it_recipe(digits_corpus, make_teacher(tmp_path), **section))
    model = method.build_model()
    teacher = method.teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    out = method.forward(model, fake_batch(method))
    terms = method.loss(out)
    assert not out["t"].requires_grad and out["t"].grad_fn is None
    terms["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}  # not in the optimizer
    assert model.kd_head.parameters().__next__().grad.abs().sum() > 0  # the student's h_d does learn from t
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    if section.get("lora_r"):  # LoRA: the backbone's own weights frozen, only adapters (and heads) train
        trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    if section.get("freeze_backbone"):
        assert not any(p.requires_grad for p in model.backbone.parameters())
    if section.get("fusion") == "late":
        assert model.fuse.weight.grad is not None and model.text_head.weight.grad is not None


@pytest.mark.parametrize("section", [{}, {"fusion": "late", "kd_layers": 2}])
def test_clip_it_step_under_cpu_bf16_autocast(tmp_path, digits_corpus, section):
    """The GPU AMP path's dtypes on CPU: student, frozen teacher and distillation head under bf16 autocast."""
    from stepcheck import assert_bf16_autocast_step

    from medvl.methods import resolve_method
    recipe = clip_it_recipe(digits_corpus, make_teacher(tmp_path), **section)
    assert_bf16_autocast_step(lambda: resolve_method(recipe), fake_batch(resolve_method(recipe)))


def test_teacher_that_does_not_fit_is_named(tmp_path, digits_corpus):
    from medvl.methods import resolve_method
    teacher = make_teacher(tmp_path)
    (teacher / "teacher.json").write_text(json.dumps({"model": {"name": "digits-vit-tiny"}}))  # wrong arch
    method = resolve_method(clip_it_recipe(digits_corpus, teacher))
    with pytest.raises(ConfigError, match=r"clip_it\.teacher: model\.pretrained: .*model\.safetensors does not fit "
                                          r"digits-vit-tiny"):
        method.teacher()


# --------------------------------------------------------------------------- the pipeline on Ray


def small_corpus(digits_corpus: str, out: Path, n_train: int = 96, n_val: int = 48) -> Path:
    """Part of the digits (image-only: texts dropped) plus one train row whose image bytes are not an image."""
    from medvl.data.corpus import iter_rows, load_manifest, shard_paths
    from medvl.data.ingest import Ingestor
    m = load_manifest(digits_corpus)
    ing = Ingestor(out, source="test")
    for split, n in (("train", n_train), ("val", n_val)):
        for i, row in enumerate(iter_rows(shard_paths(digits_corpus, split))):
            if i >= n:
                break
            ing.add({**row, "labels": dict(row["labels"]), "texts": []})
    ing.add({"sample_id": "corrupt/0", "image": b"\x89PNG not really", "texts": [], "labels": {"digit": 3.0},
             "split": "train"})
    ing.finish(label_field=m.label_field, classnames=list(m.classnames))
    return out


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("MEDVL_RUN_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return root


def pipeline_file(tmp_path: Path, corpus: Path, checkpoint: Path, model_name: str = "test-vit-micro") -> Path:
    texts = tmp_path / "texts.csv"
    rows = [("text", "digit")] + [(f"a handwritten {d}.", d) for d in range(10)] + [
        ("a handwritten 3.", 3), ("a coffee stain.", ""),
        (" ".join(["a very long report that runs on"] * 6), "")]  # over the 16-token context: truncated
    texts.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump({"name": "clip-it-test", "stages": {
        "pair": {"kind": "pair", "corpus": str(corpus), "texts": str(texts), "texts_column": "text",
                 "texts_label_column": "digit", "checkpoint": str(checkpoint), "model_name": model_name,
                 "batch_size": 32, "actors": 1},
        "distill": {"kind": "train", "inputs": {"data.corpus": "pair/corpus", "clip_it.teacher": "pair/teacher"},
                    "method": "clip_it", "model": {"name": "test-vit-micro"},
                    "data": {"batch_size": 32, "decode_tasks": 1},
                    "train": {"epochs": 1, "num_workers": 1, "ckpt_every": 1000, "log_every": 1},
                    "eval": {"max_rows": 48},
                    "clip_it": {"distill_weight": 1.0}, "track": {"log_model": True}}}}, sort_keys=False))
    return p


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~3.5 min on an idle 2-core machine; the shared CI box can be far slower
def test_pair_then_distil_on_ray_reuse_and_image_only_export(tmp_path, env, digits_corpus, ray_local):
    from medvl.config import ModelConfig
    from medvl.models.factory import create_model
    from medvl.pipelines import load_pipeline, plan_pipeline, run_pipeline
    from medvl.pipelines.runner import StageFailed
    import pyarrow.parquet as pq

    corpus = small_corpus(digits_corpus, tmp_path / "images")
    torch.manual_seed(0)
    ckpt = tmp_path / "pairing.pt"
    torch.save(create_model(ModelConfig(name="test-vit-micro")).state_dict(), ckpt)
    path = pipeline_file(tmp_path, corpus, ckpt)

    # a checkpoint that does not fit the named model: a clear error naming both, before any pairing
    bad = load_pipeline(path, ["pair.model_name=digits-vit-tiny"])
    with pytest.raises((ConfigError, StageFailed), match=r"pairing\.pt does not fit model_name 'digits-vit-tiny'"):
        run_pipeline(bad, only=["pair"], say=lambda _: None)

    out = run_pipeline(load_pipeline(path), say=lambda _: None)
    m = {k.split("/", 1)[1]: v for k, v in out.metrics.items() if k.startswith("pair/")}
    where = {row["stage"]: Path(row["location"]) for row in out.table}
    assert m["skipped"] == 1.0  # the corrupt image: counted, and no row in the output
    assert m["rows"] == 96 + 48 and m["rows/train"] == 96
    assert m["texts"] == 12 and m["texts_input"] == 13 and m["texts_truncated"] == 1  # one duplicate
    assert m["below_cutoff"] == 0 and 0.0 <= m["accuracy"] <= 1.0
    pair_dir = where["pair"]
    pairs = pq.read_table(pair_dir / "pairs.parquet").to_pandas()
    assert "corrupt/0" not in set(pairs.sample_id) and len(pairs) == 144
    assert pairs.text_index.between(0, 11).all()

    # the actor pool's pairing = the nearest text by the pairing model's own features, recomputed in one process
    from dataclasses import asdict

    import torch.nn.functional as F

    from medvl.data.corpus import iter_rows, shard_paths
    from medvl.data.decode import normalize_images
    from medvl.methods.clip import ClipDecoder
    from medvl.models.factory import image_norm, tokenizer
    from medvl.pipelines.kinds.pair import embed_texts
    cfg = ModelConfig(name="test-vit-micro", pretrained=str(ckpt))
    model = create_model(cfg).eval()
    dec = ClipDecoder(asdict(cfg), train=False)
    dec.setup()
    rows = list(iter_rows(shard_paths(str(corpus), "val")))
    x = torch.stack([torch.from_numpy(dec.image(r)) for r in rows])
    with torch.no_grad():
        f = F.normalize(model.encode_image(normalize_images(x, *image_norm(cfg))), dim=-1).numpy()
    texts = [json.loads(x)["text"] for x in (pair_dir / "texts.jsonl").read_text().splitlines()]
    tf, _ = embed_texts(model.encode_text, tokenizer(cfg), texts, 32, "cpu")
    sims = f @ tf.T
    got = pairs.set_index("sample_id")
    for i, r in enumerate(rows):
        j = int(got.loc[r["sample_id"], "text_index"])
        assert sims[i, j] == pytest.approx(sims[i].max(), abs=1e-4)
        assert float(got.loc[r["sample_id"], "similarity"]) == pytest.approx(sims[i].max(), abs=1e-4)

    d = {k.split("/", 1)[1]: v for k, v in out.metrics.items() if k.startswith("distill/")}
    assert {"train/ce", "train/kd", "train/loss", "val/accuracy", "val/balanced_accuracy", "val/auroc"} <= set(d)

    # sweep-ready: only λ changes -> pair reused, distill rebuilt (dry run); k changes -> pair rebuilt
    plans = plan_pipeline(load_pipeline(path, ["distill.clip_it.distill_weight=0"]))
    assert plans["pair"].action == "reuse" and plans["distill"].action == "build"
    plans = plan_pipeline(load_pipeline(path, ["pair.k=2"]))
    assert plans["pair"].action == "build"

    # the exported model: images in, probabilities out, no text encoder inside, in a fresh process that imports
    # medvl from the model's own code copy (code_paths), not from this checkout
    from mlflow.tracking import MlflowClient
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run_id = json.loads((where["distill"] / "_medvl_stage.json").read_text())["mlflow"]["run_id"]
    local = Path(client.download_artifacts(run_id, "model", str(tmp_path / "dl")))
    from safetensors.torch import load_file
    weights = next(local.rglob("weights.safetensors"))
    keys = list(load_file(str(weights)))
    assert keys and not [k for k in keys if "token_embedding" in k or k.startswith("transformer.")]
    imgs = [r["image"] for r in rows[:5]]
    np.save(tmp_path / "imgs.npy", np.array(imgs, dtype=object), allow_pickle=True)
    code = ("import sys, numpy as np, pandas as pd, mlflow\n"
            f"m = mlflow.pyfunc.load_model({str(local)!r})\n"
            "import medvl\n"
            f"assert medvl.__file__.startswith({str(local)!r}), medvl.__file__  # the copy inside the model\n"
            f"imgs = np.load({str(tmp_path / 'imgs.npy')!r}, allow_pickle=True)\n"
            "p = m.predict(pd.DataFrame({'image': list(imgs)}))\n"
            "print('PROBS', p.shape, list(p.columns)[:2], float(p.sum(axis=1).min()), float(p.sum(axis=1).max()))\n"
            "print('SCHEMA', m.metadata.get_input_schema().input_names())\n")
    env_ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env_,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PROBS (5, 10) ['p_0', 'p_1']" in r.stdout
    line = [x for x in r.stdout.splitlines() if x.startswith("PROBS")][0].split()
    assert abs(float(line[-2]) - 1) < 1e-4 and abs(float(line[-1]) - 1) < 1e-4
    assert "SCHEMA ['image']" in r.stdout
