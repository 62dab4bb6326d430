"""CXR-CLIP (You et al., MICCAI 2023, arXiv 2310.13292): CLIP for chest X-rays with two images and two texts per
study, image-image (ICL) and text-text (TCL) contrast, and label -> prompt "reports" for label-only data.

    medvl train jobs/cxr_clip_digits.yaml                  # the label-only path on the digits (runs here)
    medvl train jobs/cxr_clip_mimic.yaml                   # MIMIC-CXR (see the recipe for the corpus layout)
    medvl compare jobs/digits_clip.yaml jobs/cxr_clip_digits.yaml

Per study the decoder emits two images and two texts:
* images: two distinct images of the study when it has more than one (`image` + `other_images`, see
  `medvl.data.ingest_cxr`), else two augmentations of its one image. Augmentation (train): random resized crop
  (scale `crop_scale`), CLAHE with probability `clahe_p` (scikit-image `equalize_adapthist`, clip limit drawn from
  `clahe_clip_limit` in albumentations/OpenCV units), colour jitter; eval: the model's resize + centre crop.
* texts: two report sections drawn with replacement (`text_source: report`), or two independently drawn prompt
  "reports" (`labels`): one sentence per label from the prompts file ({class: {pos, neg, unc}}), positives /
  negatives / uncertain, plus `num_negs` random unmentioned classes as negatives, shuffled; validation is
  deterministic (the first `pos` sentence of each positive, "No Finding" when there is none). `auto` takes the
  labels for corpora whose texts are label summaries (manifest `text_kind: labels`) and the sections otherwise.

Loss (every term through `medvl.losses.contrastive_term`: local rows vs all-gathered columns, labels offset by rank,
each feature set gathered once; one shared learnable temperature, not clamped by default as in the reference):

    L_CLIP = 1/4 sum_{I in (I1, I2), T in (T1, T2)} 1/2 [CE(s I T_all) + CE(s T I_all)]
    ICL    = 1/2 [CE(s I1 I2_all) + CE(s I2 I1_all)];   TCL = 1/2 [CE(s T1 T2_all) + CE(s T2 T1_all)]
    L      = L_CLIP + w_icl ICL + w_tcl TCL            (logged: train/clip, train/icl, train/tcl, train/loss)

Evaluation (rank 0, every epoch; `metric_names()` lists exactly these): image -> text and text -> image retrieval
over the unique held-out texts (R@k and mean rank); zero-shot classification by the mean similarity over each
class's prompts (single-label corpora, or multi-label rows positive for exactly one of `zero_shot_classes`: CheXpert
5x200 style); binary findings with `["No {x}", "{x}"]` prompt pairs scored by AUROC (multi-label corpora); the
linear probe on frozen image features at `eval.probe_label_fraction` (accuracy, or mean AUROC for findings).

Reference-code bugs not reproduced: the train-time sentence shuffle there never writes back (a no-op; here
`shuffle_sentences`, off by default as the reference effectively runs), and its >2-view branch overwrites its own
image list (here: two distinct images of the study). Not here: back-translation (needs MarianMT weights).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvl.config import ConfigError, ModelConfig, Recipe, from_dict
from medvl.data.decode import RowDecoder, normalize_images, open_image, to_uint8_chw
from medvl.losses import Dist, contrastive_term, gather_with_grad
from medvl.methods.base import Method, register_method
from medvl.methods.clip import ClipModule, log_open_clip
from medvl.models.factory import create_model, image_norm, model_arch, pil_transforms, tokenizer

DEFAULT_PROMPTS = Path(__file__).parent / "prompts" / "cxr_prompts.json"
"""Prompt sentences for the 14 CheXpert observations and the ChestX-ray14 findings (written for medvl)."""
NO_FINDING = "No Finding"
POLARITIES = ("pos", "neg", "unc")


@dataclass
class CxrClipConfig:
    w_icl: float = 1.0
    """Weight of the image-image term (ICL: view 1 vs view 2)."""
    w_tcl: float = 0.5
    """Weight of the text-text term (TCL: text 1 vs text 2)."""
    text_source: Literal["auto", "report", "labels"] = "auto"
    """Where the two texts come from: `report` sections, prompt `labels`, or `auto` (labels when the corpus' texts
    are label summaries, manifest `text_kind: labels`; else the sections, falling back to labels per row)."""
    prompts: Optional[str] = field(default=None, metadata={"path": True})
    """Prompts file, JSON {class: {"pos": [...], "neg": [...], "unc": [...]}}; default: the package's CheXpert +
    ChestX-ray14 sentences (`medvl/methods/prompts/cxr_prompts.json`)."""
    num_negs: int = 0
    """Extra negative classes per prompt report, drawn from the classes the row does not mention (the reference
    uses 3 for ChestX-ray14, 0 for CheXpert)."""
    shuffle_sentences: bool = False
    """Shuffle the sentences of report texts in training (the reference's intended but no-op augmentation)."""
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.1])
    """RandomResizedCrop area range (reference: [0.8, 1.1] on images pre-resized to a 512 short side)."""
    clahe_p: float = 0.5
    """Probability of CLAHE per view (albumentations' default p of the reference's CLAHE)."""
    clahe_clip_limit: list[float] = field(default_factory=lambda: [1.0, 4.0])
    """CLAHE clip limit range in albumentations/OpenCV units (the reference's `clip_limit: 4.0` samples [1, 4]);
    scikit-image's `equalize_adapthist` receives limit / 256 with 256 bins and 8 x 8 tiles, the same clipping."""
    clahe_grid: int = 8
    """CLAHE tiles per image side (albumentations' tile_grid_size (8, 8)); small images may want fewer, larger
    tiles (a 32 px digit has 4 px tiles at 8)."""
    color_jitter: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.2, 0.1])
    """torchvision ColorJitter(brightness, contrast, saturation, hue)."""
    max_logit_scale: Optional[float] = None
    """Clamp the logit scale to at most this value after each step (None: no clamp, as in the reference)."""
    zero_shot_ensemble: Literal["similarity", "embedding"] = "similarity"
    """Zero-shot class score: mean cosine similarity over the class's prompts (CXR-CLIP), or CLIP's normalised
    mean prompt embedding."""
    eval_prompts: Optional[str] = field(default=None, metadata={"path": True})
    """Zero-shot prompts, JSON {class: [sentences]}; default: `eval.templates` filled with the class names."""
    zero_shot_classes: list[str] = field(default_factory=list)
    """Multi-label corpora: classify the held-out rows positive for exactly one of these classes among them
    (CheXpert 5x200: Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion)."""
    findings: Optional[list[str]] = None
    """Findings scored by AUROC with prompt pairs; None: every class of a multi-label corpus but No Finding."""
    finding_prompts: list[str] = field(default_factory=lambda: ["No {}", "{}"])
    """The (negative, positive) prompt templates of a finding."""
    auroc_missing_as_negative: bool = True
    """Rows that do not mention a finding count as its negatives (ChestX-ray14, IU list positives only)."""

    def validate(self) -> None:
        checks = [
            (self.w_icl >= 0, "cxr_clip.w_icl must be >= 0"),
            (self.w_tcl >= 0, "cxr_clip.w_tcl must be >= 0"),
            (self.num_negs >= 0, "cxr_clip.num_negs must be >= 0"),
            (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1],
             f"cxr_clip.crop_scale must be [low, high] with 0 < low <= high, got {self.crop_scale}"),
            (0 <= self.clahe_p <= 1, "cxr_clip.clahe_p must be in [0, 1]"),
            (self.clahe_grid >= 1, "cxr_clip.clahe_grid must be >= 1"),
            (len(self.clahe_clip_limit) == 2 and 0 < self.clahe_clip_limit[0] <= self.clahe_clip_limit[1],
             f"cxr_clip.clahe_clip_limit must be [low, high] with 0 < low <= high, got {self.clahe_clip_limit}"),
            (len(self.color_jitter) == 4 and all(v >= 0 for v in self.color_jitter) and self.color_jitter[3] <= 0.5,
             f"cxr_clip.color_jitter must be [brightness, contrast, saturation, hue>=0,<=0.5], got {self.color_jitter}"),
            (self.max_logit_scale is None or self.max_logit_scale > 1, "cxr_clip.max_logit_scale must be > 1"),
            (len(self.finding_prompts) == 2 and all("{}" in t for t in self.finding_prompts),
             f"cxr_clip.finding_prompts must be two templates with {{}}, got {self.finding_prompts}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


# ----------------------------------------------------------------------------------------------------------- prompts


def load_prompts(path: Optional[str | Path] = None) -> dict[str, dict[str, list[str]]]:
    """Read and check a prompts file: {class: {"pos": [...], "neg": [...], "unc": [...]}} (lists may be missing or
    empty: that polarity then contributes no sentence). Errors name the file and the key."""
    p = Path(path) if path else DEFAULT_PROMPTS
    if not p.is_file():
        raise ConfigError(f"cxr_clip.prompts: {p} not found")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"cxr_clip.prompts: {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"cxr_clip.prompts: {p} must be a non-empty mapping class -> {{pos, neg, unc}}")
    out = {}
    for cls, entry in data.items():
        if not isinstance(entry, dict) or set(entry) - set(POLARITIES):
            raise ConfigError(f"cxr_clip.prompts: {p}: {cls!r} must map to {{pos, neg, unc}} lists, got {entry!r}")
        out[cls] = {}
        for pol in POLARITIES:
            sents = entry.get(pol, [])
            if not isinstance(sents, list) or not all(isinstance(s, str) and s.strip() for s in sents):
                raise ConfigError(f"cxr_clip.prompts: {p}: {cls}.{pol} must be a list of non-empty sentences")
            out[cls][pol] = [s.strip() for s in sents]
    return out


def label_dict(value: Any) -> dict[str, float]:
    """A row's `labels` as a dict, whatever container the reader produced (dict, list of pairs, 2-D array)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    return {str(k): float(v) for k, v in value}


@dataclass
class PromptReports:
    """Label -> prompt "report" (one sentence per label). Picklable (lives in the decoder)."""
    prompts: dict[str, dict[str, list[str]]]
    classnames: list[str]
    """The corpus' classes (the pool of extra negatives; for single-label corpora, index -> name)."""
    label_field: Optional[str] = None
    """Single-label corpora: the `labels` key holding the class index."""
    num_negs: int = 0

    def polarities(self, labels: Any) -> tuple[list[str], list[str], list[str]]:
        lab = label_dict(labels)
        if self.label_field:
            if self.label_field not in lab:
                raise ValueError(f"labels.{self.label_field}: missing")
            idx = int(lab[self.label_field])
            if not 0 <= idx < len(self.classnames):
                raise ValueError(f"labels.{self.label_field}: class index {idx} outside 0..{len(self.classnames) - 1}")
            return [self.classnames[idx]], [], []
        pos, neg, unc = [], [], []
        for k, v in lab.items():
            if v == 1.0:
                pos.append(k)
            elif v == 0.0:
                neg.append(k)
            elif v == -1.0:
                unc.append(k)
            else:
                raise ValueError(f"labels.{k}: unknown label value {v!r} (expected 1, 0 or -1)")
        return pos, neg, unc

    def report(self, labels: Any, rng: Optional[np.random.Generator], deterministic: bool = False) -> str:
        pos, neg, unc = self.polarities(labels)
        if deterministic:  # validation: positives only, first sentence each, "No Finding" when none
            pos = pos or [NO_FINDING]
            sents = [self.prompts[c]["pos"][0] for c in pos if self.prompts.get(c, {}).get("pos")]
        else:
            assert rng is not None
            if self.num_negs:
                mentioned = set(pos) | set(neg) | set(unc)
                pool = [c for c in self.classnames if c not in mentioned and c != NO_FINDING
                        and self.prompts.get(c, {}).get("neg")]
                if pool:
                    pick = rng.choice(len(pool), size=min(self.num_negs, len(pool)), replace=False)
                    neg = neg + [pool[i] for i in sorted(pick)]
            sents = []
            for pol, classes in (("pos", pos), ("neg", neg), ("unc", unc)):
                for c in classes:
                    cands = self.prompts.get(c, {}).get(pol)
                    if cands:
                        sents.append(cands[int(rng.integers(len(cands)))])
            sents = [sents[i] for i in rng.permutation(len(sents))]
        if not sents:
            raise ValueError(f"no prompt sentence for labels {label_dict(labels)} (classes missing from the prompts "
                             "file?)")
        return " ".join(sents)

    def check_covers(self, where: str) -> None:
        """Every corpus class needs `pos` sentences (the deterministic report of a class uses the first)."""
        missing = [c for c in self.classnames if not self.prompts.get(c, {}).get("pos")]
        if missing:
            raise ConfigError(f"cxr_clip.prompts: {where} has no `pos` sentences for class(es) "
                              f"{', '.join(map(repr, missing))} of the corpus (its classes: {', '.join(self.classnames)})")


_SENT = re.compile(r"(?<=[.!?])\s+")


def shuffle_sentences(text: str, rng: np.random.Generator) -> str:
    parts = [s for s in _SENT.split(text) if s.strip()]
    return " ".join(parts[i] for i in rng.permutation(len(parts))) if len(parts) > 1 else text


def text_mode(text_source: str, text_kind: str) -> str:
    """`report` or `labels` for a corpus whose manifest says `text_kind`."""
    if text_source != "auto":
        return text_source
    return "labels" if text_kind == "labels" else "report"


# ----------------------------------------------------------------------------------------------------------- data


def _image_size(model_cfg: dict) -> int | tuple[int, int]:
    size = model_arch(from_dict(ModelConfig, model_cfg)).get("vision_cfg", {}).get("image_size", 224)
    return tuple(size) if isinstance(size, (list, tuple)) else int(size)


def clahe(img, clip_limit: float, grid: int = 8):
    """CLAHE with scikit-image on a PIL image (greyscale: the grey level; colour: HSV value) with `grid` x `grid`
    tiles; `clip_limit` in albumentations/OpenCV units (their limit is relative to the mean bin count,
    scikit-image's to the tile size, hence / 256 with 256 bins)."""
    from PIL import Image
    from skimage.exposure import equalize_adapthist
    arr = np.asarray(img)
    kernel = tuple(max(1, s // grid) for s in arr.shape[:2])
    gray = arr.ndim == 2 or (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]))
    if gray:
        g = arr if arr.ndim == 2 else arr[..., 0]
        out = equalize_adapthist(g, kernel_size=kernel, clip_limit=clip_limit / 256.0, nbins=256)
        return Image.fromarray(np.round(out * 255).astype(np.uint8)).convert("RGB")
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 2] = np.round(equalize_adapthist(hsv[..., 2], kernel_size=kernel, clip_limit=clip_limit / 256.0,
                                              nbins=256) * 255)
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


def study_images(row: dict) -> list[dict]:
    """The study's images: the primary one, then `other_images` (each a dict with image bytes or image_uri)."""
    out = [row]
    others = row.get("other_images")
    if others is not None:
        out += [o for o in others if isinstance(o, dict) and (o.get("image") or o.get("image_uri"))]
    return out


class CxrClipDecoder(RowDecoder):
    """Study row -> two uint8 views (`image`, `image2`) and two token sequences (`text`, `text2`)."""

    columns = ("sample_id", "image", "image_uri", "other_images", "texts", "labels")

    def __init__(self, model_cfg: dict, cfg: dict, train: bool, mode: str, reports: Optional[PromptReports]):
        self.model_cfg, self.cfg, self.train, self.mode, self.reports = model_cfg, cfg, train, mode, reports

    def output_dtypes(self):
        return {"image": "uint8", "image2": "uint8", "text": "int64", "text2": "int64"}

    def setup(self):
        from torchvision import transforms as T
        mc = from_dict(ModelConfig, self.model_cfg)
        self._eval = pil_transforms(mc)[1]
        c = self.cfg
        self._crop = T.RandomResizedCrop(_image_size(self.model_cfg), scale=tuple(c["crop_scale"]),
                                         interpolation=T.InterpolationMode.BICUBIC)
        self._jitter = T.ColorJitter(*c["color_jitter"])
        self._tokenize = tokenizer(mc)

    # images
    def image(self, row: dict) -> np.ndarray:
        """The eval view of the study's primary image (held-out evaluation)."""
        return to_uint8_chw(self._eval(open_image(row)))

    def augment(self, img, rng: np.random.Generator) -> np.ndarray:
        img = self._crop(img)  # torch's generator: seeded per (seed, epoch, sample) by the seam
        c = self.cfg
        if rng.random() < c["clahe_p"]:
            img = clahe(img, float(rng.uniform(*c["clahe_clip_limit"])), c["clahe_grid"])
        return to_uint8_chw(self._jitter(img))

    def views(self, row: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        imgs = study_images(row)
        if not self.train:
            a = self.image(imgs[0])
            return a, (self.image(imgs[1]) if len(imgs) > 1 else a)
        if len(imgs) > 1:  # two distinct images of the study (two views)
            i, j = rng.choice(len(imgs), size=2, replace=False)
            return self.augment(open_image(imgs[i]), rng), self.augment(open_image(imgs[j]), rng)
        img = open_image(imgs[0])  # one image, augmented twice
        return self.augment(img, rng), self.augment(img, rng)

    # texts
    def texts(self, row: dict, rng: np.random.Generator) -> tuple[str, str]:
        texts = row.get("texts")
        sections = [t for t in (texts if texts is not None else []) if isinstance(t, str) and t.strip()]
        if self.mode == "report" and sections:
            if not self.train:
                return sections[0], sections[min(1, len(sections) - 1)]
            i, j = rng.integers(len(sections), size=2)  # with replacement, as the reference
            t1, t2 = sections[int(i)], sections[int(j)]
            if self.cfg["shuffle_sentences"]:
                t1, t2 = shuffle_sentences(t1, rng), shuffle_sentences(t2, rng)
            return t1, t2
        if self.reports is None:
            raise ValueError("row has no report text and the method has no prompts for its labels")
        labels = row.get("labels")
        if not self.train:
            t = self.reports.report(labels, None, deterministic=True)
            return t, t
        return self.reports.report(labels, rng), self.reports.report(labels, rng)  # two independent draws

    def decode(self, row, rng):
        image, image2 = self.views(row, rng)
        text, text2 = self.texts(row, rng)
        return {"image": image, "image2": image2, "text": text, "text2": text2}

    def collate(self, rows):
        tok = self._tokenize
        return {"image": np.stack([r["image"] for r in rows]), "image2": np.stack([r["image2"] for r in rows]),
                "text": tok([r["text"] for r in rows]).numpy().astype(np.int64),
                "text2": tok([r["text2"] for r in rows]).numpy().astype(np.int64)}


# ----------------------------------------------------------------------------------------------------------- model


class CxrClipModule(ClipModule):
    """An open_clip model encoding both views and both texts in one forward (one DDP call, one tower pass each).
    With `hook`, the pre-projection features are offered as `image`, `image2`, `text`, `text2` (plug-ins)."""

    def forward(self, batch: dict[str, torch.Tensor], hook=None) -> dict[str, torch.Tensor]:
        b = batch["image"].shape[0]
        img = torch.cat([batch["image"], batch["image2"]])
        txt = torch.cat([batch["text"], batch["text2"]])
        if hook is None:
            i = self.clip.encode_image(img, normalize=True)
            t = self.clip.encode_text(txt, normalize=True)
        else:
            tw = self.towers
            ip, tp = tw.image_pre(img), tw.text_pre(txt)
            ip = torch.cat([hook("image", ip[:b]), hook("image2", ip[b:])])
            tp = torch.cat([hook("text", tp[:b]), hook("text2", tp[b:])])
            i, t = F.normalize(tw.image_proj(ip), dim=-1), F.normalize(tw.text_proj(tp), dim=-1)
        return {"image_features": i[:b], "image2_features": i[b:], "text_features": t[:b], "text2_features": t[b:],
                "logit_scale": self.clip.logit_scale.exp()}


def cxr_clip_loss(out: dict[str, torch.Tensor], w_icl: float = 1.0, w_tcl: float = 0.5,
                  dist: Dist = Dist()) -> dict[str, torch.Tensor]:
    """The CXR-CLIP loss terms (see the module docstring) and their total under "loss"."""
    s = out["logit_scale"]
    f = {k: out[f"{k}_features"] for k in ("image", "image2", "text", "text2")}
    g = {k: gather_with_grad(v, dist) for k, v in f.items()}  # one all-gather per feature set

    def term(a: str, b: str) -> torch.Tensor:
        return contrastive_term(f[a], f[b], s, dist, a_all=g[a], b_all=g[b])

    clip = (term("image", "text") + term("image2", "text") + term("image", "text2") + term("image2", "text2")) / 4
    icl, tcl = term("image", "image2"), term("text", "text2")
    return {"loss": clip + w_icl * icl + w_tcl * tcl, "clip": clip, "icl": icl, "tcl": tcl}


# ----------------------------------------------------------------------------------------------------------- eval


@dataclass
class EvalPlan:
    """What the evaluator computes for a recipe (shared by `metric_names` and the evaluator, so they agree)."""
    corpus: str
    mode: str
    label_field: Optional[str]
    classnames: list[str]
    """Single-label zero-shot classes (from the manifest/recipe), or `zero_shot_classes` for multi-label."""
    multilabel_zero_shot: bool
    findings: list[str]

    @classmethod
    def build(cls, recipe: Recipe) -> Optional["EvalPlan"]:
        from medvl.data.corpus import load_manifest
        d, e, c = recipe.data, recipe.eval, recipe.section("cxr_clip")
        if d.val_split is None or not e.enabled:
            return None
        corpus = d.val_corpus or d.corpus
        m = load_manifest(corpus)
        lf = e.label_field or m.label_field
        classes = list(e.classnames or m.classnames)
        if lf and classes:  # single-label corpus: zero-shot over its classes, no findings
            return cls(corpus, text_mode(c.text_source, m.text_kind), lf, classes, False, [])
        findings = list(c.findings) if c.findings is not None else [x for x in m.classnames if x != NO_FINDING]
        zs = list(c.zero_shot_classes)
        return cls(corpus, text_mode(c.text_source, m.text_kind), None, zs, bool(zs), findings)

    def metric_names(self, recipe: Recipe) -> set[str]:
        from medvl.eval.findings import findings_metric_names
        from medvl.eval.retrieval import retrieval_metric_names
        from medvl.eval.zeroshot import ZERO_SHOT_METRICS
        e = recipe.eval
        names = {"val/rows"} | retrieval_metric_names(e.retrieval_ks)
        if self.classnames:
            names |= set(ZERO_SHOT_METRICS)
        names |= findings_metric_names(self.findings)
        if e.linear_probe:
            if self.label_field:
                names.add("val/linear_probe_accuracy")
            elif self.findings:
                names.add("val/linear_probe_auroc_mean")
        return names


class CxrClipEval:
    """Rank-0 evaluator: held-out rows decoded once, then retrieval, zero-shot, findings AUROC, linear probe."""

    def __init__(self, recipe: Recipe, plan: EvalPlan, decoder: CxrClipDecoder, reports: Optional[PromptReports]):
        from medvl.eval.findings import finding_targets
        from medvl.eval.heldout import load_heldout
        self.recipe, self.plan, self.cfg = recipe, plan, recipe.section("cxr_clip")
        e = recipe.eval
        decoder.setup()
        self.val = load_heldout(plan.corpus, recipe.data.val_split, decoder.image, max_rows=e.max_rows,
                                label_field=plan.label_field, classnames=plan.classnames if plan.label_field else [])
        if self.val is None:
            return
        maps = self.val.label_maps
        # retrieval texts: the row's first section, or its deterministic prompt report (label-only rows)
        caps = []
        for texts, lab in zip(self.val.texts, maps):
            sections = [t for t in texts if t.strip()]
            cap = sections[0] if plan.mode == "report" and sections else None
            if cap is None and reports is not None:
                try:
                    cap = reports.report(lab, None, deterministic=True)
                except ValueError:  # a row whose labels have no prompt: its own text, like CLIP
                    cap = None
            caps.append(cap if cap is not None else (sections or [""])[0])
        self.unique = sorted(set(caps))
        index = {c: i for i, c in enumerate(self.unique)}
        self.caption_ids = torch.tensor([index[c] for c in caps])
        # zero-shot targets
        self.zs_labels = self.val.labels
        if plan.multilabel_zero_shot:
            ys = []
            for lab in maps:
                hits = [i for i, c in enumerate(plan.classnames) if float(lab.get(c, 0.0)) == 1.0]
                ys.append(hits[0] if len(hits) == 1 else -1)
            self.zs_labels = torch.tensor(ys)
        self.targets = finding_targets(maps, plan.findings, self.cfg.auroc_missing_as_negative) \
            if plan.findings else None
        self.prompts: Any = list(e.templates)
        if self.cfg.eval_prompts:
            p = Path(self.cfg.eval_prompts)
            try:
                self.prompts = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError) as ex:
                raise ConfigError(f"cxr_clip.eval_prompts: cannot read {p} ({ex})") from None
            missing = [c for c in plan.classnames if not self.prompts.get(c)]
            if missing:
                raise ConfigError(f"cxr_clip.eval_prompts: {p} has no prompts for {missing}")
        self.probe_train = None
        if e.linear_probe and (plan.label_field or plan.findings):
            self.probe_train = load_heldout(recipe.data.corpus, recipe.data.train_split, decoder.image,
                                            max_rows=e.probe_train_rows, label_field=plan.label_field,
                                            classnames=plan.classnames if plan.label_field else [])
        self.norm = image_norm(recipe.model)
        self.tokenize = tokenizer(recipe.model)

    last_pictures: Optional[dict] = None

    def pictures(self) -> Optional[dict]:
        return self.last_pictures

    @torch.no_grad()
    def __call__(self, model: nn.Module, device) -> dict[str, float]:
        from medvl.eval.findings import auroc_metrics, finding_scores, finding_targets
        from medvl.eval.pictures import picture_data
        from medvl.eval.probe import linear_probe, linear_probe_multilabel
        from medvl.eval.retrieval import retrieval_metrics
        from medvl.eval.zeroshot import class_embeddings, encode_images, encode_texts, zero_shot_metrics
        names = self.plan.metric_names(self.recipe)
        if self.val is None:
            return {}
        clip = model.clip
        e, plan = self.recipe.eval, self.plan
        was = model.training
        model.eval()
        try:
            preds = None
            img = encode_images(clip.encode_image, self.val.images, self.norm, device, e.batch_size)
            txt = encode_texts(clip.encode_text, self.tokenize, self.unique, device, e.batch_size)
            m = retrieval_metrics(img, txt, self.caption_ids, e.retrieval_ks)
            if plan.classnames and self.zs_labels is not None:
                keep = self.zs_labels >= 0
                if keep.any():
                    cls = class_embeddings(clip.encode_text, self.tokenize, plan.classnames, self.prompts, device,
                                           ensemble=self.cfg.zero_shot_ensemble)
                    zs, preds = zero_shot_metrics(img[keep], cls, self.zs_labels[keep], len(plan.classnames))
                    m.update(zs)
            self.last_pictures = picture_data(  # what the run's pictures show (medvl.eval.pictures)
                self.val.images, self.unique, self.caption_ids, img, txt,
                *((self.zs_labels[keep], preds, plan.classnames) if preds is not None else (None, None, None)))
            if plan.findings:
                scores = finding_scores(img, clip.encode_text, self.tokenize, plan.findings, device,
                                        self.cfg.finding_prompts)
                m.update(auroc_metrics(scores.numpy(), self.targets, plan.findings))
            if self.probe_train is not None:
                tr = encode_images(clip.encode_image, self.probe_train.images, self.norm, device, e.batch_size)
                if plan.label_field and self.probe_train.labels is not None and self.val.labels is not None:
                    p = linear_probe(tr.numpy(), self.probe_train.labels.numpy(), img.numpy(),
                                     self.val.labels.numpy(), label_fraction=e.probe_label_fraction)
                    m["val/linear_probe_accuracy"] = p["accuracy"]
                elif plan.findings:
                    ytr = finding_targets(self.probe_train.label_maps, plan.findings,
                                          self.cfg.auroc_missing_as_negative)
                    p = linear_probe_multilabel(tr.numpy(), ytr, img.numpy(), self.targets,
                                                label_fraction=e.probe_label_fraction)
                    m["val/linear_probe_auroc_mean"] = p["auroc_mean"]
        finally:
            model.train(was)
        m["val/rows"] = float(len(self.val))
        for n in names - set(m):  # a block that had no rows to score still reports its name (NaN)
            m[n] = float("nan")
        return m


# ----------------------------------------------------------------------------------------------------------- method


@register_method
class CxrClipMethod(Method):
    name = "cxr_clip"
    config_cls = CxrClipConfig
    feature_keys = ("image_features", "image2_features", "text_features", "text2_features")

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        if recipe.loss.kind != "clip":
            raise ConfigError(f"loss.kind: cxr_clip has its own InfoNCE terms; loss.kind must be 'clip', "
                              f"got {recipe.loss.kind!r}")
        self._norm: Optional[tuple] = None
        self._mode: Optional[str] = None

    @property
    def cfg(self) -> CxrClipConfig:
        return self.recipe.section(self.name)

    # data
    def _resolve(self, corpus: str) -> tuple[str, Optional[PromptReports]]:
        """(text mode, prompt generator) for a corpus, checked against its manifest and the prompts file."""
        from medvl.data.corpus import load_manifest
        m = load_manifest(corpus)
        mode = text_mode(self.cfg.text_source, m.text_kind)
        lf = self.recipe.eval.label_field or m.label_field
        classes = list(self.recipe.eval.classnames or m.classnames)
        prompts = load_prompts(self.cfg.prompts)
        reports = PromptReports(prompts, classes, lf if lf and classes else None, self.cfg.num_negs)
        if mode == "labels":
            if not classes:
                raise ConfigError(f"cxr_clip.text_source: labels, but corpus {corpus} lists no classes")
            reports.check_covers(str(self.cfg.prompts or DEFAULT_PROMPTS))
        return mode, reports

    def decoder(self, train: bool) -> CxrClipDecoder:
        corpus = self.recipe.data.corpus if train else (self.recipe.data.val_corpus or self.recipe.data.corpus)
        mode, reports = self._resolve(corpus)
        return CxrClipDecoder(asdict(self.recipe.model), asdict(self.cfg), train, mode, reports)

    def batch_dtypes(self) -> dict[str, torch.dtype]:  # without reading the corpus or the prompts on workers
        return {"image": torch.uint8, "image2": torch.uint8, "text": torch.long, "text2": torch.long}

    def prepare_batch(self, batch, device):
        if self._norm is None:
            self._norm = image_norm(self.recipe.model)
        for k in ("image", "image2"):
            batch[k] = normalize_images(batch[k], *self._norm)
        return batch

    # model and loss
    def build_model(self) -> CxrClipModule:
        return CxrClipModule(create_model(self.recipe.model, "clip"))

    def loss(self, out):
        return cxr_clip_loss(out, self.cfg.w_icl, self.cfg.w_tcl, self.dist)

    def loss_terms(self) -> tuple[str, ...]:
        return ("clip", "icl", "tcl")

    def after_step(self, model):
        if self.cfg.max_logit_scale is not None:
            with torch.no_grad():
                model.clip.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))

    def train_metrics(self, model):
        return {"train/logit_scale": float(model.clip.logit_scale.detach().exp())}

    # evaluation
    def evaluator(self):
        plan = EvalPlan.build(self.recipe)
        if plan is None:
            return None
        dec = self.decoder(train=False)
        ev = CxrClipEval(self.recipe, plan, dec, dec.reports)
        if ev.val is None:
            return None
        return ev

    def metric_names(self) -> set[str]:
        plan = EvalPlan.build(self.recipe)
        return set() if plan is None else plan.metric_names(self.recipe)

    # export
    def export(self, model, tracking_uri, run_id):
        from medvl.methods.embedding_pyfunc import log_embedding_model
        log_embedding_model(self, model, tracking_uri, run_id)  # the MLflow model: a pyfunc (images/texts in)
        log_open_clip(self.recipe, model.clip, tracking_uri, run_id)  # and the towers in open_clip's format

