"""One optimizer step of any method (plain PyTorch; unit tests call it without Ray).

With `accum_freq > 1` it follows open_clip_train, for every method: the outputs of all micro-batches are first
computed without grad, then each micro-batch is re-run with grad and its per-sample outputs (`method.feature_keys`)
are concatenated with the cached ones of the others, so every loss term sees the full accumulated batch (all
negatives). Learnable scalars in the output (`method.global_keys`: temperature, bias, loss weights) keep their
gradient in the last pass only, so the accumulated gradient equals the full-batch gradient exactly.

Under DDP the first k-1 passes run inside `no_sync()` and the last one, whose backward reaches every parameter
(the scalars included), all-reduces the accumulated gradients once. (Before the seam, later passes detached the
temperature while every pass synchronised, and DDP failed with "Expected to have finished reduction in the prior
iteration" on 2+ workers.)

Non-finite steps: when the loss (any micro-batch's) or, with clipping, the gradient norm is NaN/inf on ANY rank,
the step is skipped on EVERY rank (the finiteness flag is all-reduced, so ranks never diverge): no optimizer update,
no scheduler step, no `after_step`; the returned report says so (`report.skipped`). `medvl.train.faults` counts
these steps and stops a run after `train.max_nonfinite_steps` in a row. With an fp16 GradScaler an overflow in the
gradients alone stays the scaler's business (it skips and lowers the scale, as in open_clip_train); a non-finite
loss is still skipped and counted here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from medvl.models.factory import unwrap


class StepReport(dict):
    """The step's detached loss terms; `skipped` is True when the step was not applied (non-finite on a rank)."""
    skipped: bool = False


@dataclass
class StepSettings:
    accum_freq: int = 1
    grad_clip: Optional[float] = 1.0
    precision: str = "fp32"
    device_type: str = "cpu"


def autocast(s: StepSettings):
    """Mixed precision of the forward pass and loss: bf16/fp16 autocast on CUDA; bf16 autocast on CPU too (so a
    method's dtype errors surface in CPU tests); fp16 on CPU runs fp32 (CPU fp16 kernels are slow or missing)."""
    if s.device_type == "cuda" and s.precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if s.precision == "bf16" else torch.float16)
    if s.device_type == "cpu" and s.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _split(batch: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    parts = {key: v.chunk(k) for key, v in batch.items()}
    n = min(len(p) for p in parts.values())
    if n != k:
        raise ValueError(f"optim.accum_freq={k}: the per-worker batch ({len(next(iter(batch.values())))} rows) must "
                         f"split into {k} micro-batches")
    return [{key: parts[key][j] for key in batch} for j in range(k)]


def _merge(cached: list[dict], out: dict, j: int, keys: tuple[str, ...], detach: tuple[str, ...]) -> dict:
    merged = dict(out)
    for key in keys:
        if key in out and out[key] is not None:
            merged[key] = torch.cat([c[key] for c in cached[:j]] + [out[key]] + [c[key] for c in cached[j + 1:]])
    for key in detach:
        if isinstance(merged.get(key), torch.Tensor):
            merged[key] = merged[key].detach()
    return merged


def all_ranks_finite(ok: torch.Tensor) -> bool:
    """AND of a per-rank boolean over every rank (one tiny all-reduce; a device sync, as GradScaler does)."""
    import torch.distributed as dist
    flag = ok.detach().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def train_step(method, model, batch: dict, optimizer, scheduler, s: StepSettings,
               scaler: Optional[torch.amp.GradScaler] = None) -> StepReport:
    """One optimizer step; returns the detached loss terms ({"loss": total, ...}, means over micro-batches) and
    whether the step was skipped because a loss or gradient norm was not finite on some rank."""
    optimizer.zero_grad(set_to_none=True)
    if s.accum_freq == 1:
        with autocast(s):
            terms = method.loss(method.forward(model, batch))
        _backward(terms["loss"], scaler)
        report = {k: v.detach() for k, v in terms.items()}
        finite = torch.isfinite(report["loss"]).all()
    else:
        k = s.accum_freq
        micro = _split(batch, k)
        with torch.no_grad(), autocast(s):
            cached = [method.forward(model, m) for m in micro]
        report = {}
        finite = torch.ones((), dtype=torch.bool, device=next(iter(batch.values())).device)
        for j, m in enumerate(micro):
            last = j == k - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast(s):
                    out = method.forward(model, m)
                    merged = _merge(cached, out, j, method.feature_keys, () if last else method.global_keys)
                    terms = method.loss(merged)
                _backward(terms["loss"], scaler)
            finite = finite & torch.isfinite(terms["loss"].detach()).all()
            for key, v in terms.items():
                report[key] = report.get(key, 0) + v.detach() / k
    report = StepReport(report)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if s.grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        if scaler is None:  # under fp16 an inf gradient is an overflow the scaler handles itself
            finite = finite & torch.isfinite(norm)
    if not all_ranks_finite(finite.to(report["loss"].device)):
        optimizer.zero_grad(set_to_none=True)  # nothing of this step reaches the weights, the LR or the method
        if scaler is not None:
            scaler.update()  # closes the unscale_ above (and lowers the scale if the gradients overflowed)
        report.skipped = True
        return report
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    method.after_step(unwrap(model))
    return report


def _backward(loss, scaler):
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
