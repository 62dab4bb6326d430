"""One optimizer step of contrastive training (plain PyTorch; unit tests call it without Ray).

With `accum_freq > 1` it follows open_clip_train: features of all micro-batches are computed first without
grad, then each micro-batch is re-forwarded with grad against the cached features of the others, so the
contrastive batch (the negatives) is the full accumulated batch, not one micro-batch. Unlike open_clip_train,
the logit scale/bias get their gradient from one pass only, so the step equals the full-batch step exactly.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from medvl.losses import compute_loss
from medvl.models.factory import unwrap


@dataclass
class StepSettings:
    accum_freq: int = 1
    grad_clip: Optional[float] = 1.0
    precision: str = "fp32"
    device_type: str = "cpu"


def autocast(s: StepSettings):
    if s.device_type == "cuda" and s.precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if s.precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def train_step(model, batch: dict, loss_fn, optimizer, scheduler, s: StepSettings,
               scaler: Optional[torch.amp.GradScaler] = None) -> float:
    images, texts = batch["image"], batch["text"]
    optimizer.zero_grad(set_to_none=True)
    if s.accum_freq == 1:
        with autocast(s):
            out = model(images, texts)
            loss = compute_loss(loss_fn, out)
        _backward(loss, scaler)
        total = loss.detach()
    else:
        imgs, txts = images.chunk(s.accum_freq), texts.chunk(s.accum_freq)
        with torch.no_grad(), autocast(s):
            cached = [model(i, t) for i, t in zip(imgs, txts)]
        total = torch.zeros((), device=images.device)
        for j, (i, t) in enumerate(zip(imgs, txts)):
            with autocast(s):
                out = model(i, t)
                merged = dict(out)
                for key in ("image_features", "text_features"):
                    merged[key] = torch.cat([c[key] for c in cached[:j]] + [out[key]] +
                                            [c[key] for c in cached[j + 1:]])
                if j > 0:  # every pass sees the whole batch: let only one carry the temperature's gradient
                    for key in ("logit_scale", "logit_bias"):
                        if merged.get(key) is not None:
                            merged[key] = merged[key].detach()
                loss = compute_loss(loss_fn, merged)
            _backward(loss, scaler)
            total += loss.detach()
        total = total / s.accum_freq
    if scaler is not None:
        scaler.unscale_(optimizer)
    if s.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    with torch.no_grad():  # open_clip: clamp to [0, ln 100]
        unwrap(model).logit_scale.clamp_(0, math.log(100))
    return float(total)


def _backward(loss, scaler):
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
