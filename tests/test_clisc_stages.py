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
