"""Held-out evaluation: zero-shot classification from prompt templates and image<->text retrieval R@k.

Zero-shot: each class embedding is the normalised mean of its templates' normalised text embeddings
(CLIP's prompt ensemble). Retrieval: captions are deduplicated first, and a hit is any occurrence of the
sample's own caption text, so corpora with repeated captions (label prompts) are scored fairly.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medvl.config import Recipe
from medvl.data.corpus import iter_rows, load_manifest, shard_paths
from medvl.models.factory import image_transforms, tokenizer, unwrap


@dataclass
class ValSet:
    images: torch.Tensor
    captions: list[str]
    labels: Optional[torch.Tensor]
    classnames: list[str]


def load_val_set(recipe: Recipe) -> Optional[ValSet]:
    d, e = recipe.data, recipe.eval
    if d.val_split is None:
        return None
    corpus = d.val_corpus or d.corpus
    manifest = load_manifest(corpus)
    label_field = e.label_field or manifest.label_field
    classnames = e.classnames or manifest.classnames
    _, transform = image_transforms(recipe.model)
    from medvl.data.stream import load_image_bytes
    imgs, caps, labels = [], [], []
    for row in iter_rows(shard_paths(corpus, d.val_split), columns=["sample_id", "image", "image_uri", "texts",
                                                                      "labels"]):
        if len(imgs) >= e.max_rows:
            break
        try:
            with Image.open(io.BytesIO(load_image_bytes(row))) as im:
                imgs.append(transform(im.convert("RGB")))
        except Exception:  # noqa: BLE001 - corrupt held-out rows are skipped like training rows
            continue
        caps.append((row.get("texts") or [""])[0])
        lab = dict(row.get("labels") or [])
        labels.append(int(lab[label_field]) if label_field in lab else -1)
    if not imgs:
        return None
    has_labels = bool(classnames) and label_field is not None and min(labels) >= 0
    return ValSet(torch.stack(imgs), caps, torch.tensor(labels) if has_labels else None, list(classnames))


@torch.no_grad()
def encode(model, images: torch.Tensor, texts: list[str], tok, device, batch_size: int = 256):
    m = unwrap(model)
    was_training = m.training
    m.eval()
    img = torch.cat([m.encode_image(images[i:i + batch_size].to(device), normalize=True).float()
                     for i in range(0, len(images), batch_size)])
    txt = torch.cat([m.encode_text(tok(texts[i:i + batch_size]).to(device), normalize=True).float()
                     for i in range(0, len(texts), batch_size)]) if texts else None
    m.train(was_training)
    return img, txt


@torch.no_grad()
def class_embeddings(model, tok, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    m = unwrap(model)
    was_training = m.training
    m.eval()
    out = []
    for c in classnames:
        e = m.encode_text(tok([t.format(c) for t in templates]).to(device), normalize=True).float()
        out.append(F.normalize(e.mean(0), dim=-1))
    m.train(was_training)
    return torch.stack(out)


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, caption_ids: torch.Tensor, ks: list[int]) -> dict:
    """img: [N, D] per sample; txt: [U, D] per unique caption; caption_ids: [N] index into txt."""
    sim = img @ txt.T  # [N, U]
    out = {}
    # image -> text: rank of the sample's own caption among the unique captions
    own = sim.gather(1, caption_ids[:, None])
    i2t_rank = (sim > own).sum(1)
    # text -> image: best rank among the images that carry this caption
    order = sim.T.argsort(dim=1, descending=True)  # [U, N]
    match = caption_ids[order] == torch.arange(len(txt))[:, None]
    t2i_rank = match.float().argmax(1)
    for k in ks:
        out[f"val/i2t_r{k}"] = float((i2t_rank < k).float().mean())
        out[f"val/t2i_r{k}"] = float((t2i_rank < k).float().mean())
    return out


def evaluate(model, recipe: Recipe, val: ValSet, device="cpu") -> dict[str, float]:
    tok = tokenizer(recipe.model)
    uniq = sorted(set(val.captions))
    index = {c: i for i, c in enumerate(uniq)}
    img, txt = encode(model, val.images, uniq, tok, device, recipe.eval.batch_size)
    metrics = retrieval_metrics(img.cpu(), txt.cpu(), torch.tensor([index[c] for c in val.captions]),
                                recipe.eval.retrieval_ks)
    if val.labels is not None:
        cls = class_embeddings(model, tok, val.classnames, recipe.eval.templates, device).cpu()
        pred = (img.cpu() @ cls.T).argmax(1)
        metrics["val/zero_shot_accuracy"] = float((pred == val.labels).float().mean())
        per_class = [float((pred[val.labels == c] == c).float().mean()) for c in range(len(val.classnames))
                     if (val.labels == c).any()]
        metrics["val/zero_shot_balanced_accuracy"] = float(np.mean(per_class))
    metrics["val/rows"] = float(len(val.captions))
    return metrics
