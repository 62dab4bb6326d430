"""Building blocks for contrastive evaluation: batched encoding of held-out images/texts, zero-shot classification
with prompt ensembles (each class embedding = the normalised mean of its templates' normalised text embeddings,
CLIP's ensemble), and balanced accuracy. Methods combine these (with `retrieval` and `probe`) in their evaluator.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medvl.data.decode import normalize_images


@torch.no_grad()
def encode_images(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, norm, device,
                  batch_size: int = 256) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> L2-normalised float features [N, D] (on CPU)."""
    mean, std = norm
    out = [F.normalize(encode(normalize_images(images[i:i + batch_size].to(device), mean, std)).float(), dim=-1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def encode_texts(encode: Callable[[torch.Tensor], torch.Tensor], tokenize: Callable, texts: Sequence[str], device,
                 batch_size: int = 256) -> torch.Tensor:
    """texts -> L2-normalised float features [N, D] (on CPU)."""
    out = [F.normalize(encode(tokenize(list(texts[i:i + batch_size])).to(device)).float(), dim=-1).cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def class_embeddings(encode: Callable, tokenize: Callable, classnames: Sequence[str],
                     prompts: Sequence[str] | dict[str, Sequence[str]], device,
                     ensemble: str = "embedding") -> torch.Tensor:
    """One embedding per class from its prompts. `prompts` is a list of templates with `{}` (filled with the class
    name) or a mapping class -> its own sentences. `ensemble="embedding"`: the normalised mean of the prompts'
    normalised embeddings (CLIP's prompt ensemble); `"similarity"`: their plain mean, so that `image @ class` is the
    mean cosine similarity over the class's prompts (CXR-CLIP / GLoRIA's CheXpert 5x200 zero-shot)."""
    if ensemble not in ("embedding", "similarity"):
        raise ValueError(f"ensemble must be 'embedding' or 'similarity', got {ensemble!r}")
    out = []
    for c in classnames:
        sents = list(prompts[c]) if isinstance(prompts, dict) else [t.format(c) for t in prompts]
        if not sents:
            raise ValueError(f"class {c!r} has no prompt")
        e = encode_texts(encode, tokenize, sents, device).mean(0)
        out.append(F.normalize(e, dim=-1) if ensemble == "embedding" else e)
    return torch.stack(out)


def zero_shot_metrics(img: torch.Tensor, cls: torch.Tensor, labels: torch.Tensor, n_classes: int,
                      prefix: str = "val/") -> tuple[dict[str, float], torch.Tensor]:
    """Accuracy and balanced accuracy of argmax similarity; returns (metrics, predictions)."""
    pred = (img @ cls.T).argmax(1)
    per_class = [float((pred[labels == c] == c).float().mean()) for c in range(n_classes) if (labels == c).any()]
    return {f"{prefix}zero_shot_accuracy": float((pred == labels).float().mean()),
            f"{prefix}zero_shot_balanced_accuracy": float(np.mean(per_class))}, pred


ZERO_SHOT_METRICS = ("val/zero_shot_accuracy", "val/zero_shot_balanced_accuracy")
