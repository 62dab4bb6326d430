"""AdamW with open_clip's weight-decay exclusions, and a warm-up + cosine schedule (a LambdaLR, so it
checkpoints with `state_dict()`)."""
from __future__ import annotations

import math

import torch

from medvl.config import OptimConfig


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    # open_clip_train: no decay for gains/biases (ndim < 2), norms, logit scale/bias, embeddings of dim < 2
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
        or "norm" in name


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not _no_decay(n, p)]
    no_decay = [p for n, p in named if _no_decay(n, p)]
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}]
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[cfg.impl]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **impl)


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    e = step - warmup
    es = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(e, es) / es))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.schedule))
