"""CLIP-IT (arXiv 2504.16181, stage 3): an image-only classifier that learns, during training only, to predict the
embedding of the text paired with each image by the `pair` stage; at inference it needs images alone.

    L = CE(logits, y) + λ · mean over rows with a paired text of (1 − cos(t̂, t))

v = backbone(image) (the open_clip image tower of `model.*`, or a timm model), logits = h_v(v) (or, with
`clip_it.fusion: late`, Linear(2C → C) over [h_v(v), h_t(t̂)]), t̂ = h_d(v) (Linear, or a 2-layer MLP with
`kd_layers: 2`), t = the paired text's embedding from the FROZEN text tower of the pairing model
(`clip_it.teacher`), computed under `torch.no_grad` in `Method.forward`, outside the trained (DDP) module: the
teacher is never trained and never in the optimizer. Rows without a paired text (below the pairing cutoff:
`texts = []`) get the CE term only. Unlike the reference code: cross-entropy on logits (one softmax), the teacher
detached, λ exposed (`clip_it.distill_weight`, default 1.0); λ = 0 with `fusion: none` is the unimodal baseline.

Recipe: `method: clip_it`, a corpus written by the `pair` stage (labels + one text per row), the section
`clip_it: {teacher: <pair output>/teacher, ...}` (see `ClipItConfig`). Evaluation (images only): held-out
`val/accuracy`, `val/balanced_accuracy`, `val/auroc` (macro one-vs-rest, scikit-learn). Export: an MLflow pyfunc
model (`ClipItPyfunc`) that takes encoded images and returns class probabilities, with no text encoder inside.

    medvl pipeline jobs/clip_it_digits.yaml          # CLIP -> pair -> distil (README "CLIP-IT")
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvl.config import ConfigError, ModelConfig, Recipe, from_dict
from medvl.data.decode import RowDecoder, normalize_images, open_image, to_uint8_chw
from medvl.methods.base import Method, register_method
from medvl.models.factory import image_norm, model_arch, pil_transforms, tokenizer


@dataclass
class ClipItConfig:
    teacher: str = field(default="", metadata={"path": True})
    """The frozen text encoder: a `pair` stage's `teacher/` directory (bind it: `inputs: {clip_it.teacher:
    pair/teacher}`), or an open_clip weights file (state dict / .safetensors) of architecture `teacher_model`."""
    teacher_model: Optional[str] = None
    """open_clip architecture of a `teacher` weights file (a `teacher/` directory names its own)."""
    backbone: Literal["open_clip", "timm"] = "open_clip"
    """Image backbone: the open_clip image tower of `model.*` (weights from `model.pretrained`, else random), or
    the timm model `timm_model` (random init: nothing is downloaded)."""
    timm_model: Optional[str] = None
    """timm architecture name for `backbone: timm` (e.g. resnet18, vit_tiny_patch16_224); input size from
    `model.*`'s preprocessing."""
    freeze_backbone: bool = False
    """Train the heads only (the backbone's weights stay as loaded)."""
    lora_r: int = 0
    """LoRA rank on the backbone through peft (0: off). With LoRA the backbone's own weights are frozen and only
    the adapters (and the heads) train, as in the paper."""
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    """Backbone module names that get adapters (default: every nn.Linear and nn.Conv2d of the backbone)."""
    kd_layers: int = 1
    """The distillation head h_d: 1 = Linear(feature → text dim), 2 = Linear → GELU → Linear."""
    kd_hidden: int = 512
    """Hidden width of a 2-layer h_d."""
    distill_weight: float = 1.0
    """λ, the weight of the distillation term (0 with `fusion: none` = the unimodal baseline)."""
    fusion: Literal["none", "late"] = "none"
    """`late`: logits = Linear(2C → C)([h_v(v), h_t(t̂)]) with a text head h_t (Linear(text dim → C))."""
    label_field: Optional[str] = None
    """`labels` key holding the class index (default: `eval.label_field`, else the corpus manifest's)."""

    def validate(self) -> None:
        if not self.teacher:
            raise ConfigError("clip_it.teacher: name the frozen text encoder (a pair stage's teacher/ or a file)")
        if self.kd_layers not in (1, 2):
            raise ConfigError("clip_it.kd_layers must be 1 or 2")
        if self.distill_weight < 0:
            raise ConfigError("clip_it.distill_weight must be >= 0")
        if self.lora_r < 0:
            raise ConfigError("clip_it.lora_r must be >= 0 (0: no LoRA)")
        if self.backbone == "timm" and not self.timm_model:
            raise ConfigError("clip_it.timm_model: name the timm architecture for backbone: timm")


# --------------------------------------------------------------------------- the teacher (frozen text tower)


def teacher_model_config(cfg: ClipItConfig) -> ModelConfig:
    p = Path(cfg.teacher)
    if p.is_dir():
        meta = p / "teacher.json"
        if not meta.is_file():
            raise ConfigError(f"clip_it.teacher: {p} has no teacher.json (expected a pair stage's teacher/)")
        return from_dict(ModelConfig, json.loads(meta.read_text())["model"])
    if not p.is_file():
        raise ConfigError(f"clip_it.teacher: {p} not found")
    if not cfg.teacher_model:
        raise ConfigError("clip_it.teacher_model: name the open_clip architecture of the teacher weights file")
    return ModelConfig(name=cfg.teacher_model)


def load_teacher(cfg: ClipItConfig) -> nn.Module:
    """The pairing model (open_clip), frozen and in eval mode; only its text tower is used."""
    from medvl.models.factory import create_model
    mc = teacher_model_config(cfg)
    p = Path(cfg.teacher)
    mc.pretrained = str(p / "model.safetensors") if p.is_dir() else str(p)
    try:
        model = create_model(mc)
    except ConfigError as e:
        raise ConfigError(f"clip_it.teacher: {e}") from None
    model.eval().requires_grad_(False)
    return model


# --------------------------------------------------------------------------- model


def build_backbone(model_cfg: ModelConfig, cfg: ClipItConfig) -> tuple[nn.Module, int]:
    """(backbone, feature size). The open_clip image tower is built alone (no text tower), unless
    `model.pretrained` names a full CLIP checkpoint to take it from."""
    arch = model_arch(model_cfg)
    size = arch["vision_cfg"].get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    if cfg.backbone == "timm":
        import timm
        net = timm.create_model(cfg.timm_model, pretrained=False, num_classes=0, img_size=size) \
            if "vit" in cfg.timm_model else timm.create_model(cfg.timm_model, pretrained=False, num_classes=0)
    elif model_cfg.pretrained:
        from medvl.models.factory import create_model
        net = create_model(model_cfg).visual
    else:
        from open_clip.model import CLIPVisionCfg, _build_vision_tower
        net = _build_vision_tower(arch["embed_dim"], CLIPVisionCfg(**arch["vision_cfg"]),
                                  quick_gelu=arch.get("quick_gelu", False))
    with torch.no_grad():
        was = net.training
        dim = int(net.eval()(torch.zeros(1, 3, size, size)).shape[-1])
        net.train(was)
    if cfg.lora_r > 0:
        from peft import LoraConfig, inject_adapter_in_model
        targets = list(cfg.lora_targets) or [n for n, m in net.named_modules()
                                             if type(m) in (nn.Linear, nn.Conv2d)]
        if not targets:
            raise ConfigError("clip_it.lora_r: the backbone has no nn.Linear / nn.Conv2d to adapt; name "
                              "clip_it.lora_targets")
        net = inject_adapter_in_model(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules=targets), net)
        for n, p in net.named_parameters():  # only the adapters train (the paper: frozen backbone + LoRA)
            p.requires_grad_("lora_" in n)
    elif cfg.freeze_backbone:
        net.requires_grad_(False)
    return net, dim


class ClipItModule(nn.Module):
    """backbone -> h_v (class logits) and h_d (predicted text embedding t̂); optional late fusion."""

    def __init__(self, backbone: nn.Module, feat_dim: int, n_classes: int, text_dim: int, kd_layers: int = 1,
                 kd_hidden: int = 512, fusion: str = "none"):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feat_dim, n_classes)
        self.kd_head = nn.Linear(feat_dim, text_dim) if kd_layers == 1 else nn.Sequential(
            nn.Linear(feat_dim, kd_hidden), nn.GELU(), nn.Linear(kd_hidden, text_dim))
        self.fusion = fusion
        if fusion == "late":
            self.text_head = nn.Linear(text_dim, n_classes)
            self.fuse = nn.Linear(2 * n_classes, n_classes)

    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, t̂) of normalised images: everything inference needs, no text."""
        v = self.backbone(images)
        logits = self.head(v)
        t_hat = self.kd_head(v)
        if self.fusion == "late":
            logits = self.fuse(torch.cat([logits, self.text_head(t_hat)], dim=-1))
        return logits, t_hat

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, t_hat = self.classify(batch["image"])
        return {"logits": logits, "t_hat": t_hat}


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, t_hat: torch.Tensor, t: torch.Tensor,
                 has_text: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
    """{"ce", "kd", "loss"}: CE on logits (one softmax) + weight · mean_{rows with text}(1 − cos(t̂, t))."""
    ce = F.cross_entropy(logits.float(), labels)
    m = has_text.to(torch.float32)
    cos = F.cosine_similarity(t_hat.float(), t.detach().float(), dim=-1)
    kd = ((1.0 - cos) * m).sum() / m.sum().clamp(min=1.0)  # 0 (with a graph) when no row has a text
    return {"ce": ce, "kd": kd, "loss": ce + weight * kd}


# --------------------------------------------------------------------------- data


class ClipItDecoder(RowDecoder):
    """image bytes -> uint8 [3, H, W] (the model's open_clip train / eval transform), the class index (a row
    without one raises: skipped and counted), the paired text tokenised by the teacher's tokenizer, `has_text`."""

    columns = ("sample_id", "image", "image_uri", "texts", "labels")

    def __init__(self, model_cfg: dict, teacher_cfg: Optional[dict], label_field: str, train: bool):
        self.model_cfg, self.teacher_cfg, self.label_field, self.train = model_cfg, teacher_cfg, label_field, train

    def output_dtypes(self):
        return {"image": "uint8", "text": "int64", "has_text": "bool", "label": "int64"}

    def setup(self):
        tr, ev = pil_transforms(from_dict(ModelConfig, self.model_cfg))
        self._transform = tr if self.train else ev
        self._tokenize = tokenizer(from_dict(ModelConfig, self.teacher_cfg)) if self.teacher_cfg else None

    def image(self, row: dict) -> np.ndarray:
        return to_uint8_chw(self._transform(open_image(row)))

    def decode(self, row, rng):
        labels = {str(k): v for k, v in (row.get("labels") or [])}
        if self.label_field not in labels:
            raise ValueError(f"no class: labels has no {self.label_field!r}")
        texts = [t for t in (row.get("texts") or []) if isinstance(t, str) and t.strip()]
        return {"image": self.image(row), "label": int(labels[self.label_field]),
                "text": texts[0] if texts else "", "has_text": bool(texts)}

    def collate(self, rows):
        out = {"image": np.stack([r["image"] for r in rows]).astype(np.uint8, copy=False),
               "label": np.asarray([r["label"] for r in rows], np.int64),
               "has_text": np.asarray([r["has_text"] for r in rows], bool)}
        if self._tokenize is not None:
            out["text"] = self._tokenize([r["text"] for r in rows]).numpy().astype(np.int64)
        else:
            out["text"] = np.zeros((len(rows), 1), np.int64)
        return out


# --------------------------------------------------------------------------- the method


@register_method
class ClipItMethod(Method):
    name = "clip_it"
    config_cls = ClipItConfig
    feature_keys = ("logits", "t_hat", "t", "label", "has_text")
    global_keys = ()

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self._norm: Optional[tuple] = None
        self._teacher: Optional[nn.Module] = None
        self._classes: Optional[tuple[str, list[str]]] = None

    @property
    def cfg(self) -> ClipItConfig:
        return self.recipe.section(self.name) or ClipItConfig()

    def classes(self) -> tuple[str, list[str]]:
        """(label field, class names) from the recipe, else the corpus manifest."""
        if self._classes is None:
            from medvl.eval.heldout import labels_info
            lf, names = labels_info(self.recipe.data.corpus, self.cfg.label_field or self.recipe.eval.label_field,
                                    list(self.recipe.eval.classnames))
            if not lf or not names:
                raise ConfigError(f"clip_it: {self.recipe.data.corpus} has no class labels (label_field and "
                                  f"classnames in its manifest, or eval.label_field + eval.classnames)")
            self._classes = (lf, names)
        return self._classes

    # data
    def decoder(self, train: bool) -> ClipItDecoder:
        return ClipItDecoder(asdict(self.recipe.model), asdict(teacher_model_config(self.cfg)),
                             self.classes()[0], train)

    def prepare_batch(self, batch, device):
        if self._norm is None:
            self._norm = image_norm(self.recipe.model)
        batch["image"] = normalize_images(batch["image"], *self._norm)
        return batch

    # model and loss
    def text_dim(self) -> int:
        return int(model_arch(teacher_model_config(self.cfg))["embed_dim"])

    def build_model(self) -> ClipItModule:
        c = self.cfg
        backbone, dim = build_backbone(self.recipe.model, c)
        return ClipItModule(backbone, dim, len(self.classes()[1]), self.text_dim(), c.kd_layers, c.kd_hidden,
                            c.fusion)

    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = load_teacher(self.cfg)
        return self._teacher.to(self.device)

    def forward(self, model, batch):
        out = model(batch)
        with torch.no_grad():  # the frozen teacher: no graph, never trained, outside DDP and the optimizer
            t = self.teacher().encode_text(batch["text"]).float()
        out["t"] = t.detach()
        out["label"] = batch["label"]
        out["has_text"] = batch["has_text"]
        return out

    def loss(self, out):
        return distill_loss(out["logits"], out["label"], out["t_hat"], out["t"], out["has_text"],
                            self.cfg.distill_weight)

    def loss_terms(self):
        return ("ce", "kd")

    def image_features(self, model, images):
        return model.backbone(images)

    # evaluation
    def evaluator(self):
        from medvl.eval.heldout import load_heldout
        d, e = self.recipe.data, self.recipe.eval
        if d.val_split is None or not e.enabled:
            return None
        dec = self.decoder(train=False)
        dec.setup()
        lf, names = self.classes()
        val = load_heldout(d.val_corpus or d.corpus, d.val_split, dec.image, max_rows=e.max_rows,
                           label_field=lf, classnames=names, max_bytes=int(e.max_memory_mb * 2**20))
        if val is None or val.labels is None:
            return None
        norm = image_norm(self.recipe.model)

        def evaluate(model: nn.Module, device) -> dict[str, float]:
            was = model.training
            model.eval()
            try:
                prob = predict_proba(model, val.images, norm, device)
            finally:
                model.train(was)
            return {f"val/{k}": v for k, v in classification_metrics(val.labels.numpy(), prob).items()}

        return evaluate

    def metric_names(self) -> set[str]:
        d, e = self.recipe.data, self.recipe.eval
        if d.val_split is None or not e.enabled:
            return set()
        return {"val/accuracy", "val/balanced_accuracy", "val/auroc"}

    # export
    def export(self, model, tracking_uri, run_id):
        export_pyfunc(model, self, tracking_uri, run_id)


@torch.no_grad()
def predict_proba(model: ClipItModule, images_u8: torch.Tensor, norm, device, batch_size: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = normalize_images(images_u8[i:i + batch_size].to(device), *norm)
        out.append(torch.softmax(model.classify(x)[0].float(), dim=-1).cpu())
    return torch.cat(out).numpy()


def classification_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """accuracy, balanced accuracy (macro recall) and macro one-vs-rest AUROC (scikit-learn)."""
    from sklearn.metrics import balanced_accuracy_score

    from medvl.eval.transfer import classification_scores
    s = classification_scores(y, prob, multilabel=False)
    return {"accuracy": s["accuracy"], "balanced_accuracy": float(balanced_accuracy_score(y, prob.argmax(1))),
            "auroc": s["auc"]}


# --------------------------------------------------------------------------- export: images in, probabilities out


class ClipItPyfunc:
    """The MLflow pyfunc model (`mlflow.pyfunc.load_model(uri).predict(df)`).

    Input: a pandas DataFrame with a column `image` holding encoded images (PNG/JPEG/... bytes, or the same bytes
    base64-encoded as a str). Output: a DataFrame of class probabilities, one column `p_<class>` per class, rows in
    input order. Inside: the image backbone and the classification heads only (no text encoder: t̂ comes from
    h_d); preprocessing is the model's own eval transform (resize + centre crop + normalisation)."""

    def load_context(self, context) -> None:
        from safetensors.torch import load_file
        cfg = json.loads(Path(context.artifacts["config"]).read_text())
        self.model_cfg = from_dict(ModelConfig, cfg["model"])
        self.model_cfg.pretrained = None
        c = from_dict(ClipItConfig, cfg["clip_it"])
        backbone, dim = build_backbone(self.model_cfg, c)
        self.model = ClipItModule(backbone, dim, len(cfg["classnames"]), cfg["text_dim"], c.kd_layers, c.kd_hidden,
                                  c.fusion)
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model.eval()
        self.classnames = cfg["classnames"]
        self.norm = image_norm(self.model_cfg)
        self.transform = pil_transforms(self.model_cfg)[1]

    def predict(self, context, model_input, params=None):
        import base64

        import pandas as pd
        imgs = []
        for i, v in enumerate(model_input["image"]):
            data = base64.b64decode(v) if isinstance(v, str) else bytes(v)
            try:
                imgs.append(torch.from_numpy(to_uint8_chw(self.transform(open_image({"image": data})))))
            except Exception as e:  # noqa: BLE001 - name the row that is not an image
                raise ValueError(f"row {i}: column 'image' is not a decodable image ({e})") from None
        prob = predict_proba(self.model, torch.stack(imgs), self.norm, "cpu")
        return pd.DataFrame(prob, columns=[f"p_{n}" for n in self.classnames])


def export_pyfunc(model: ClipItModule, method: ClipItMethod, tracking_uri: str, run_id: str,
                  name: str = "model") -> None:
    """Log `model` as an MLflow pyfunc (`ClipItPyfunc`) with a signature: binary `image` in, `p_<class>` out."""
    import tempfile

    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from safetensors.torch import save_file

    from medvl.models.factory import unwrap
    model = unwrap(model)
    names = method.classes()[1]
    sig = ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                         outputs=Schema([ColSpec("float", f"p_{n}") for n in names]))
    with tempfile.TemporaryDirectory() as tmp:
        w, cfgf = Path(tmp) / "weights.safetensors", Path(tmp) / "config.json"
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(w))
        cfgf.write_text(json.dumps({"model": asdict(method.recipe.model), "clip_it": asdict(method.cfg),
                                    "classnames": names, "text_dim": method.text_dim()}))
        import medvl
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            from medvl.methods.clip_it_pyfunc import ClipItPyfuncModel
            # medvl travels with the model (code_paths): loading needs torch, open_clip and timm, not a checkout
            from medvl.methods.embedding_pyfunc import example_png
            mlflow.pyfunc.log_model(name=name, python_model=ClipItPyfuncModel(), signature=sig,
                                    input_example=pd.DataFrame({"image": [example_png()]}),
                                    artifacts={"weights": str(w), "config": str(cfgf)},
                                    code_paths=[str(Path(medvl.__file__).parent)],
                                    pip_requirements=PYFUNC_REQUIREMENTS)


PYFUNC_REQUIREMENTS = ["torch", "open_clip_torch", "timm", "safetensors", "pillow", "pandas", "scikit-learn"]
"""What the exported model needs (listed, so mlflow does not spend a subprocess inferring it)."""
