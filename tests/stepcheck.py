"""Shared checks for method tests: one optimizer step of a method on an in-memory batch (with gradient
accumulation), and the comparison of two such steps (named loss terms and every gradient). Used by the
"accumulation equals the full batch" and "2 Ray Train workers equal one process" tests of every method, and the
CPU bf16 autocast step (dtype errors of the GPU AMP path surface without a GPU)."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from medvl.config import OptimConfig, load_recipe
from medvl.methods import resolve_method
from medvl.train.optim import build_optimizer, build_scheduler
from medvl.train.step import StepSettings, train_step


def recipe_method(data: dict):
    return resolve_method(load_recipe(data=data))


def one_step(method_or_data, accum: int, batch: dict[str, torch.Tensor], seed: int = 0, precision: str = "fp32",
             device: str = "cpu"):
    """Build the method's model from `seed`, run one accumulated step (on `device`; fp16 on CUDA with the
    trainer's GradScaler); return (terms, {param: grad}) on the CPU."""
    torch.manual_seed(seed)
    m = method_or_data if not isinstance(method_or_data, dict) else recipe_method(method_or_data)
    if device != "cpu":
        m.bind(m.dist, torch.device(device))
    model = m.build_model().to(device)
    opt = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0))
    sched = build_scheduler(opt, OptimConfig(warmup_steps=0), 10)
    # (a moderate initial scale: with the default 2^16 a tiny model's first fp16 step may overflow and be skipped)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0) if device == "cuda" and precision == "fp16" else None
    terms = train_step(m, model, {k: v.clone().to(device) for k, v in batch.items()}, opt, sched,
                       StepSettings(accum_freq=accum, grad_clip=None, precision=precision,
                                    device_type=torch.device(device).type), scaler)
    return ({k: v.float().cpu() for k, v in terms.items()},
            {n: p.grad.clone().cpu() for n, p in model.named_parameters() if p.grad is not None})


def assert_bf16_autocast_step(method_or_factory: dict | Callable, batch, full=None, precision: str = "bf16",
                              device: str = "cpu") -> None:
    """The method's step under CPU bf16 autocast (the GPU AMP path's dtypes, without a GPU; with `device="cuda"`
    the GPU path itself, bf16 or fp16 + GradScaler): it runs (no dtype error), every loss term is finite and near
    the fp32 step's, and the gradients are fp32 and finite on the same parameters (autocast keeps the weights and
    their gradients fp32)."""
    full = full or one_step(_fresh(method_or_factory), 1, batch, device=device)
    terms, grads = one_step(_fresh(method_or_factory), 1, batch, precision=precision, device=device)
    assert set(terms) == set(full[0])
    for k, v in terms.items():
        assert torch.isfinite(v).all(), k
        assert float(v) == pytest.approx(float(full[0][k]), rel=0.1, abs=0.05), k
    assert set(grads) == set(full[1])
    for k, g in grads.items():
        assert g.dtype == full[1][k].dtype and torch.isfinite(g).all(), k
    # autocast really engaged: bf16 matmuls change the numbers
    assert any(not torch.equal(g, full[1][k]) for k, g in grads.items()), "bf16 step is bit-identical to fp32"


def assert_same_step(a, b, rel: float = 1e-5, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Two steps' named terms and gradients agree (same term names, same parameters with gradients)."""
    (t1, g1), (t2, g2) = a, b
    assert set(t1) == set(t2)
    for k in t1:
        assert float(t1[k]) == pytest.approx(float(t2[k]), rel=rel), k
    assert set(g1) == set(g2)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=rtol, atol=atol, msg=_named(k))


def assert_accumulation_matches_full_batch(method_or_factory: dict | Callable, batch) -> dict:
    """accum_freq=2 gives the loss terms and gradients of one full batch; returns the full-batch terms."""
    full = one_step(_fresh(method_or_factory), 1, batch)
    assert_same_step(full, one_step(_fresh(method_or_factory), 2, batch))
    assert_bf16_autocast_step(method_or_factory, batch, full)  # every method's step also runs under bf16 autocast
    return full[0]


def _fresh(method_or_factory):
    return method_or_factory() if callable(method_or_factory) else method_or_factory


def _named(k: str) -> Callable[[str], str]:
    return lambda msg: f"{k}: {msg}"
