"""Test-only methods (names start with `test_`), loaded by recipes through `plugins: [medvl_test_plugins]`.

`test_extra_term` is the smallest plug-in the seam must allow: it wraps CLIP without copying it, puts a head on
the image features *before* CLIP's projection (reached through `ClipModule`'s hook), and adds one gathered
contrastive loss term (`aux`) to the wrapped method's loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medvl.config import ConfigError
from medvl.losses import contrastive_term
from medvl.methods import Plugin, register_method


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
