"""The contrastive losses, all from open_clip (one place to choose them, by explicit name)."""
from __future__ import annotations

import warnings

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
