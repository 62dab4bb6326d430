"""Test-only methods (names start with `test_`), loaded by recipes through `plugins: [medvl_test_plugins]`.

`test_extra_term` is the smallest plug-in the seam must allow: it wraps CLIP without copying it, puts a head on
the image features *before* CLIP's projection (reached through `ClipModule`'s hook), and adds one gathered
contrastive loss term (`aux`) to the wrapped method's loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medvl.config import ConfigError
from medvl.losses import contrastive_term
from medvl.methods import Method, Plugin, register_method


@dataclass
class ExtraTermConfig:
    enabled: bool = True
    weight: float = 0.5
    """Weight of the extra term in the total loss."""
    hidden: int = 16

    def validate(self):
        if self.weight < 0:
            raise ConfigError("test_extra_term.weight must be >= 0")


class ExtraModule(nn.Module):
    def __init__(self, inner: nn.Module, width: int, hidden: int, embed: int):
        super().__init__()
        self.inner = inner
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, embed))

    def forward(self, batch, hook=None):
        seen = {}

        def record(name, pre):
            seen[name] = pre
            return pre if hook is None else hook(name, pre)

        out = dict(self.inner(batch, hook=record))
        out["aux_image"] = F.normalize(self.head(seen["image"]), dim=-1)
        return out


@register_method
class ExtraTermPlugin(Plugin):
    name = "test_extra_term"
    config_cls = ExtraTermConfig
    feature_keys = ("aux_image",)

    def build_model(self):
        inner = self.inner.build_model()
        t = inner.towers
        embed = int(t.image_proj(torch.zeros(1, t.image_width)).shape[-1])
        return ExtraModule(inner, t.image_width, self.cfg.hidden, embed)

    def loss(self, out):
        terms = dict(self.inner.loss(out))
        aux = contrastive_term(out["aux_image"], out["text_features"], out["logit_scale"], self.dist)
        terms["aux"] = aux
        terms["loss"] = terms["loss"] + self.cfg.weight * aux
        return terms

    def loss_terms(self):
        return self.inner.loss_terms() + ("aux",)

    def after_step(self, model):
        self.inner.after_step(model.inner)

    def train_metrics(self, model):
        return self.inner.train_metrics(model.inner)

    def evaluator(self):
        ev = self.inner.evaluator()
        return None if ev is None else (lambda model, device: ev(model.inner, device))

    def export(self, model, tracking_uri, run_id):
        return self.inner.export(model.inner, tracking_uri, run_id)


# --------------------------------------------------------------------------- fault injection (tests/test_faults.py)


@dataclass
class NanLossConfig:
    enabled: bool = True
    steps: list[int] = field(default_factory=list)
    """1-based optimizer steps whose loss is NaN (counted in calls to `loss`: use optim.accum_freq 1)."""
    from_step: int = 0
    """From this step on every loss is NaN (0: never)."""
    ranks: list[int] = field(default_factory=list)
    """Ranks that produce the NaN (empty: all); the others compute a finite loss for the same step."""
    trace_dir: str = ""
    """If set, each rank appends (step, checksum of its parameters before the step) to <trace_dir>/rank<r>.jsonl."""


@register_method
class NanLossPlugin(Plugin):
    """Makes CLIP's loss NaN on chosen steps and ranks, for real (a NaN tensor in the graph, so backward and DDP's
    all-reduce see it), to test that every rank skips the step together and that a run of them stops training."""
    name = "test_nan_loss"
    config_cls = NanLossConfig

    def __init__(self, recipe, inner):
        super().__init__(recipe, inner)
        self.calls = 0

    def forward(self, model, batch):
        if self.cfg.trace_dir:
            import json
            import os
            with torch.no_grad():
                total = sum(float(p.detach().double().sum()) for p in model.parameters())
            os.makedirs(self.cfg.trace_dir, exist_ok=True)
            with open(os.path.join(self.cfg.trace_dir, f"rank{self.dist.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.calls + 1, "checksum": repr(total)}) + "\n")
        return self.inner.forward(model, batch)

    def loss(self, out):
        self.calls += 1
        terms = dict(self.inner.loss(out))
        c = self.cfg
        hit = self.calls in c.steps or (c.from_step and self.calls >= c.from_step)
        if hit and (not c.ranks or self.dist.rank in c.ranks):
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "calls": self.calls}

    def load_state_dict(self, state):
        self.inner.load_state_dict((state or {}).get("inner", {}))
        self.calls = int((state or {}).get("calls", 0))


@dataclass
class PaceConfig:
    enabled: bool = True
    seconds_per_step: float = 0.1
    """Sleep this long in every step (on the training worker): a training run of a known, load-independent length
    for the outage and node-loss tests."""
    pace_file: str = ""
    """If set and the file exists, its content (seconds) replaces seconds_per_step, read at every step: a test
    slows a run down, or lets it finish quickly, while it runs."""


@register_method
class PacePlugin(Plugin):
    name = "test_pace"
    config_cls = PaceConfig

    def prepare_batch(self, batch, device):
        import time
        pace = self.cfg.seconds_per_step
        if self.cfg.pace_file:
            try:
                with open(self.cfg.pace_file) as f:
                    pace = float(f.read().strip() or pace)
            except (OSError, ValueError):
                pass
        time.sleep(pace)
        return self.inner.prepare_batch(batch, device)


# --------------------------------------------------------------------------- a method without a contrastive head


@register_method
class ImageOnlyMethod(Method):
    """A method with no image-text contrastive head (image features only): CLIPin must refuse to wrap it."""
    name = "test_image_only"
    feature_keys = ("image_features",)
