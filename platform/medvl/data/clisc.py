"""CLISC's array operations, pure functions of their inputs (no ground truth anywhere): slice-label smoothing along
the slice axis, CAM binarisation + 3D clean-up, per-slice boxes, and AMDA's adaptive masking.

Used by the CLISC stage kinds (`medvl.pipelines.kinds.clisc`); unit-tested on hand-made arrays in
tests/test_clisc_stages.py:

    .venv/bin/python -m pytest -q tests/test_clisc_stages.py -m "not slow"
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

Box = tuple[int, int, int, int]
"""(row0, col0, row1, col1) of a 2D image, half-open: rows row0..row1-1, columns col0..col1-1."""


def smooth_labels(labels: Sequence[int], window: int) -> np.ndarray:
    """Majority vote along the slice axis. `labels` holds one entry per consecutive slice: 0/1, or -1 for a slice
    without a label (dropped under the confidence threshold). Each labelled slice takes the majority label of the
    labelled slices within `window` positions on either side (itself included); a tie keeps its own label.
    Unlabelled slices stay -1 (they do not vote). `window=0` returns the labels unchanged."""
    lab = np.asarray(labels, dtype=np.int64)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    out = lab.copy()
    if window == 0:
        return out
    for i in np.nonzero(lab >= 0)[0]:
        near = lab[max(0, i - window): i + window + 1]
        near = near[near >= 0]
        pos, neg = int((near == 1).sum()), int((near == 0).sum())
        out[i] = 1 if pos > neg else 0 if neg > pos else lab[i]
    return out


def binarize_cam(cam: np.ndarray, method: str = "otsu", fraction: float = 0.5) -> np.ndarray:
    """A CAM (any shape, values >= 0, 0 = no activation) made binary without ground truth: Otsu's threshold over
    its activated (> 0) values (`otsu`), or `fraction` of its maximum (`fraction`). An all-zero CAM gives an
    all-False mask."""
    cam = np.asarray(cam, dtype=np.float32)
    act = cam[cam > 0]
    if act.size == 0:
        return np.zeros(cam.shape, bool)
    if method == "otsu":
        from skimage.filters import threshold_otsu
        th = float(threshold_otsu(act)) if np.ptp(act) > 0 else 0.0
    elif method == "fraction":
        th = fraction * float(act.max())
    else:
        raise ValueError(f"binarisation method must be 'otsu' or 'fraction', got {method!r}")
    return cam > th


def clean_mask(mask: np.ndarray, opening: int = 1, largest: bool = True) -> np.ndarray:
    """3D morphological opening (a 3x3x3 cube, `opening` iterations; 0 = none), then only the largest connected
    component (26-connectivity) when `largest`."""
    from scipy.ndimage import binary_opening
    from skimage.measure import label
    m = np.asarray(mask, bool)
    if opening > 0 and m.any():
        m = binary_opening(m, structure=np.ones((3,) * m.ndim, bool), iterations=opening)
    if largest and m.any():
        lab = label(m, connectivity=m.ndim)
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        m = lab == int(sizes.argmax())
    return m


def box_2d(mask2d: np.ndarray) -> Optional[Box]:
    """The bounding box of a 2D mask's True pixels (None when it has none)."""
    rows, cols = np.nonzero(mask2d)
    if rows.size == 0:
        return None
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def amda_mask(image: np.ndarray, cam: Optional[np.ndarray], box: Optional[Box], mask_ratio: float = 0.8,
              intensity_ratio: float = 0.8) -> np.ndarray:
    """The pixels AMDA masks (True) in one 2D slice (CLISC reference, step 1-3).

    With a CAM box: inside the box, the pixels whose CAM is above min + `mask_ratio` * (max - min) of the CAM
    inside the box (the most discriminative part, so the retrained classifier must look at the rest of the
    lesion). Without a box (negative slices, or positives whose CAM left no box): the pixels above
    min + `intensity_ratio` * (max - min) of the slice's own intensity range (the brightest tissue, which a
    classifier could otherwise take for a lesion)."""
    img = np.asarray(image, dtype=np.float32)
    out = np.zeros(img.shape, bool)
    if box is not None and cam is not None:
        r0, c0, r1, c1 = box
        win = np.asarray(cam, dtype=np.float32)[r0:r1, c0:c1]
        lo, hi = float(win.min()), float(win.max())
        if hi > lo:
            out[r0:r1, c0:c1] = win > lo + mask_ratio * (hi - lo)
        return out
    lo, hi = float(img.min()), float(img.max())
    if hi > lo:
        out = img > lo + intensity_ratio * (hi - lo)
    return out


__all__ = ["smooth_labels", "binarize_cam", "clean_mask", "box_2d", "amda_mask"]
