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
