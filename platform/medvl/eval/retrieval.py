"""Image <-> text retrieval recall@k over deduplicated texts; ties count against the model.

A hit for image i is its own caption; its rank is the number of *other* captions scoring at least as high
(`>=`), so a collapsed model (every similarity equal) scores R@1 = 0, not 1. Text -> image: a caption's best
matching image against every non-matching image scoring at least as high. The mean rank (optional) is the mean
1-based rank of the hit (1 = first place), as CXR-CLIP and ConVIRT report it.
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
    if mean_rank:
        out[f"{prefix}i2t_mean_rank"] = float((i2t + 1).float().mean())
        out[f"{prefix}t2i_mean_rank"] = float((t2i + 1).float().mean())
    return out


def retrieval_metric_names(ks: list[int], prefix: str = "val/", mean_rank: bool = False) -> set[str]:
    names = {f"{prefix}{d}_r{k}" for k in ks for d in ("i2t", "t2i")}
    return names | ({f"{prefix}i2t_mean_rank", f"{prefix}t2i_mean_rank"} if mean_rank else set())
