"""`method: slice_classifier`: CLISC's 2D slice classifier (tumour / no tumour), a timm CNN trained with
cross-entropy on a corpus whose labels are the CLIP slice labels (`slice_labels` stage; never ground truth).
Its LayerCAM (the `cam` stage) localises the tumour.

    method: slice_classifier
    slice_classifier:
      arch: resnet18              # any timm model name; the reference: resnet50 (channels: null, stem_width: 64)
      channels: [16, 32, 64, 128] # timm ResNet stage widths (a small CPU default); null = the arch's own
      stem_width: 16
      image_size: 96
      label_field: tumour

Rows: the corpus image (a grey PNG slice) -> resized to `image_size` (bilinear) -> 3 identical channels, uint8
(train: random horizontal flip, seeded per sample like every decoder); the label is `labels[label_field]` (0/1).
On the worker the images become float in [0, 1] (the reference applies no further normalisation). Randomly
initialised weights (no download; `pretrained: <file>` loads a local timm state dict, e.g. ImageNet ResNet-50).
The reference head (fc -> 2048-256-ReLU-Dropout(0.5)-2) is `hidden: 256, dropout: 0.5`.

Evaluation at each epoch end: accuracy and balanced accuracy on the validation split against the same CLIP labels
(`val/accuracy`, `val/balanced_accuracy`): agreement with the labeller, not correctness (ground truth is read only
by the `clisc_eval` stage).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvl.config import ConfigError
from medvl.data.decode import RowDecoder
from medvl.methods.base import Method, register_method


@dataclass
class SliceClassifierConfig:
    arch: str = "resnet18"
    """timm model name (`resnet50` as the CLISC reference)."""
    channels: Optional[list[int]] = field(default_factory=lambda: [16, 32, 64, 128])
    """ResNet stage widths passed to timm (small: trains on CPU); null keeps the architecture's own."""
    stem_width: Optional[int] = 16
    """ResNet stem width passed to timm; null keeps the architecture's own."""
    hidden: int = 0
    """> 0: the reference's head, Linear(features, hidden)-ReLU-Dropout-Linear(hidden, 2); 0: one Linear."""
    dropout: float = 0.5
    """Dropout of the hidden head."""
    image_size: int = 96
    """Slices are resized to image_size x image_size."""
    label_field: str = "tumour"
    """The `labels` key holding the 0/1 class (the CLIP label written by `slice_labels`)."""
    pretrained: Optional[str] = field(default=None, metadata={"path": True})
    """A local timm state dict to start from (no download); its classifier weights are left out."""
    flip: bool = True
    """Random horizontal flip while training."""

    def validate(self) -> None:
        if self.image_size < 16:
            raise ConfigError("slice_classifier.image_size must be >= 16")
        if not 0 <= self.dropout < 1:
            raise ConfigError("slice_classifier.dropout must be in [0, 1)")
        import timm
        if not timm.is_model(self.arch):
            raise ConfigError(f"slice_classifier.arch: {self.arch!r} is not a timm model name")


def slice_image(png: bytes, size: int) -> np.ndarray:
    """A corpus slice (grey PNG) -> uint8 [3, size, size]."""
    from PIL import Image
    im = Image.open(io.BytesIO(png)).convert("L").resize((size, size), Image.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return np.repeat(a[None], 3, axis=0)


class SliceDecoder(RowDecoder):
    columns = ("sample_id", "image", "image_uri", "labels")

    def __init__(self, size: int, label_field: str, train: bool, flip: bool):
        self.size, self.label_field, self.train, self.flip = size, label_field, train, flip

    def output_dtypes(self):
        return {"image": "uint8", "label": "int64"}

    def image(self, row: dict) -> np.ndarray:
        data = row.get("image")
        if data is None:
            from medvl.data.corpus import open_file
            with open_file(str(row["image_uri"])) as f:
                data = f.read()
        return slice_image(bytes(data), self.size)

    def decode(self, row, rng):
        raw = row.get("labels")
        labels = {str(k): v for k, v in raw} if raw is not None else {}
        if self.label_field not in labels:
            raise ValueError(f"row {row['sample_id']}: no label {self.label_field!r}")
        img = self.image(row)
        if self.train and self.flip and rng.random() < 0.5:
            img = np.ascontiguousarray(img[:, :, ::-1])
        return {"image": img, "label": int(round(float(labels[self.label_field])))}


class SliceClassifierModule(nn.Module):
    """A timm backbone + head; `forward(batch)` returns logits (and the labels, so accumulation keeps them)."""

    def __init__(self, cfg: SliceClassifierConfig):
        super().__init__()
        import timm
        kw = {}
        if cfg.channels is not None:
            kw["channels"] = tuple(cfg.channels)
        if cfg.stem_width is not None:
            kw["stem_width"] = cfg.stem_width
        self.net = timm.create_model(cfg.arch, pretrained=False, num_classes=0, **kw)
        if cfg.pretrained:
            state = torch.load(cfg.pretrained, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head.", "classifier."))}
            self.net.load_state_dict(state, strict=False)
        nf = self.net.num_features
        self.head = (nn.Sequential(nn.Linear(nf, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                   nn.Linear(cfg.hidden, 2)) if cfg.hidden > 0 else nn.Linear(nf, 2))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.logits(batch["image"]), "label": batch["label"]}


class Logits(nn.Module):
    """`image -> logits` view of the module (what pytorch-grad-cam calls)."""

    def __init__(self, m: SliceClassifierModule):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.logits(x)


@register_method
class SliceClassifierMethod(Method):
    name = "slice_classifier"
    config_cls = SliceClassifierConfig
    feature_keys = ("logits", "label")
    global_keys = ()

    def decoder(self, train: bool) -> SliceDecoder:
        c = self.cfg
        return SliceDecoder(c.image_size, c.label_field, train, c.flip)

    def prepare_batch(self, batch, device):
        batch["image"] = batch["image"].float().div_(255.0)
        return batch

    def build_model(self) -> SliceClassifierModule:
        return SliceClassifierModule(self.cfg)

    def loss(self, out):
        return {"loss": F.cross_entropy(out["logits"].float(), out["label"])}

    def image_features(self, model, images):
        return model.net(images)

    def evaluator(self):
        from medvl.eval.heldout import load_heldout
        d = self.recipe.data
        if d.val_split is None or not self.recipe.eval.enabled:
            return None
        dec = self.decoder(train=False)
        val = load_heldout(d.val_corpus or d.corpus, d.val_split, dec.image, max_rows=self.recipe.eval.max_rows,
                           label_field=self.cfg.label_field, classnames=["no tumour", "tumour"])
        if val is None or val.labels is None:
            return None

        def evaluate(model, device) -> dict[str, float]:
            was = model.training
            model.eval()
            preds = []
            try:
                with torch.no_grad():
                    for i in range(0, len(val.images), 256):
                        x = val.images[i:i + 256].to(device).float().div_(255.0)
                        preds.append(model.logits(x).argmax(-1).cpu())
            finally:
                model.train(was)
            p, y = torch.cat(preds), val.labels.long()
            per = [float((p[y == c] == c).float().mean()) for c in (0, 1) if (y == c).any()]
            return {"val/accuracy": float((p == y).float().mean()), "val/balanced_accuracy": float(np.mean(per))}
        return evaluate

    def metric_names(self) -> set[str]:
        if self.recipe.data.val_split is None or not self.recipe.eval.enabled:
            return set()
        return {"val/accuracy", "val/balanced_accuracy"}

    def export(self, model, tracking_uri, run_id):
        pass  # the pipeline's train stage keeps the model (`model/state.pt`); nothing to log to MLflow


def unwrap(model: nn.Module) -> SliceClassifierModule:
    return getattr(model, "module", model)
