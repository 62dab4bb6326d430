"""CLISC part 1 stages (issue 13): the pure array operations on hand-made inputs (fast), then the reduced
pipeline end to end on a real local Ray cluster (slow): slice_labels -> slice_classifier -> cam -> amda ->
slice_classifier -> cam -> clisc_eval, a second call reusing every stage, the same stages with every `*_seg` file
deleted giving identical outputs, and bad cases named.

    .venv/bin/python -m pytest -q tests/test_clisc_stages.py -m "not slow"   # the array operations: seconds
    .venv/bin/python -m pytest -q tests/test_clisc_stages.py                 # + the pipeline
"""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from medvl.data.clisc import amda_mask, binarize_cam, box_2d, clean_mask, smooth_labels  # noqa: E402
from medvl.pipelines import PipelineError  # noqa: E402


def test_smoothing_majority_vote_on_a_hand_made_sequence():
    seq = [0, 0, 1, 0, 0, -1, 1, 1, 0, 1, 1, -1, -1, 0]
    # window 1: each labelled slice votes with its labelled neighbours (itself included); -1 never votes
    assert smooth_labels(seq, 1).tolist() == [0, 0, 0, 0, 0, -1, 1, 1, 1, 1, 1, -1, -1, 0]
    # index 4: neighbours {0 (3), 0 (4)} -> 0; index 6: {1 (6), 1 (7)} (5 is unlabelled) -> 1;
    # index 13: only itself labelled (11, 12 dropped) -> keeps 0
    assert smooth_labels(seq, 0).tolist() == seq
    # ties keep the slice's own label: ends of [1, 0, 1, 0] see one vote each way
    assert smooth_labels([1, 0, 1, 0], 1).tolist() == [1, 1, 0, 0]
    # a wider window flips an isolated positive run of 2 inside 6 negatives
    assert smooth_labels([0, 0, 0, 1, 1, 0, 0, 0], 3).tolist() == [0] * 8
    with pytest.raises(ValueError):
        smooth_labels(seq, -1)


def _blobs() -> np.ndarray:
    cam = np.full((12, 12, 6), 0.05, np.float32)   # weak activation everywhere
    cam[2:6, 2:6, 1:5] = 0.9                        # 64 voxels: the largest component
    cam[8:11, 1:4, 1:4] = 0.85                      # 27 voxels: survives the 3x3x3 opening, not the LCC
    cam[9:11, 9:11, 2:4] = 0.8                      # 8 voxels: removed by the opening
    return cam


def test_cam_binarisation_opening_and_largest_component_on_a_hand_made_volume():
    cam = _blobs()
    raw = binarize_cam(cam, "otsu")
    assert raw.sum() == 64 + 27 + 8 and not raw[0, 0, 0]  # Otsu splits weak from strong activation
    big = np.zeros_like(raw)
    big[2:6, 2:6, 1:5] = True
    np.testing.assert_array_equal(clean_mask(raw, opening=1, largest=True), big)
    opened = clean_mask(raw, opening=1, largest=False)
    assert opened.sum() == 64 + 27 and not opened[9:11, 9:11, 2:4].any()
    assert clean_mask(raw, opening=0, largest=False).sum() == 99
    # a fraction of the maximum: > 0.9 * 0.9 = 0.81 keeps the 0.9 and 0.85 blobs
    assert binarize_cam(cam, "fraction", 0.9).sum() == 64 + 27
    # no activation at all (a positive slice whose CAM is zero): nothing, never an error
    empty = binarize_cam(np.zeros((4, 4, 3)), "otsu")
    assert not empty.any() and not clean_mask(empty).any()
    assert box_2d(big[:, :, 2]) == (2, 2, 6, 6) and box_2d(empty[:, :, 0]) is None
    with pytest.raises(ValueError, match="otsu"):
        binarize_cam(cam, "mean")


def test_amda_masks_the_top_of_the_cam_in_the_box_and_bright_pixels_without_a_box():
    img = np.arange(48, dtype=np.float32).reshape(6, 8)
    cam = np.zeros((6, 8), np.float32)
    cam[1:5, 2:6] = np.arange(16).reshape(4, 4) / 15.0
    cam[0, 0] = 1.0                                   # strong CAM outside the box: never masked
    m = amda_mask(img, cam, (1, 2, 5, 6), mask_ratio=0.8)
    # inside the box, CAM > 0 + 0.8 * (1 - 0): 13/15, 14/15, 15/15 = the last three of the box's bottom row
    assert sorted(zip(*np.nonzero(m))) == [(4, 3), (4, 4), (4, 5)]
    assert amda_mask(img, cam, (1, 2, 5, 6), mask_ratio=0.5).sum() == 8  # 8/15 .. 15/15
    # no box (a negative slice): the brightest pixels, above 0 + 0.8 * 47 = 37.6
    neg = amda_mask(img, None, None, intensity_ratio=0.8)
    assert neg.sum() == 10 and neg[img > 37.6].all()
    assert amda_mask(img, None, None, intensity_ratio=0.5).sum() == 24
    # a flat CAM in the box or a flat image: nothing to single out
    assert not amda_mask(img, np.ones((6, 8)), (0, 0, 6, 8)).any()
    assert not amda_mask(np.ones((6, 8)), None, None).any()


# --------------------------------------------------------------------------- the reduced pipeline (real Ray)

def test_slice_classifier_step_under_cpu_bf16_autocast():
    """The step under CPU bf16 autocast (the GPU AMP path's dtypes) is finite, near fp32, with fp32 gradients.
    (Accumulation does not equal the full batch for this method: the ResNet's BatchNorm normalises each
    micro-batch with its own statistics, as in any BN network.)"""
    import sys

    import torch
    sys.path.insert(0, os.path.dirname(__file__))
    from stepcheck import assert_bf16_autocast_step
    data = {"method": "slice_classifier", "data": {"corpus": "x", "batch_size": 4}, "model": {"name": "test-vit-micro"},
            "optim": {"warmup_steps": 0, "grad_clip": None},
            "slice_classifier": {"channels": [8, 8, 16, 16], "stem_width": 8, "image_size": 32}}
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(4, 3, 32, 32, generator=g), "label": torch.tensor([0, 1, 1, 0])}
    assert_bf16_autocast_step(data, batch)


from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_GT_STAGES = ("labels", "classifier", "cam", "amda")  # the AMDA retraining is the same code again


@pytest.fixture(scope="module")
def clisc_data(tmp_path_factory):
    """4 pretraining phantoms (a CLIP corpus, captions from their masks) and 5 disjoint CLISC phantoms."""
    from medvl.data.ingest_brain import ingest_brain_slices
    from medvl.data.phantom import make_phantoms
    d = tmp_path_factory.mktemp("clisc")
    make_phantoms(d / "pre", cases=4, seed=0, start=1000)
    ingest_brain_slices(str(d / "pre"), str(d / "pre-corpus"), size=64, val_fraction=0.25, seed=0)
    make_phantoms(d / "cases", cases=5, seed=0, start=0)
    return d


def _stages(d: Path, cases: Path, clip: dict) -> dict:
    small = {"train": {"epochs": 1, "num_workers": 1, "log_every": 5, "ckpt_every": 1000},
             "slice_classifier": {"image_size": 64}, "data": {"batch_size": 32}}
    return {
        **clip,
        "labels": {"kind": "slice_labels", "cases": str(cases), "split_fractions": [0.6, 0.4, 0.0],
                   "batch_size": 32, **({"inputs": {"model": "clip"}} if "clip" in clip else {})},
        "classifier": {"kind": "train", "inputs": {"data.corpus": "labels/corpus"},
                       "base": str(ROOT / "jobs" / "clisc_classifier.yaml"), **small},
        "cam": {"kind": "cam", "inputs": {"classifier": "classifier", "slices": "labels"}, "layer": "layer2"},
        "amda": {"kind": "amda", "inputs": {"slices": "labels", "cam": "cam"}},
        "classifier_amda": {"kind": "train", "inputs": {"data.corpus": "amda/corpus"},
                            "base": str(ROOT / "jobs" / "clisc_classifier.yaml"), **small},
        "cam_amda": {"kind": "cam", "inputs": {"classifier": "classifier_amda", "slices": "labels"},
                     "layer": "layer2"},
    }


def _clip_stage(d: Path) -> dict:
    return {"clip": {"kind": "train", "base": str(ROOT / "jobs" / "clisc_clip_pretrain.yaml"),
                     "data": {"corpus": str(d / "pre-corpus"), "batch_size": 32},
                     "train": {"epochs": 2, "num_workers": 1, "cpus_per_worker": 1, "ckpt_every": 1000},
                     "eval": {"every_epoch": False}, "track": {"log_model": False}}}


def _where(outcome) -> dict[str, Path]:
    return {r["stage"]: Path(r["location"]) for r in outcome.table}


@pytest.fixture(scope="module")
def first_run(clisc_data, ray_local, tmp_path_factory):
    from medvl.pipelines import load_pipeline, run_pipeline
    d = clisc_data
    root = tmp_path_factory.mktemp("runs1")
    os.environ["MEDVL_RUN_ROOT"] = str(root)
    stages = _stages(d, d / "cases", _clip_stage(d))
    stages["eval"] = {"kind": "clisc_eval", "inputs": {"slices": "labels", "cam": "cam", "cam_amda": "cam_amda"},
                      "cases": str(d / "cases"), "split": "val"}
    data = {"name": "clisc-test", "track": {"experiment": "clisc-test",
                                            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}, "stages": stages}
    p = load_pipeline(data=data)
    out = run_pipeline(p, say=lambda s: None)
    again = run_pipeline(load_pipeline(data=data), say=lambda s: None)
    return p, out, again, data


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reduced_pipeline_end_to_end_reused_on_a_second_call(first_run, clisc_data):
    import nibabel as nib
    import pyarrow.parquet as pq
    _, out, again, _ = first_run
    m = out.metrics
    print("\n[measured] reduced CLISC pipeline: " + ", ".join(
        f"{k}={v:.3g}" for k, v in sorted(m.items()) if k.startswith(("eval/", "labels/", "cam", "amda/"))))
    print(f"[measured] reduced CLISC pipeline wall-clock {out.wall_s:.0f} s (second call {again.wall_s:.0f} s)")
    # 1-epoch classifiers on 3 training cases: the CAM is not asserted to beat Otsu here (it would be flaky);
    # the full phantom run in the README measures that
    print(f"[measured] reduced CLISC pipeline, val: CAM Dice {m['eval/cam/dice']:.3f} -> {m['eval/amda/dice']:.3f} "
          f"after AMDA, Otsu-on-FLAIR {m['eval/otsu/dice']:.3f}")
    assert {r["action"] for r in out.table} == {"built"}
    assert {r["action"] for r in again.table} == {"reused"}
    where = _where(out)
    assert m["labels/slices"] > 100 and m["labels/cases"] == 5
    # every slice has a CLIP label or is dropped; the corpus holds exactly the labelled ones
    t = pq.read_table(where["labels"] / "labels.parquet").to_pandas()
    assert len(t) == m["labels/slices"] and (t["label"] >= 0).sum() == m["labels/labelled"]
    assert set(t["split"]) <= {"train", "val"}
    assert t.groupby("case_id")["split"].nunique().max() == 1
    # CAM volumes on the original grid with the FLAIR's affine; masks binary
    cid = sorted(t["case_id"].unique())[0]
    flair = nib.load(str(clisc_data / "cases" / cid / f"{cid}_flair.nii.gz"))
    cam = nib.load(str(where["cam"] / "cams" / f"{cid}_cam.nii.gz"))
    assert cam.shape == flair.shape and np.allclose(cam.affine, flair.affine)
    assert set(np.unique(np.asarray(nib.load(str(where["cam"] / "masks" / f"{cid}_mask.nii.gz")).dataobj))) <= {0, 1}
    assert m["cam/slices"] == m["labels/slices"]
    # AMDA added one masked copy per training slice
    assert m["amda/rows"] == m["labels/labelled"] + m["amda/masked_box"] + m["amda/masked_intensity"]
    for k in ("eval/label/accuracy", "eval/cam/dice", "eval/amda/dice", "eval/cam/box_iou", "eval/otsu/dice"):
        assert 0.0 <= m[k] <= 1.0, k
    pics = sorted(p.name for p in (where["eval"] / "pictures").iterdir())
    assert "label_confusion.png" in pics and len(pics) >= 2
    # MLflow: a run per stage nested under the pipeline's; the evaluation's pictures are artifacts of its run
    from mlflow.tracking import MlflowClient
    client = MlflowClient(out.tracking_uri)
    kids = {r.info.run_name.split("-")[0]: r for r in client.search_runs(
        [out.experiment_id], f"tags.`mlflow.parentRunId` = '{out.run_id}'")}
    assert {"labels", "classifier", "cam", "amda", "classifier_amda", "cam_amda", "eval"} <= set(kids)
    logged = {a.path for a in client.list_artifacts(kids["eval"].info.run_id, "pictures")}
    assert "pictures/label_confusion.png" in logged and len(logged) == len(pics)
    assert kids["eval"].data.metrics["label/accuracy"] == m["eval/label/accuracy"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_without_ground_truth_files_the_label_cam_amda_outputs_are_identical(first_run, clisc_data, tmp_path):
    """Every *_seg file of the cases removed, the label / classifier / CAM / AMDA stages rebuilt into a fresh store
    (with the same CLIP): identical outputs. The evaluation stage, which needs them, names the case."""
    import shutil

    import pyarrow.parquet as pq

    from medvl.data.corpus import iter_rows, shard_paths
    from medvl.pipelines import load_pipeline, run_pipeline
    _, out, _, _ = first_run
    where = _where(out)
    cases = tmp_path / "cases"
    shutil.copytree(clisc_data / "cases", cases)
    segs = list(cases.glob("*/*_seg.nii*"))
    assert len(segs) == 5
    for s in segs:
        s.unlink()
    os.environ["MEDVL_RUN_ROOT"] = str(tmp_path / "runs2")
    stages = {k: v for k, v in _stages(clisc_data, cases, {}).items() if k in NO_GT_STAGES}
    stages["labels"]["clip_model"] = str(where["clip"])
    data = {"name": "clisc-nogt", "cache": {"root": str(tmp_path / "store2")},
            "track": first_run[3]["track"], "stages": stages}  # the same MLflow store (no second DB set-up)
    out2 = run_pipeline(load_pipeline(data=data), say=lambda s: None)
    w2 = _where(out2)
    assert {r["action"] for r in out2.table} == {"built"} and set(w2) == set(NO_GT_STAGES)
    a = pq.read_table(where["labels"] / "labels.parquet").to_pandas()
    b = pq.read_table(w2["labels"] / "labels.parquet").to_pandas()
    assert a[["case_id", "z", "split", "clip_label", "confident", "label"]].equals(
        b[["case_id", "z", "split", "clip_label", "confident", "label"]])
    np.testing.assert_allclose(a["p_tumour"], b["p_tumour"], atol=1e-6)
    for stage in ("cam",):
        pa_, pb_ = (pq.read_table(w / "slices.parquet").to_pandas() for w in (where[stage], w2[stage]))
        assert pa_[["case_id", "z", "pred"]].equals(pb_[["case_id", "z", "pred"]]), stage
        assert pa_["box"].map(list).tolist() == pb_["box"].map(list).tolist(), stage
        for f in sorted((where[stage] / "cropped").iterdir()):
            x, y = np.load(f), np.load(w2[stage] / "cropped" / f.name)
            np.testing.assert_array_equal(x["mask"], y["mask"])
            np.testing.assert_allclose(x["cam"], y["cam"], atol=1e-5)
    ids = [lambda w: sorted((r["sample_id"], bytes(r["image"])) for r in iter_rows(shard_paths(w / "corpus", None)))]
    assert ids[0](where["amda"]) == ids[0](w2["amda"])
    # evaluation needs the ground truth: it says which case lacks it
    from medvl.data.volumes import VolumeError
    # a CLIP pretrained on any of the cases it would label is refused, naming one
    from medvl.config import load_recipe
    from medvl.pipelines.kinds.clisc import _check_disjoint
    clip_recipe = load_recipe(data={"data": {"corpus": str(clisc_data / "pre-corpus")}})
    _check_disjoint(clip_recipe, {"Phantom_s0_0000"})
    with pytest.raises(PipelineError, match=r"trained on 1 of the cases it would label \(e.g. Phantom_s0_1001"):
        _check_disjoint(clip_recipe, {"Phantom_s0_0000", "Phantom_s0_1001"})
    stages["eval"] = {"kind": "clisc_eval", "inputs": {"slices": "labels", "cam": "cam"}, "cases": str(cases)}
    with pytest.raises(Exception, match=r"case Phantom_s0_000\d: no segmentation file"):
        run_pipeline(load_pipeline(data=data), say=lambda s: None)
    assert VolumeError


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_cases_are_named_or_counted(first_run, clisc_data, tmp_path):
    import shutil

    from medvl.data.volumes import save_nifti
    from medvl.pipelines import load_pipeline, run_pipeline
    _, out, _, _ = first_run
    clip = str(_where(out)["clip"])
    cases = tmp_path / "cases"
    shutil.copytree(clisc_data / "cases" / "Phantom_s0_0000", cases / "Phantom_s0_0000")
    save_nifti(np.zeros((8, 8, 8), np.float32), np.eye(4), cases / "Empty_001" / "Empty_001_flair.nii.gz")
    os.environ["MEDVL_RUN_ROOT"] = str(tmp_path / "runs")

    def labels(**kw):
        data = {"name": "bad", "track": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                "stages": {"labels": {"kind": "slice_labels", "cases": str(cases), "clip_model": clip, **kw}}}
        return run_pipeline(load_pipeline(data=data), say=lambda s: None)
    with pytest.raises(Exception, match=r"case Empty_001: FLAIR .* is all zero"):
        labels()
    assert labels(skip_bad_cases=True).metrics["labels/cases_skipped"] == 1
    (cases / "NoFlair_002").mkdir()
    save_nifti(np.ones((8, 8, 8), np.float32), np.eye(4), cases / "NoFlair_002" / "NoFlair_002_t1.nii.gz")
    with pytest.raises(Exception, match=r"case NoFlair_002: no FLAIR file"):
        labels(skip_bad_cases=True)


def _classifier_variant(src: Path, dst: Path, zero_weights: bool) -> Path:
    """A copy of a trained classifier stage output whose head calls every slice positive (bias +10); with
    `zero_weights` the head ignores the features, so the class score has no gradient: no CAM activation."""
    import shutil

    from medvl.train import checkpoint as ck
    dst.mkdir(parents=True)
    shutil.copy(src / "recipe.yaml", dst / "recipe.yaml")
    state = ck.load_checkpoint(src / "model")
    state["model"]["head.bias"] = state["model"]["head.bias"].new_tensor([-10.0, 10.0])
    if zero_weights:
        state["model"]["head.weight"].zero_()
    ck.write_checkpoint(dst / "model", state, {"step": state.get("step"), "epoch": state.get("epoch")})
    return dst


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cam_and_amda_on_positive_slices_and_counted_no_activation_skips(first_run, tmp_path):
    """The CAM and AMDA stage code on slices the classifier calls positive (the reduced pipeline's tiny CLIP may
    label none), run in-process: CAM volumes, Otsu + opening + largest component, boxes, box-driven masking; and a
    positive slice without any CAM activation is skipped and counted, never an error."""
    import io

    import nibabel as nib
    import pyarrow.parquet as pq
    from PIL import Image

    from medvl.data.corpus import iter_rows, shard_paths
    from medvl.pipelines.kinds.clisc import AmdaConfig, AmdaStage, CamConfig, CamStage, to_image_slice
    from medvl.pipelines.stage import StageContext
    _, out, _, _ = first_run
    where = _where(out)

    def ctx(name: str, **inputs) -> StageContext:
        (tmp_path / name).mkdir()
        return StageContext(stage=name, kind=name, key="k", build_id="b", out=tmp_path / name, inputs=inputs)
    pos = _classifier_variant(where["classifier"], tmp_path / "pos-clf", zero_weights=False)
    m = CamStage("cam", CamConfig()).run(ctx("cam", classifier=pos, slices=where["labels"]))
    assert m["positive_slices"] == m["slices"] > 100 and m["skipped_no_activation"] < m["slices"]
    assert m["cases_with_mask"] == 5 and m["boxes"] > 0
    rows = pq.read_table(tmp_path / "cam" / "slices.parquet").to_pylist()
    for cid in {r["case_id"] for r in rows}:
        crop = np.load(tmp_path / "cam" / "cropped" / f"{cid}.npz")
        assert crop["cam"].max() > 0 and crop["mask"].any()
        # one 3D component, inside the activated CAM; the NIfTI holds the same mask on the original grid
        from skimage.measure import label
        assert label(crop["mask"], connectivity=3).max() == 1 and (crop["cam"][crop["mask"]] > 0).all()
        assert np.asarray(nib.load(str(tmp_path / "cam" / "masks" / f"{cid}_mask.nii.gz")).dataobj).sum() \
            == crop["mask"].sum()
        for r in rows:  # each slice's box is its mask's bounding box
            if r["case_id"] == cid and r["box"][0] >= 0:
                r0, c0, r1, c1 = r["box"]
                sl = to_image_slice(crop["mask"][:, :, r["z"]])
                assert sl[r0:r1, c0:c1].any() and sl.sum() == sl[r0:r1, c0:c1].sum()
    a = AmdaStage("amda", AmdaConfig()).run(ctx("amda", slices=where["labels"], cam=tmp_path / "cam"))
    assert a["masked_box"] > 0
    boxes = {(r["case_id"], r["z"]): r["box"] for r in rows}
    for r in iter_rows(shard_paths(tmp_path / "amda" / "corpus", None)):
        sid = str(r["sample_id"])
        if not sid.endswith(":amda"):
            continue
        cid, z = sid.split(":")[0], int(sid.split(":")[1])
        box = boxes[(cid, z)]
        if box[0] < 0:
            continue
        img = np.asarray(Image.open(io.BytesIO(bytes(r["image"]))))
        outside = np.ones(img.shape, bool)
        outside[box[0]:box[2], box[1]:box[3]] = False
        assert (img[outside] > 0).sum() > 0  # masking stays inside the box: the brain outside it is untouched
    # the head ignores the features: every slice positive, no CAM anywhere -> all counted, no mask, no error
    flat = _classifier_variant(where["classifier"], tmp_path / "flat-clf", zero_weights=True)
    m2 = CamStage("cam", CamConfig()).run(ctx("cam2", classifier=flat, slices=where["labels"]))
    assert m2["positive_slices"] == m2["skipped_no_activation"] == m2["slices"]
    assert m2["cases_with_mask"] == 0 and m2["boxes"] == 0
