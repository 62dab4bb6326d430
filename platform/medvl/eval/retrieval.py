"""Image <-> text retrieval over deduplicated texts: recall@k and mean / median rank (ROCO style) in both
directions; ties count against the model.

A hit for image i is its own caption; its rank is the number of *other* captions scoring at least as high
(`>=`), so a collapsed model (every similarity equal) scores R@1 = 0, not 1. Text -> image: a caption's best
matching image against every non-matching image scoring at least as high. Mean and median ranks are 1-based
(1 = the match came first).
"""
from __future__ import annotations

import torch


def retrieval_ranks(img: torch.Tensor, txt: torch.Tensor, caption_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """img [N, D] per sample, txt [U, D] per unique caption, caption_ids [N] -> (i2t ranks [N], t2i ranks [U]),
    0 = first place."""
    sim = img @ txt.T  # [N, U]
    own = sim.gather(1, caption_ids[:, None])
    i2t = (sim >= own).sum(1) - 1
    simT = sim.T  # [U, N]
    match = caption_ids[None, :] == torch.arange(len(txt))[:, None]
    best = torch.where(match, simT, torch.full_like(simT, float("-inf"))).max(1).values
    t2i = ((simT >= best[:, None]) & ~match).sum(1)
    return i2t, t2i


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, caption_ids: torch.Tensor, ks: list[int],
                      prefix: str = "val/", mean_rank: bool = False) -> dict[str, float]:
    i2t, t2i = retrieval_ranks(img, txt, caption_ids)
    out = {}
    for k in ks:
        out[f"{prefix}i2t_r{k}"] = float((i2t < k).float().mean())
        out[f"{prefix}t2i_r{k}"] = float((t2i < k).float().mean())
    out.update(rank_summary(i2t, t2i, prefix))
    return out


def rank_summary(i2t: torch.Tensor, t2i: torch.Tensor, prefix: str = "val/") -> dict[str, float]:
    """Mean and median 1-based rank of the match, both directions, from `retrieval_ranks`' 0-based ranks."""
    out = {}
    for d, r in (("i2t", i2t), ("t2i", t2i)):
        r1 = r.double() + 1
        out[f"{prefix}{d}_mean_rank"] = float(r1.mean())
        out[f"{prefix}{d}_median_rank"] = float(r1.quantile(0.5))  # the mean of the middle two when even
    return out


RANK_METRICS = ("mean_rank", "median_rank")


def retrieval_metric_names(ks: list[int], prefix: str = "val/") -> set[str]:
    return {f"{prefix}{d}_r{k}" for k in ks for d in ("i2t", "t2i")} | \
        {f"{prefix}{d}_{m}" for m in RANK_METRICS for d in ("i2t", "t2i")}
