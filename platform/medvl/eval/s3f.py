"""S3F (CLISC's SAM-U-Net similarity filtering): which training cases the U-Net keeps for self-training.

For each training case the segmenter is re-prompted from the U-Net's prediction; the case's similarity is the Dice
of the two masks (`similarity`). `select` keeps cases above a threshold, or the top fraction by similarity (the
reference keeps the top 80%). `validity` is evaluation only: on data whose truth is known (the phantoms) it tells
whether the similarity ranks cases like their true Dice (Spearman's rank correlation) and the mean true Dice of the
kept and dropped cases. Nothing here reads ground truth except `validity`, which takes it as an argument.
"""
from __future__ import annotations

import math
from typing import Literal, Mapping, Optional

import numpy as np

COMPONENTS = ("largest", "most_probable", "all")


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks (`medvl.eval.segmentation.dice`): 1.0 when both are empty, 0.0 when one is."""
    from medvl.eval.segmentation import dice
    return dice(a, b)


def choose_component(mask: np.ndarray, prob: Optional[np.ndarray] = None,
                     component: Literal["largest", "most_probable", "all"] = "largest") -> np.ndarray:
    """The part of a U-Net's binary prediction that S3F prompts from (3D components, 26-connectivity).

    - `largest`: the largest connected component: the reference's choice (its post-processing before SAM).
    - `most_probable`: the component with the highest MEAN foreground probability `prob` (ties: the larger one).
      The mean, not the sum: every voxel of a component of `prob > 0.5` has p > 0.5, so the summed probability
      grows with size (sum >= size / 2) and would rank components almost like `largest`, which is exactly the
      failure it is meant to fix (an over-segmenting U-Net whose largest blob is a false positive). The mean is
      the U-Net's confidence in the component, independent of its size.
    - `all`: the whole prediction, every component.
    An empty mask is returned as is."""
    m = np.asarray(mask, bool)
    if component not in COMPONENTS:
        raise ValueError(f"component {component!r}: expected one of {', '.join(COMPONENTS)}")
    if component == "all" or not m.any():
        return m
    if component == "largest":
        from medvl.data.clisc import clean_mask
        return clean_mask(m, opening=0, largest=True)  # the CAM stage's clean-up, without the opening
    from scipy.ndimage import mean as label_mean
    from skimage.measure import label
    lab = label(m, connectivity=m.ndim)
    n = int(lab.max())
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.float64)
    if prob is None or np.shape(prob) != m.shape:
        raise ValueError("component most_probable needs the foreground probability volume of the mask's shape")
    means = np.asarray(label_mean(np.asarray(prob, np.float64), lab, np.arange(1, n + 1)), np.float64)
    best = max(range(n), key=lambda i: (means[i], sizes[i], -i))
    return lab == best + 1


def select(scores: Mapping[str, float], mode: Literal["top", "threshold"] = "top",
           value: float = 0.8) -> list[str]:
    """Case ids to keep. `top`: the ceil(value x n) most similar cases (value in (0, 1]; ties broken by case id,
    so the choice is deterministic); `threshold`: every case with similarity >= value. A NaN score is never kept."""
    items = sorted(((k, float(v)) for k, v in scores.items() if not math.isnan(float(v))),
                   key=lambda kv: (-kv[1], kv[0]))
    if mode == "top":
        if not 0 < value <= 1:
            raise ValueError(f"s3f keep ratio {value}: must be in (0, 1]")
        n = math.ceil(value * len(scores))
        return sorted(k for k, _ in items[:n])
    if mode == "threshold":
        return sorted(k for k, v in items if v >= value)
    raise ValueError(f"s3f mode {mode!r}: expected 'top' or 'threshold'")


def validity(scores: Mapping[str, float], true_dice: Mapping[str, float], kept: list[str]) -> dict[str, float]:
    """Evaluation only: Spearman's rank correlation between S3F similarity and true Dice over the cases, and the
    mean true Dice of the kept vs the dropped cases."""
    from scipy.stats import spearmanr
    ids = sorted(set(scores) & set(true_dice))
    out: dict[str, float] = {"s3f_cases": float(len(ids))}
    if len(ids) >= 3:
        rho = spearmanr([scores[i] for i in ids], [true_dice[i] for i in ids]).statistic
        out["s3f_spearman"] = float(rho)
    keep = set(kept)
    k = [true_dice[i] for i in ids if i in keep]
    d = [true_dice[i] for i in ids if i not in keep]
    out["s3f_kept_true_dice"] = float(np.mean(k)) if k else float("nan")
    out["s3f_dropped_true_dice"] = float(np.mean(d)) if d else float("nan")
    return out
