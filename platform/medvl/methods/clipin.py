"""CLIPin (Yang et al., arXiv 2508.06434; reference code T6Yang/CLIPin): a non-contrastive plug-in (BYOL-style
momentum targets, two views) over any contrastive image-text method whose model exposes the pre-projection `hook`
(`ClipModule.forward(batch, hook=...)`): `clip` and `cxr_clip` here.

    medvl train jobs/clipin_digits.yaml                        # CLIPin over CLIP on the digits (2 workers)
    medvl compare jobs/digits_clip.yaml jobs/clipin_digits.yaml  # the same budget and seed, with and without
    python bench/clipin_cost.py                                # memory and samples/s of the target branch

Switch it on in any clip / cxr_clip recipe with a section `clipin: {enabled: true, ...}` (knobs: `ClipinConfig`).

Online branch (inside the DDP-wrapped module, `ClipinModule`): per modality a shared pre-projector between the
trunk and the method's own contrastive projection (the hook replaces the pooled features by its output), whose
output also feeds a non-contrastive projector (BatchNorm1d(affine=False) -> GELU -> Linear to `nc_width`) and two
predictors (Linear -> BN -> ReLU -> Linear): a cross-modal one (`inter`) and a same-modal one (`intra`).

Target branch (`ClipinTarget`, owned by the plug-in object, OUTSIDE the DDP module: an EMA module inside a
DDP-wrapped one breaks DDP): momentum copies of the encoders (the whole inner module), pre-projectors and
non-contrastive projectors, no gradients, run under no_grad in `forward` after `model(batch)` on the second image
view (and the second text view with `text_views: second`); updated in `after_step` (after the optimizer step, on
every rank, never in `forward`, which gradient accumulation calls twice per micro-batch):
theta_t <- m theta_t + (1 - m) theta (buffers, i.e. BatchNorm statistics, copied). Its weights are initialised
from the online weights at the first step (after DDP broadcast rank 0's), and saved in every checkpoint
(`Method.state_dict`).

Loss (z = normalised target features of view 2, p = online predictions from view 1, cos per sample, batch mean):

    L_inter = 1/2 [(2 - 2 cos(p_inter_image, z_text)) + (2 - 2 cos(p_inter_text, z_image))]   # reference BYOL_Loss
    L_intra = 1/2 [(2 - 2 cos(p_intra_image, z_image)) + (2 - 2 cos(p_intra_text, z_text))]  # selfalign_Loss
    L       = L_inter + lambda_intra L_intra + lambda_clip L_method   (L_method: all the method's terms, weighted)

Logged: train/inter, train/intra, train/contrastive (= L_method) and the method's own terms (cxr_clip: clip, icl,
tcl), plus train/clipin_lambda_intra, train/clipin_lambda_clip, train/clipin_momentum.

Learnable lambdas (`learnable_lambdas: true`, the reference's setting) are parameters of the online module, reach
the loss through `out` (`global_keys`), and are clamped to `lambda_range` after every step. Gradient descent on a
positive weight of a positive loss only ever lowers it (d L / d lambda = the term >= 0): the reference's weights
drift toward 0, i.e. the contrastive term vanishes. The lower clamp (default 0.5) is what keeps every term alive.

BatchNorm under DDP: the online projectors/predictors (and the target's projector) use `GlobalBatchNorm1d`, a
BatchNorm1d whose training statistics are the global batch's (per-rank sums gathered with gradient), so 2 workers
normalise exactly like one process on the concatenated batch. torch's SyncBatchNorm does the same but only on GPUs;
this one also runs on gloo/CPU, where the tests and the demo run.

Evaluation: the inner method's evaluator (zero-shot, retrieval, and the linear probe on frozen image features when
`eval.linear_probe`) run with the online weights (names unchanged, e.g. `val/linear_probe_accuracy`) and, with
`eval_target`, again with the target weights (`val/target_<name>`, e.g. `val/target_linear_probe_accuracy`). Both go
through the pre-projector, as in training.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medvl.config import ConfigError, Recipe
from medvl.data.decode import IMAGE_MEMO, ImageMemo, RowDecoder, normalize_images
from medvl.losses import Dist, gather_with_grad
from medvl.methods.base import Method, Plugin, register_method
from medvl.models.factory import image_norm, unwrap
from medvl.models.towers import OpenClipTowers


@dataclass
class ClipinConfig:
    enabled: bool = True
    nc_width: int = 8192
    """Width of the non-contrastive space (projector output, predictor input/output); reference 8192. Small
    models want less (the digits recipe: 512): see `max_head_ratio`."""
    pre_width: Optional[int] = None
    """Pre-projector output width. None: the trunk's width, initialised to the identity (a pretrained tower starts
    unchanged). Another width (reference: 1024) adds a Linear(pre_width -> trunk width) in front of the method's
    projection (the reference's contrastive sub-projector)."""
    pred_hidden: Optional[int] = None
    """Hidden width of the predictors; None: nc_width // 4 (reference 2048 for 8192)."""
    momentum: float = 0.95
    """EMA momentum m of the target branch (reference 0.95, no schedule)."""
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    """`cosine`: m_k = 1 - (1 - momentum) (cos(pi k / K) + 1) / 2, from `momentum` at step 0 to 1 at step K."""
    momentum_steps: int = 0
    """K of the cosine schedule; 0: `train.max_steps` (required then)."""
    lambda_intra: float = 1.0
    """Weight of L_intra (initial value when learnable)."""
    lambda_clip: float = 1.0
    """Weight of the method's contrastive loss (initial value when learnable)."""
    learnable_lambdas: bool = False
    """Learn both lambdas (reference: yes, init 1.0, clamped to [0, 20]; they only decrease, see the module doc)."""
    lambda_range: list[float] = field(default_factory=lambda: [0.5, 20.0])
    """Clamp of learnable lambdas after every step [low, high]; low > 0 keeps the contrastive term alive (the
    reference's low 0 lets it vanish)."""
    text_views: Literal["same", "second"] = "same"
    """Text view 2 (the target's text input): `same` text as view 1 (the reference's main setting), or `second`:
    the method's second text (cxr_clip: its text2, another report section or prompt draw; clip: another caption
    drawn from the row's texts with `data.text_sampling`)."""
    max_head_ratio: float = 4.0
    """Config error when the CLIPin heads have more than this many times the parameters of the base model (the
    default 8192-wide heads on a tiny model: pick a smaller nc_width)."""
    eval_target: bool = True
    """Also evaluate with the target (EMA) weights: every metric of the method again as `val/target_<name>`."""

    def validate(self) -> None:
        lo_hi = self.lambda_range
        checks = [
            (self.nc_width >= 1, f"clipin.nc_width must be >= 1, got {self.nc_width}"),
            (self.pre_width is None or self.pre_width >= 1, f"clipin.pre_width must be >= 1, got {self.pre_width}"),
            (self.pred_hidden is None or self.pred_hidden >= 1,
             f"clipin.pred_hidden must be >= 1, got {self.pred_hidden}"),
            (0.0 <= self.momentum < 1.0, f"clipin.momentum must be in [0, 1), got {self.momentum}"),
            (self.momentum_steps >= 0, "clipin.momentum_steps must be >= 0"),
            (self.lambda_intra >= 0, "clipin.lambda_intra must be >= 0"),
            (self.lambda_clip >= 0, "clipin.lambda_clip must be >= 0"),
            (len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1],
             f"clipin.lambda_range must be [low, high] with 0 <= low <= high, got {lo_hi}"),
            (self.max_head_ratio > 0, "clipin.max_head_ratio must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.learnable_lambdas and not (lo_hi[0] <= self.lambda_intra <= lo_hi[1]
                                           and lo_hi[0] <= self.lambda_clip <= lo_hi[1]):
            raise ConfigError(f"clipin.lambda_intra / clipin.lambda_clip: initial learnable weights must lie in "
                              f"clipin.lambda_range {lo_hi}")


# ----------------------------------------------------------------------------------------------------------- modules


def _world() -> tuple[int, int]:
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d with global-batch statistics in training when torch.distributed runs more than one rank: each
    rank's per-channel sums and sums of squares are all-gathered with gradient (`medvl.losses.gather_with_grad`)
    and summed in rank order, so every rank normalises (and tracks running statistics) exactly as one process on
    the concatenated batch. A drop-in for SyncBatchNorm that also works on CPU / gloo (SyncBatchNorm is GPU-only).
    One process (or eval mode): plain BatchNorm1d. The state dict is BatchNorm1d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        if not self.training or world <= 1:
            return super().forward(x)
        xf = x.float()
        local = torch.cat([xf.sum(0), (xf * xf).sum(0), xf.new_tensor([float(x.shape[0])])])
        tot = gather_with_grad(local[None], Dist(rank, world)).sum(0)
        c = self.num_features
        n = tot[-1]
        mean = tot[:c] / n
        var = (tot[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                mom = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - mom).add_(mean.detach(), alpha=mom)
                self.running_var.mul_(1 - mom).add_(var.detach() * n / max(float(n) - 1, 1.0), alpha=mom)
        y = (xf - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


class PreProjector(nn.Module):
    """Linear(trunk width -> pre width); `forward` returns (pre-projected features for the non-contrastive branch,
    features for the method's projection: the same, or through Linear(pre width -> trunk width) when they differ)."""

    def __init__(self, width: int, pre_width: Optional[int]):
        super().__init__()
        pw = pre_width or width
        self.proj = nn.Linear(width, pw)
        if pw == width:  # identity: the method's projection sees its trunk's features at step 0
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(width))
                self.proj.bias.zero_()
            self.back: nn.Module = nn.Identity()
        else:
            self.back = nn.Linear(pw, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.proj(x)
        return h, self.back(h)


def nc_projector(width: int, nc_width: int) -> nn.Sequential:
    """BatchNorm1d(affine=False) -> GELU -> Linear(width -> nc_width) (the reference's non-contrastive projector)."""
    return nn.Sequential(GlobalBatchNorm1d(width, affine=False), nn.GELU(), nn.Linear(width, nc_width))


def predictor(nc_width: int, hidden: int) -> nn.Sequential:
    """Linear -> BN -> ReLU -> Linear (BYOL's predictor)."""
    return nn.Sequential(nn.Linear(nc_width, hidden), GlobalBatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, nc_width))


MODALITIES = ("image", "text")


def _modality(name: str) -> str:
    for m in MODALITIES:
        if name.startswith(m):
            return m
    raise ValueError(f"clipin: the inner module offered pre-projection features named {name!r} (expected image* or "
                     f"text*)")


class ClipinModule(nn.Module):
    """The online branch: the inner method's module with pre-projectors put in through its hook, plus the
    non-contrastive projectors, predictors and (learnable) lambdas. DDP wraps this module; the target is not in it."""

    def __init__(self, inner: nn.Module, widths: dict[str, int], cfg: ClipinConfig):
        super().__init__()
        self.inner = inner
        hidden = cfg.pred_hidden or max(1, cfg.nc_width // 4)
        self.pre = nn.ModuleDict({m: PreProjector(widths[m], cfg.pre_width) for m in MODALITIES})
        pw = {m: cfg.pre_width or widths[m] for m in MODALITIES}
        self.nc = nn.ModuleDict({m: nc_projector(pw[m], cfg.nc_width) for m in MODALITIES})
        self.pred = nn.ModuleDict({f"{k}_{m}": predictor(cfg.nc_width, hidden)
                                   for k in ("inter", "intra") for m in MODALITIES})
        self.learnable = cfg.learnable_lambdas
        if self.learnable:
            self.lambda_intra = nn.Parameter(torch.tensor(float(cfg.lambda_intra)))
            self.lambda_clip = nn.Parameter(torch.tensor(float(cfg.lambda_clip)))

    def heads(self) -> list[nn.Module]:
        return [self.pre, self.nc, self.pred]

    def forward(self, batch: dict[str, torch.Tensor], hook=None) -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}

        def pre_project(name: str, f: torch.Tensor) -> torch.Tensor:
            h, to_proj = self.pre[_modality(name)](f)
            seen[name] = h
            return to_proj if hook is None else hook(name, to_proj)

        out = dict(self.inner(batch, hook=pre_project))
        for m in MODALITIES:
            if m not in seen:
                raise ValueError(f"clipin: the inner module never offered {m!r} features to its hook")
            y = self.nc[m](seen[m])
            out[f"clipin_p_inter_{m}"] = self.pred[f"inter_{m}"](y)
            out[f"clipin_p_intra_{m}"] = self.pred[f"intra_{m}"](y)
        if self.learnable:
            out["clipin_lambda_intra"] = self.lambda_intra
            out["clipin_lambda_clip"] = self.lambda_clip
        return out


class ClipinTarget(nn.Module):
    """The momentum branch: copies of the inner module (encoders), pre-projectors and non-contrastive projectors,
    no gradients. `forward(image, text)` -> their non-contrastive features (view 2)."""

    def __init__(self, online: ClipinModule):
        super().__init__()
        self.inner = copy.deepcopy(online.inner)
        self.pre = copy.deepcopy(online.pre)
        self.nc = copy.deepcopy(online.nc)
        self.requires_grad_(False)

    def pairs(self, online: ClipinModule) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.inner, online.inner), (self.pre, online.pre), (self.nc, online.nc)]

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tw = self.inner.towers
        zi = self.nc["image"](self.pre["image"](tw.image_pre(image))[0])
        zt = self.nc["text"](self.pre["text"](tw.text_pre(text))[0])
        return zi, zt


@torch.no_grad()
def ema_update(target: ClipinTarget, online: ClipinModule, m: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta for every parameter; buffers (BatchNorm statistics) copied."""
    for t_mod, o_mod in target.pairs(online):
        tp = [p for p in t_mod.parameters()]
        op = [p.detach() for p in o_mod.parameters()]
        if len(tp) != len(op):
            raise RuntimeError("clipin: target and online parameters differ in number")
        torch._foreach_mul_(tp, m)
        torch._foreach_add_(tp, op, alpha=1.0 - m)
        for tb, ob in zip(t_mod.buffers(), o_mod.buffers()):
            tb.copy_(ob)


@torch.no_grad()
def copy_online(target: ClipinTarget, online: ClipinModule) -> None:
    ema_update(target, online, 0.0)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z) per row, averaged over the (local) batch; z carries no gradient."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


def clipin_terms(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_inter, L_intra) from the online predictions and the target features in `out`."""
    zi, zt = out["clipin_z_image"], out["clipin_z_text"]
    inter = 0.5 * (byol_loss(out["clipin_p_inter_image"], zt) + byol_loss(out["clipin_p_inter_text"], zi))
    intra = 0.5 * (byol_loss(out["clipin_p_intra_image"], zi) + byol_loss(out["clipin_p_intra_text"], zt))
    return inter, intra


# ----------------------------------------------------------------------------------------------------------- eval view


class _ViewClip(nn.Module):
    """encode_image / encode_text through the pre-projectors, as in training (what the method's evaluator calls)."""

    def __init__(self, clip: nn.Module, pre: nn.ModuleDict):
        super().__init__()
        self.clip = clip
        self.pre = pre
        self.logit_scale = clip.logit_scale

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        tw = OpenClipTowers(self.clip)
        f = tw.image_proj(self.pre["image"](tw.image_pre(image))[1])
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        tw = OpenClipTowers(self.clip)
        f = tw.text_proj(self.pre["text"](tw.text_pre(text))[1])
        return F.normalize(f, dim=-1) if normalize else f


class ClipinView(nn.Module):
    """The inner module as its method's evaluator expects it (`.clip.encode_image` / `.encode_text`), with the
    pre-projectors in the path: built over the online or the target weights (shared, not copied)."""

    def __init__(self, inner: nn.Module, pre: nn.ModuleDict):
        super().__init__()
        self.inner = inner
        self.clip = _ViewClip(inner.clip, pre)


# ----------------------------------------------------------------------------------------------------------- data


class TwoViewDecoder(RowDecoder):
    """Adds a second independently augmented image view (`image2`, and `text2` with `second`) to a one-view
    decoder by decoding the row twice: the seam seeds the row's rng and torch's global generator per (seed, epoch,
    sample), so view 2 differs from view 1 (the generators moved on) and is reproducible. The image file itself is
    decoded once (`ImageMemo`): only the augmentation runs twice."""

    def __init__(self, inner: RowDecoder, second_text: bool):
        self.inner, self.second_text = inner, second_text
        self.columns = inner.columns

    def output_dtypes(self):
        d = dict(self.inner.output_dtypes())
        d["image2"] = d["image"]
        if self.second_text:
            d["text2"] = d["text"]
        return d

    def setup(self):
        self.inner.setup()

    def decode(self, row, rng):
        row = {**row, IMAGE_MEMO: ImageMemo()}
        a = self.inner.decode(row, rng)
        b = self.inner.decode(row, rng)
        a["image2"] = b["image"]
        if self.second_text:
            a["text2"] = b["text"]
        return a

    def collate(self, rows):
        out = self.inner.collate(rows)
        two = self.inner.collate([{**r, "image": r["image2"], **({"text": r["text2"]} if self.second_text else {})}
                                  for r in rows])
        out["image2"] = two["image"]
        if self.second_text:
            out["text2"] = two["text"]
        return out

    def cache_key(self):
        return (type(self).__module__, type(self).__qualname__, self.inner.cache_key(), self.second_text)

    def __getattr__(self, name):  # the inner decoder's helpers (e.g. `image` for held-out decoding)
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


# ----------------------------------------------------------------------------------------------------------- plug-in


def _n_params(mods) -> int:
    return sum(p.numel() for m in mods for p in m.parameters())


@register_method
class ClipinPlugin(Plugin):
    name = "clipin"
    config_cls = ClipinConfig
    version = "1"
    feature_keys = ("clipin_p_inter_image", "clipin_p_inter_text", "clipin_p_intra_image", "clipin_p_intra_text",
                    "clipin_z_image", "clipin_z_text")
    global_keys = ("clipin_lambda_intra", "clipin_lambda_clip")

    def __init__(self, recipe: Recipe, inner: Method):
        super().__init__(recipe, inner)
        if not {"image_features", "text_features"} <= set(inner.feature_keys):
            raise ConfigError(f"clipin: method {inner.describe()!r} has no contrastive image-text head (no "
                              f"image_features / text_features outputs); CLIPin wraps a contrastive method "
                              f"(clip, cxr_clip)")
        c = self.cfg
        self.total_steps = c.momentum_steps or recipe.train.max_steps
        if c.momentum_schedule == "cosine" and not self.total_steps:
            raise ConfigError("clipin.momentum_steps: the cosine momentum schedule needs its length (set "
                              "clipin.momentum_steps or train.max_steps)")
        self.target: Optional[ClipinTarget] = None
        self.online: Optional[ClipinModule] = None
        self.synced = False
        self.steps = 0
        self._norm: Optional[tuple] = None
        self._has_view2: Optional[bool] = None

    @property
    def cfg(self) -> ClipinConfig:
        return self.recipe.section(self.name)

    # ------------------------------------------------------------------ data
    def _inner_has_view2(self) -> bool:
        if self._has_view2 is None:
            self._has_view2 = "image2" in self.inner.batch_dtypes()
        return self._has_view2

    def decoder(self, train):
        dec = self.inner.decoder(train)
        if not train or "image2" in dec.output_dtypes():
            return dec
        missing = {"image", "text"} - set(dec.output_dtypes())
        if missing:
            raise ConfigError(f"clipin: the decoder of method {self.inner.describe()!r} emits no {sorted(missing)}")
        return TwoViewDecoder(dec, self.cfg.text_views == "second")

    def batch_dtypes(self):
        d = dict(self.inner.batch_dtypes())
        if "image2" not in d:
            d["image2"] = d["image"]
            if self.cfg.text_views == "second":
                d["text2"] = d["text"]
        return d

    def prepare_batch(self, batch, device):
        own_view2 = not self._inner_has_view2()
        batch = self.inner.prepare_batch(batch, device)
        if own_view2:
            if self._norm is None:
                self._norm = image_norm(self.recipe.model)
            batch["image2"] = normalize_images(batch["image2"], *self._norm)
        return batch

    # ------------------------------------------------------------------ model
    def build_model(self) -> ClipinModule:
        inner = self.inner.build_model()
        params = inspect.signature(inner.forward).parameters
        if "hook" not in params or not hasattr(inner, "towers"):
            raise ConfigError(f"clipin: the model of method {self.inner.describe()!r} ({type(inner).__name__}) "
                              f"offers no pre-projection `hook` / `towers`; CLIPin needs them (ClipModule)")
        tw = inner.towers
        widths = {"image": tw.image_width, "text": tw.text_width}
        c = self.cfg
        model = ClipinModule(inner, widths, c)
        base, heads = _n_params([inner]), _n_params(model.heads())
        if heads > c.max_head_ratio * base:
            raise ConfigError(f"clipin.nc_width: {c.nc_width} gives CLIPin heads of {heads / 1e6:.1f}M parameters "
                              f"for a {base / 1e6:.2f}M-parameter model (more than clipin.max_head_ratio = "
                              f"{c.max_head_ratio:g} times); use a smaller clipin.nc_width (the digits recipe uses "
                              f"512 for a 128-wide ViT)")
        self.online = model
        self.target = ClipinTarget(model)
        self.synced = False
        return model

    def _ensure_target(self, online: ClipinModule) -> ClipinTarget:
        if self.target is None:
            self.online = online
            self.target = ClipinTarget(online)
            self.synced = False
        dev = next(online.parameters()).device
        if next(self.target.parameters()).device != dev:
            self.target.to(dev)
        if not self.synced:  # at the first step: after DDP broadcast rank 0's weights to every rank
            copy_online(self.target, online)
            self.synced = True
        return self.target

    def forward(self, model, batch):
        out = self.inner.forward(model, batch)
        online = unwrap(model)
        target = self._ensure_target(online)
        text2 = batch["text2"] if self.cfg.text_views == "second" else batch["text"]
        with torch.no_grad():
            zi, zt = target(batch["image2"], text2)
        out["clipin_z_image"], out["clipin_z_text"] = zi, zt
        return out

    # ------------------------------------------------------------------ loss
    def lambdas(self, out: dict[str, Any]) -> tuple[Any, Any]:
        c = self.cfg
        return out.get("clipin_lambda_intra", c.lambda_intra), out.get("clipin_lambda_clip", c.lambda_clip)

    def loss(self, out):
        terms = dict(self.inner.loss(out))
        contrastive = terms.pop("loss")
        inter, intra = clipin_terms(out)
        lam_intra, lam_clip = self.lambdas(out)
        terms.update(contrastive=contrastive, inter=inter, intra=intra,
                     loss=inter + lam_intra * intra + lam_clip * contrastive)
        return terms

    def loss_terms(self):
        return self.inner.loss_terms() + ("contrastive", "inter", "intra")

    def momentum(self, step: Optional[int] = None) -> float:
        """The EMA momentum at optimizer step `step` (0-based; default: the next update's)."""
        c = self.cfg
        k = self.steps if step is None else step
        if c.momentum_schedule == "constant":
            return c.momentum
        frac = min(1.0, k / max(1, self.total_steps))
        return 1.0 - (1.0 - c.momentum) * (math.cos(math.pi * frac) + 1.0) / 2.0

    def after_step(self, model):
        self.inner.after_step(model.inner)
        c = self.cfg
        if model.learnable:
            with torch.no_grad():
                model.lambda_intra.clamp_(*c.lambda_range)
                model.lambda_clip.clamp_(*c.lambda_range)
        target = self._ensure_target(model)
        ema_update(target, model, self.momentum())
        self.steps += 1

    def train_metrics(self, model):
        m = dict(self.inner.train_metrics(model.inner))
        c = self.cfg
        li = float(model.lambda_intra.detach()) if model.learnable else c.lambda_intra
        lc = float(model.lambda_clip.detach()) if model.learnable else c.lambda_clip
        m.update({"train/clipin_lambda_intra": li, "train/clipin_lambda_clip": lc,
                  "train/clipin_momentum": self.momentum()})
        return m

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self):
        st: dict[str, Any] = {"inner": self.inner.state_dict(), "steps": self.steps}
        if self.target is not None and self.synced:
            st["target"] = {k: v.detach().cpu().clone() for k, v in self.target.state_dict().items()}
        return st

    def load_state_dict(self, state):
        state = state or {}
        self.inner.load_state_dict(state.get("inner", {}))
        self.steps = int(state.get("steps", 0))
        if "target" in state:
            if self.target is None:
                raise RuntimeError("clipin: load_state_dict before build_model (the target needs the model)")
            self.target.load_state_dict(state["target"])
            self.synced = True

    # ------------------------------------------------------------------ evaluation
    def evaluator(self):
        ev = self.inner.evaluator()
        if ev is None:
            return None
        eval_target = self.cfg.eval_target

        def evaluate(model, device):
            metrics = dict(ev(ClipinView(model.inner, model.pre), device))
            shown["data"] = ev.pictures() if hasattr(ev, "pictures") else None  # the online towers' (not target's)
            if eval_target:
                target = self._ensure_target(model)
                tm = ev(ClipinView(target.inner, target.pre), device)
                metrics.update({"val/target_" + k[len("val/"):]: v for k, v in tm.items()
                                if k.startswith("val/") and k != "val/rows"})
            return metrics

        shown: dict = {}
        evaluate.pictures = lambda: shown.get("data")  # type: ignore[attr-defined]
        return evaluate

    def metric_names(self):
        names = set(self.inner.metric_names())
        if self.cfg.eval_target:
            names |= {"val/target_" + n[len("val/"):] for n in names if n.startswith("val/") and n != "val/rows"}
        return names

    def image_features(self, model, images):
        return ClipinView(model.inner, model.pre).clip.encode_image(images)

    def text_features(self, model, tokens):
        return ClipinView(model.inner, model.pre).clip.encode_text(tokens)

    def export(self, model, tracking_uri, run_id):
        # the online encoders with their pre-projectors (what the evaluation measures), as an MLflow pyfunc over
        # the whole module (open_clip's format has no place for the pre-projectors)
        from medvl.methods.embedding_pyfunc import log_embedding_model
        log_embedding_model(self, model, tracking_uri, run_id)
