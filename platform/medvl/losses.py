"""Contrastive losses: open_clip's (one place to choose them, by explicit name) and the one shared helper every
method uses for its own contrastive terms (image-image, text-text, view-view, ...).

The helper follows open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)` convention, the only one that
scales (open_clip #894) and the one with exact gradients (#616): each rank gathers the *other* side of the term
from every rank with autograd (`torch.distributed.nn.all_gather`), computes its local rows against the global
columns, and its labels are offset by `rank * local_batch`. DDP then averages the gradients over ranks, which
gives exactly the gradient of one process on the concatenated batch (tested with 2 real Ray Train workers).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

# open_clip 3.3.0 gathers with torch.distributed.nn.all_gather (autograd-aware); torch warns on every call
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")

from medvl.config import LossConfig


def build_loss(cfg: LossConfig, rank: int = 0, world_size: int = 1):
    if cfg.kind == "clip":
        return ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, cache_labels=True,
                        rank=rank, world_size=world_size)
    if cfg.kind == "siglip":
        return SigLipLoss(cache_labels=True, rank=rank, world_size=world_size, dist_impl=cfg.siglip_dist_impl)
    raise ValueError(f"loss.kind: unknown loss {cfg.kind!r}")


def compute_loss(loss_fn, out: dict):
    """Call the open_clip loss on a model's output dict (`image_features`, `text_features`, `logit_scale`[, bias])."""
    args = [out["image_features"], out["text_features"], out["logit_scale"]]
    if isinstance(loss_fn, SigLipLoss):
        return loss_fn(*args, out["logit_bias"])
    if out.get("logit_bias") is not None:
        return loss_fn(*args, logit_bias=out["logit_bias"])
    return loss_fn(*args)


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the data-parallel group (rank 0 of 1 without Ray Train)."""
    rank: int = 0
    world: int = 1


def gather_with_grad(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """All ranks' `x` concatenated in rank order, differentiable (open_clip's `gather_with_grad`)."""
    if dist.world <= 1:
        return x
    import torch.distributed.nn
    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


def local_labels(n: int, dist: Dist, device) -> torch.Tensor:
    """Targets of the local rows among the gathered columns: offset by rank x local batch."""
    return torch.arange(n, device=device) + dist.rank * n


def contrastive_term(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, dist: Dist = Dist(),
                     symmetric: bool = True, a_all: torch.Tensor | None = None,
                     b_all: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE between paired rows of `a` and `b` (already normalised), gathered across workers:
    a -> b (and b -> a when `symmetric`, averaged), local rows vs global columns, labels offset by rank.
    `a_all` / `b_all`: the already gathered `gather_with_grad(a / b, dist)`, for methods whose terms share
    features (CXR-CLIP's six terms over four feature sets gather each set once instead of once per term)."""
    labels = local_labels(a.shape[0], dist, a.device)
    b_all = gather_with_grad(b, dist) if b_all is None else b_all
    loss = F.cross_entropy(scale * a @ b_all.T, labels)
    if not symmetric:
        return loss
    a_all = gather_with_grad(a, dist) if a_all is None else a_all
    return 0.5 * (loss + F.cross_entropy(scale * b @ a_all.T, labels))
