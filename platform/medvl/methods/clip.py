"""CLIP: one image and one caption per row, open_clip's contrastive loss (InfoNCE `ClipLoss` with local loss and
gather-with-grad, or `SigLipLoss`), held-out retrieval + zero-shot (+ optional linear probe) evaluation.

Recipe: `method: clip` (the default) with the shared sections `model`, `loss`, `data.text_sampling`, `eval`.
Other methods built on open_clip towers reuse `ClipModule`, `ClipDecoder` and `clip_evaluator`.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from medvl.config import ModelConfig, Recipe, from_dict
from medvl.data.decode import RowDecoder, normalize_images, open_image, pick_text, to_uint8_chw
from medvl.losses import build_loss, compute_loss
from medvl.methods.base import Method, register_method
from medvl.models.factory import create_model, image_norm, pil_transforms, tokenizer
from medvl.models.towers import OpenClipTowers


class ClipModule(nn.Module):
    """An open_clip model behind the seam's `forward(batch) -> dict` contract.

    `hook(name, features)`, when given, is applied to the pre-projection features of `image` and `text` before
    they are projected (through `OpenClipTowers`, with the same parameters): plug-ins record them, add heads, or
    replace them (pre-projectors). Without a hook the model's own forward runs, unchanged."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    @property
    def towers(self) -> OpenClipTowers:
        return OpenClipTowers(self.clip)

    def forward(self, batch: dict[str, torch.Tensor], hook=None) -> dict[str, torch.Tensor]:
        if hook is None:
            return self.clip(batch["image"], batch["text"])
        return self.towers.features(batch["image"], batch["text"], hook)


class ImageDecoderMixin:
    """The model's own open_clip preprocessing up to a resized/cropped uint8 image."""

    def _image_setup(self, model_cfg: dict, train: bool) -> None:
        tr, ev = pil_transforms(from_dict(ModelConfig, model_cfg))
        self._transform = tr if train else ev

    def image(self, row: dict) -> np.ndarray:
        return to_uint8_chw(self._transform(open_image(row)))


class ClipDecoder(ImageDecoderMixin, RowDecoder):
    """image bytes -> uint8 [3, H, W] (train: random resized crop; eval: resize + centre crop), one caption
    (`data.text_sampling`: random per epoch, first, or joined) -> open_clip token ids."""

    columns = ("sample_id", "image", "image_uri", "texts")

    def __init__(self, model_cfg: dict, train: bool, text_sampling: str = "random"):
        self.model_cfg, self.train = model_cfg, train
        self.text_sampling = text_sampling if train else "first"

    def output_dtypes(self):
        return {"image": "uint8", "text": "int64"}

    def setup(self):
        self._image_setup(self.model_cfg, self.train)
        self._tokenize = tokenizer(from_dict(ModelConfig, self.model_cfg))

    def decode(self, row, rng):
        return {"image": self.image(row), "text": pick_text(row.get("texts"), self.text_sampling, rng)}

    def collate(self, rows):
        return {"image": np.stack([r["image"] for r in rows]), "text": self._tokens([r["text"] for r in rows])}

    def _tokens(self, texts: list[str]) -> np.ndarray:
        """Token ids, each distinct caption tokenized once per decoder (prompt-like captions repeat across rows
        and epochs; the memo is bounded, so a corpus of unique captions only pays one dict lookup per row)."""
        memo = self.__dict__.setdefault("_memo", {})
        missing = [t for t in dict.fromkeys(texts) if t not in memo]
        if missing:
            if len(memo) + len(missing) > 16384:
                memo.clear()
            memo.update(zip(missing, self._tokenize(missing).numpy().astype(np.int64)))
        return np.stack([memo[t] for t in texts])


def clip_evaluator(recipe: Recipe, encoders, image_decoder: RowDecoder, prompts=None):
    """A rank-0 evaluator for open_clip-style towers: `encoders(model) -> (encode_image, encode_text)`."""
    from medvl.eval.contrastive import ContrastiveEval
    from medvl.eval.heldout import load_heldout
    d, e = recipe.data, recipe.eval
    if d.val_split is None or not e.enabled:
        return None
    dec = image_decoder
    dec.setup()
    corpus = d.val_corpus or d.corpus
    budget = int(e.max_memory_mb * 2**20)
    val = load_heldout(corpus, d.val_split, dec.image, max_rows=e.max_rows, label_field=e.label_field,
                       classnames=e.classnames, max_bytes=budget)
    if val is None:
        return None
    probe = None
    if e.linear_probe and val.labels is not None:
        probe = load_heldout(d.corpus, d.train_split, dec.image, max_rows=e.probe_train_rows,
                             label_field=e.label_field or None, classnames=val.classnames,
                             max_bytes=max(0, budget - val.images.numel()))
    tok = tokenizer(recipe.model)
    ev = ContrastiveEval(val, e, image_norm(recipe.model), tok, probe, prompts)

    def evaluate(model: nn.Module, device) -> dict[str, float]:
        was = model.training
        model.eval()
        try:
            enc_img, enc_txt = encoders(model)
            return ev(enc_img, enc_txt, device)
        finally:
            model.train(was)

    evaluate.heldout = val  # type: ignore[attr-defined]
    evaluate.contrastive = ev  # type: ignore[attr-defined]
    evaluate.pictures = lambda: ev.last_pictures  # type: ignore[attr-defined]  (medvl.eval.pictures)
    return evaluate


def contrastive_metric_names(recipe: Recipe) -> set[str]:
    from medvl.eval.contrastive import ContrastiveEval
    from medvl.eval.heldout import has_labels
    d, e = recipe.data, recipe.eval
    if d.val_split is None or not e.enabled:
        return set()
    return ContrastiveEval.metric_names(e, has_labels(d.val_corpus or d.corpus, e.label_field, e.classnames))


@register_method
class ClipMethod(Method):
    name = "clip"
    feature_keys = ("image_features", "text_features")

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.loss_fn: Any = None
        self._norm: Optional[tuple] = None

    # data
    def decoder(self, train: bool) -> ClipDecoder:
        return ClipDecoder(asdict(self.recipe.model), train, self.recipe.data.text_sampling)

    def prepare_batch(self, batch, device):
        if self._norm is None:
            self._norm = image_norm(self.recipe.model)
        batch["image"] = normalize_images(batch["image"], *self._norm)
        return batch

    # model and loss
    def build_model(self) -> ClipModule:
        return ClipModule(create_model(self.recipe.model, self.recipe.loss.kind))

    def bind(self, dist, device):
        super().bind(dist, device)
        self.loss_fn = build_loss(self.recipe.loss, dist.rank, dist.world)

    def loss(self, out):
        if self.loss_fn is None:
            self.bind(self.dist, self.device)
        return {"loss": compute_loss(self.loss_fn, out)}

    def after_step(self, model):
        clamp_logit_scale(model.clip)

    def train_metrics(self, model):
        return logit_scale_metric(model.clip)

    # evaluation
    def evaluator(self):
        def encoders(model):
            return model.clip.encode_image, model.clip.encode_text
        return clip_evaluator(self.recipe, encoders, self.decoder(train=False))

    def metric_names(self) -> set[str]:
        return contrastive_metric_names(self.recipe)

    # export
    def export(self, model, tracking_uri, run_id):
        from medvl.methods.embedding_pyfunc import log_embedding_model
        log_embedding_model(self, model, tracking_uri, run_id)  # the MLflow model: a pyfunc (images/texts in)
        log_open_clip(self.recipe, model.clip, tracking_uri, run_id)  # and the towers in open_clip's format


def clamp_logit_scale(clip_model: nn.Module) -> None:
    """open_clip's rule after every optimizer step: the logit scale stays in [0, ln 100]."""
    with torch.no_grad():
        clip_model.logit_scale.clamp_(0, math.log(100))


def logit_scale_metric(clip_model: nn.Module) -> dict[str, float]:
    return {"train/logit_scale": float(clip_model.logit_scale.detach().exp())}


def log_open_clip(recipe: Recipe, clip_model: nn.Module, tracking_uri: str, run_id: str) -> None:
    """Log the open_clip model in open_clip's own format as the run's `open_clip/` artifact directory
    (`open_clip.create_model_and_transforms("local-dir:<dir>")` loads it; see `medvl.models.export`)."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from medvl.models.export import write_open_clip_dir
    from medvl.models.factory import model_arch
    arch = dict(model_arch(recipe.model))
    bias = getattr(clip_model, "logit_bias", None)
    if bias is not None:  # SigLIP: open_clip builds the bias parameter only when the config asks for it
        arch["init_logit_bias"] = float(bias.detach().reshape(-1)[0])
    with tempfile.TemporaryDirectory() as d:
        write_open_clip_dir(clip_model, arch, d)
        MlflowClient(tracking_uri).log_artifacts(run_id, d, artifact_path="open_clip")
