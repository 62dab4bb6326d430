"""CLISC data: BraTS-style volumes (nibabel), preprocessing, splits, and the synthetic MNI152 phantoms.

    .venv/bin/python -m pytest tests/test_clisc_data.py
"""
from __future__ import annotations

import numpy as np
import pytest

from medvl.data.volumes import (CaseFiles, VolumeError, axial_slices, find_cases, load_case, preprocess,
                                save_nifti, split_cases, uncrop)


def _affine(spacing=(1.5, 2.0, 2.5), origin=(-90.0, -120.0, -60.0)):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _case(tmp_path, name="Case_001", shape=(20, 24, 16), seg=True, seg_shape=None, zero=False):
    rng = np.random.default_rng(0)
    img = np.zeros(shape, np.float32)
    if not zero:
        img[4:16, 5:20, 3:13] = rng.uniform(100, 200, size=(12, 15, 10))
    d = tmp_path / name
    save_nifti(img, _affine(), d / f"{name}_flair.nii.gz")
    save_nifti(np.zeros(shape, np.float32), _affine(), d / f"{name}_t1.nii.gz")  # other modalities: ignored
    if seg:
        s = np.zeros(seg_shape or shape, np.uint8)
        if seg_shape is None:
            s[8:11, 9:12, 6:9] = 2
            s[9, 10, 7] = 4
        save_nifti(s, _affine(), d / f"{name}_seg.nii.gz")
    return img


def test_nifti_round_trip_keeps_affine_spacing_and_crop_maps_back(tmp_path):
    img = _case(tmp_path)
    (case,) = find_cases(tmp_path)
    assert case.case_id == "Case_001" and case.flair.name == "Case_001_flair.nii.gz" and case.seg is not None
    v = load_case(case, with_mask=True)
    np.testing.assert_array_equal(v.image, img)
    np.testing.assert_allclose(v.affine, _affine())
    assert v.spacing == pytest.approx((1.5, 2.0, 2.5))
    assert set(np.unique(v.mask)) == {0, 1}  # BraTS labels > 0 -> whole tumour
    p = preprocess(v)
    assert p.image.shape == (12, 15, 10) and p.crop == ((4, 16), (5, 20), (3, 13))
    # the cropped grid's voxel (0,0,0) is the original's (4,5,3): same world position
    np.testing.assert_allclose(p.affine @ [0, 0, 0, 1], v.affine @ [4, 5, 3, 1])
    assert p.spacing == v.spacing
    assert abs(float(p.image[p.brain].mean())) < 1e-4 and float(p.image[p.brain].std()) == pytest.approx(1, abs=1e-3)
    assert p.mask.sum() == v.mask.sum()
    np.testing.assert_array_equal(uncrop(p, p.mask), v.mask)
    # saved and read back on the cropped grid
    out = save_nifti(p.image, p.affine, tmp_path / "x" / "pre.nii.gz")
    back = load_case(CaseFiles("x", out))
    np.testing.assert_allclose(back.affine, p.affine)
    np.testing.assert_allclose(back.image, p.image, rtol=1e-6)
    assert [z for z, _ in axial_slices(p)] == list(range(10))


def test_ground_truth_is_not_read_unless_asked(tmp_path):
    _case(tmp_path, seg_shape=(3, 3, 3))  # a broken seg file does not matter to the label-free path
    (case,) = find_cases(tmp_path)
    assert load_case(case).mask is None
    with pytest.raises(VolumeError, match=r"case Case_001: segmentation .*Case_001_seg.nii.gz has shape \(3, 3, 3\)"):
        load_case(case, with_mask=True)


def test_bad_cases_are_named(tmp_path):
    _case(tmp_path, "Empty_002", zero=True)
    (tmp_path / "NoFlair_003").mkdir()
    save_nifti(np.ones((4, 4, 4), np.float32), _affine(), tmp_path / "NoFlair_003" / "NoFlair_003_t1.nii.gz")
    with pytest.raises(VolumeError, match=r"case NoFlair_003: no FLAIR file"):
        find_cases(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "NoFlair_003")
    (case,) = find_cases(tmp_path)
    with pytest.raises(VolumeError, match=r"case Empty_002: FLAIR .* is all zero"):
        load_case(case)
    (tmp_path / "Bad_004").mkdir()
    (tmp_path / "Bad_004" / "Bad_004_flair.nii.gz").write_bytes(b"not a nifti")
    bad = [c for c in find_cases(tmp_path) if c.case_id == "Bad_004"][0]
    with pytest.raises(VolumeError, match=r"case Bad_004: cannot read FLAIR"):
        load_case(bad)


def test_reference_csv_layout(tmp_path):
    _case(tmp_path / "data", "BraTS20_Training_001")
    d = "data/BraTS20_Training_001"
    (tmp_path / "train.csv").write_text(f"image_pth,mask_pth\n{d}/BraTS20_Training_001_flair.nii.gz,"
                                        f"{d}/BraTS20_Training_001_seg.nii.gz\n")
    (case,) = find_cases(tmp_path / "train.csv")
    assert case.case_id == "BraTS20_Training_001" and load_case(case, with_mask=True).mask.sum() > 0
    (tmp_path / "bad.csv").write_text("image_pth,mask_pth\nmissing_flair.nii.gz,\n")
    with pytest.raises(VolumeError, match=r"case missing: .*bad.csv row 2: image_pth .* does not exist"):
        find_cases(tmp_path / "bad.csv")


def test_case_level_splits_are_seeded_disjoint_and_stable():
    ids = [f"c{i:03d}" for i in range(200)]
    s = split_cases(ids, seed=1)
    assert sorted(s["train"] + s["val"] + s["test"]) == ids
    assert 0.6 < len(s["train"]) / 200 < 0.8 and 0.1 < len(s["test"]) / 200 < 0.3
    assert split_cases(ids, seed=1) == s and split_cases(ids, seed=2) != s
    more = split_cases(ids + ["zzz"], seed=1)  # a new case never moves the old ones
    assert all(c in more[k] for k in s for c in s[k])


@pytest.mark.slow
def test_phantoms_are_seeded_lesions_inside_the_brain_and_not_threshold_segmentable(tmp_path):
    from medvl.data.phantom import make_case, make_phantoms
    from medvl.eval.segmentation import dice, otsu_baseline
    a1, s1, aff = make_case(3, seed=0)
    a2, s2, _ = make_case(3, seed=0)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(s1, s2)
    b, _, _ = make_case(4, seed=0)
    assert not np.array_equal(a1, b)
    files = make_phantoms(tmp_path / "ph", cases=4, seed=7)
    scores = []
    for f in files:
        v = load_case(f, with_mask=True)
        brain = v.image > 0
        assert v.mask.sum() > 0 and not (v.mask.astype(bool) & ~brain).any(), f"{f.case_id}: lesion outside brain"
        assert v.spacing == pytest.approx((2.0, 2.0, 2.0))
        p = preprocess(v)
        scores.append(dice(otsu_baseline(p.image, p.brain), p.mask))
    print(f"\n[measured] Otsu-on-FLAIR baseline Dice on 4 phantom cases: {np.round(scores, 3).tolist()}")
    assert max(scores) <= 0.5


def test_brain_slices_corpus_captions_by_lesion_and_splits_by_case(tmp_path):
    import io

    from PIL import Image

    from medvl.data.corpus import iter_rows, load_manifest, shard_paths
    from medvl.data.ingest_brain import NORMAL_PROMPT, TUMOUR_PROMPT, ingest_brain_slices
    for i in range(3):
        _case(tmp_path / "cases", f"Case_{i:03d}")
    m = ingest_brain_slices(str(tmp_path / "cases"), str(tmp_path / "corpus"), size=32, min_lesion_pixels=4,
                            min_brain_fraction=0.0, val_fraction=0.34, seed=0)
    assert load_manifest(tmp_path / "corpus").classnames == [NORMAL_PROMPT, TUMOUR_PROMPT]
    rows = list(iter_rows(shard_paths(tmp_path / "corpus", None)))
    # per case: 10 brain slices (z 3..12 of the original grid = 0..9 after the crop); the seg covers z 6..8 with
    # 9 pixels (z 7 also a label-4 voxel): 3 tumour slices, 7 normal
    assert m.rows() == len(rows) == 30
    by = {r["sample_id"]: r for r in rows}
    assert by["Case_000:004"]["texts"] == [TUMOUR_PROMPT] and dict(by["Case_000:004"]["labels"])["tumour"] == 1.0
    assert by["Case_000:000"]["texts"] == [NORMAL_PROMPT] and dict(by["Case_000:000"]["labels"])["tumour"] == 0.0
    assert sum(dict(r["labels"])["tumour"] for r in rows) == 9
    for case in ("Case_000", "Case_001", "Case_002"):
        assert len({r["split"] for r in rows if r["sample_id"].startswith(case)}) == 1  # never on both sides
    im = np.array(Image.open(io.BytesIO(by["Case_000:004"]["image"])))
    assert im.shape == (32, 32) and im.min() >= 1 and im.max() >= 240, (im.min(), im.max())  # brain: never black
    from medvl.data.ingest_brain import slice_png
    sl = np.zeros((8, 6), np.float32)
    sl[2:6, 1:5] = np.arange(16).reshape(4, 4) - 3.0  # z-scored values, negative ones included
    png = np.array(Image.open(io.BytesIO(slice_png(sl, 0, sl != 0))))
    assert png.shape == (6, 8) and png[0, 0] == 0 and png[(png > 0)].min() == 1 and png.max() == 255
    # a slice with fewer lesion pixels than the threshold has no trustworthy caption: rejected, named
    m2 = ingest_brain_slices(str(tmp_path / "cases"), str(tmp_path / "c2"), size=32, min_lesion_pixels=10,
                             min_brain_fraction=0.0)
    assert m2.rows() == 21 and m2.rejected == 9
    assert "ambiguous caption" in (tmp_path / "c2" / "rejects.jsonl").read_text()
