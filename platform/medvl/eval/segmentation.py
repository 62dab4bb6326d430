"""Segmentation metrics and reference baselines for CLISC (evaluation only: ground truth never enters a stage).

Dice and HD95 come from MONAI (`compute_dice`, `compute_hausdorff_distance` with the voxel spacing, so HD95 is in
mm). `otsu_baseline` is the plain intensity reference row: Otsu's threshold (scikit-image) over the FLAIR voxels
inside the brain.
"""
from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary volumes (MONAI `compute_dice`); 1.0 when both are empty."""
    import torch
    from monai.metrics import compute_dice
    p = torch.as_tensor(np.asarray(pred) > 0, dtype=torch.float32)[None, None]
    t = torch.as_tensor(np.asarray(truth) > 0, dtype=torch.float32)[None, None]
    if not p.any() and not t.any():
        return 1.0
    return float(compute_dice(p, t, include_background=True, ignore_empty=False)[0, 0])


def otsu_baseline(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Voxels inside the brain above Otsu's threshold of the brain's intensities (the intensity baseline)."""
    from skimage.filters import threshold_otsu
    th = threshold_otsu(image[brain])
    return (image > th) & brain


def hd95(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    """95th-percentile Hausdorff distance in mm (MONAI `compute_hausdorff_distance`, voxel `spacing`).

    Both empty: 0.0 (they agree). Exactly one empty: NaN, a FAILURE, never 0 (the CLISC reference's `hd95 = 0`
    for an empty prediction flatters it); `hd95_summary` counts these cases and says how its means treat them."""
    import torch
    from monai.metrics import compute_hausdorff_distance
    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("nan")
    pt = torch.as_tensor(p, dtype=torch.float32)[None, None]
    tt = torch.as_tensor(t, dtype=torch.float32)[None, None]
    d = compute_hausdorff_distance(pt, tt, include_background=True, percentile=95,
                                   spacing=[float(s) for s in spacing])
    return float(d[0, 0])


def hd95_summary(values: list[float], worst_mm: float) -> dict[str, float]:
    """Mean and std of per-case HD95 over the cases with a prediction, the number of failures (NaN: an empty
    prediction on a case with tumour, or a prediction on a case without), and the mean with each failure counted
    as `worst_mm` (e.g. the volume's diagonal in mm), so that a method that predicts nothing is not rewarded."""
    v = np.asarray(values, dtype=np.float64)
    ok = v[~np.isnan(v)]
    penalised = np.where(np.isnan(v), worst_mm, v)
    return {"hd95_mean": float(ok.mean()) if len(ok) else float("nan"),
            "hd95_std": float(ok.std()) if len(ok) else float("nan"),
            "hd95_failures": float(np.isnan(v).sum()),
            "hd95_mean_failures_as_worst": float(penalised.mean()) if len(v) else float("nan")}
