"""Binary findings by zero-shot prompt pairs, scored by AUROC (CXR-CLIP's SIIM/VinDr protocol).

For each finding x, every image is compared with the two prompts `["No {x}", "{x}"]` (configurable); its score is
the similarity to the positive prompt minus the similarity to the negative one (the softmax over the pair that
the reference computes is a monotone function of that difference, so the AUROC is the same). AUROC is computed
over the held-out rows whose label for x is 1 or 0; uncertain rows (-1) are left out, and rows that do not mention
x count as negatives when `missing_as_negative` (ChestX-ray14 and IU list positives only). A finding without both
positive and negative rows gets NaN (and is left out of the mean), so the reported names never change.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np
import torch

from medvl.eval.zeroshot import encode_texts


def metric_slug(name: str) -> str:
    """`Pleural Effusion` -> `pleural_effusion` (a metric-name-safe finding name)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "x"


def findings_metric_names(findings: Sequence[str], prefix: str = "val/") -> set[str]:
    if not findings:
        return set()
    return {f"{prefix}auroc_{metric_slug(f)}" for f in findings} | {f"{prefix}auroc_mean"}


def finding_targets(label_maps: Sequence[dict], findings: Sequence[str], missing_as_negative: bool = True
                    ) -> np.ndarray:
    """[N, F] float targets: 1, 0, or NaN (uncertain, or not mentioned when not `missing_as_negative`)."""
    y = np.full((len(label_maps), len(findings)), np.nan)
    for i, lab in enumerate(label_maps):
        for j, f in enumerate(findings):
            v = lab.get(f)
            if v is None:
                if missing_as_negative:
                    y[i, j] = 0.0
            elif float(v) in (0.0, 1.0):
                y[i, j] = float(v)
    return y


@torch.no_grad()
def finding_scores(img: torch.Tensor, encode_text: Callable, tokenize: Callable, findings: Sequence[str], device,
                   prompts: Sequence[str] = ("No {}", "{}")) -> torch.Tensor:
    """img [N, D] (normalised) -> [N, F] scores: sim(positive prompt) - sim(negative prompt)."""
    neg_t, pos_t = prompts
    txt = encode_texts(encode_text, tokenize, [t.format(f) for f in findings for t in (neg_t, pos_t)], device)
    sims = img @ txt.T  # [N, 2F]: (neg, pos) per finding
    return sims[:, 1::2] - sims[:, 0::2]


def auroc_metrics(scores: np.ndarray, targets: np.ndarray, findings: Sequence[str], prefix: str = "val/"
                  ) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score
    out, good = {}, []
    for j, f in enumerate(findings):
        keep = ~np.isnan(targets[:, j])
        y = targets[keep, j]
        if keep.sum() == 0 or y.min() == y.max():
            out[f"{prefix}auroc_{metric_slug(f)}"] = float("nan")
            continue
        a = float(roc_auc_score(y, scores[keep, j]))
        out[f"{prefix}auroc_{metric_slug(f)}"] = a
        good.append(a)
    if findings:
        out[f"{prefix}auroc_mean"] = float(np.mean(good)) if good else float("nan")
    return out

