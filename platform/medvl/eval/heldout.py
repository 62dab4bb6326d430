"""Held-out rows for evaluation, decoded once per process and kept as uint8 (a quarter of float32's memory).

`load_heldout` reads up to `max_rows` rows of a split with bounded memory (one Parquet record batch at a time),
decodes each image with the method's eval transform (`image_fn(row) -> uint8 [3, H, W]`), and keeps the row's
texts and its class index (when the corpus is labelled). Rows that fail to decode are skipped and counted, as in
training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from medvl.data.corpus import iter_rows, load_manifest, shard_paths


@dataclass
class HeldOut:
    images: torch.Tensor
    """uint8 [N, 3, H, W]"""
    texts: list[list[str]]
    """Each row's texts (captions / report sections)."""
    labels: Optional[torch.Tensor]
    """Class index per row, or None when the corpus has no (complete) single-label field."""
    classnames: list[str]
    sample_ids: list[str] = field(default_factory=list)
    skipped: int = 0
    label_maps: list[dict] = field(default_factory=list)
    """Each row's full `labels` map (multi-label corpora)."""

    @property
    def captions(self) -> list[str]:
        """The first text of each row (what retrieval matches against)."""
        return [t[0] if t else "" for t in self.texts]

    def __len__(self) -> int:
        return len(self.texts)


def labels_info(corpus: str, label_field: Optional[str], classnames: list[str]) -> tuple[Optional[str], list[str]]:
    """The label field and class names to use: the recipe's, else the corpus manifest's."""
    m = load_manifest(corpus)
    return (label_field or m.label_field), list(classnames or m.classnames)


def has_labels(corpus: str, label_field: Optional[str], classnames: list[str]) -> bool:
    lf, cn = labels_info(corpus, label_field, classnames)
    return bool(lf) and bool(cn)


def load_heldout(corpus: str, split: str, image_fn: Callable[[dict], np.ndarray], *, max_rows: int,
                 label_field: Optional[str] = None, classnames: Optional[list[str]] = None,
                 max_bytes: Optional[int] = None) -> Optional[HeldOut]:
    """Up to `max_rows` rows, and at most `max_bytes` of uint8 images (`eval.max_memory_mb`; a warning says how
    many rows the bound left out)."""
    label_field, classnames = labels_info(corpus, label_field, list(classnames or []))
    imgs, texts, labels, ids, maps = [], [], [], [], []
    skipped = 0
    used = 0
    cols = ["sample_id", "image", "image_uri", "texts", "labels"]
    for row in iter_rows(shard_paths(corpus, split), columns=cols):
        if len(imgs) >= max_rows:
            break
        try:
            img = image_fn(row)
        except Exception:  # noqa: BLE001 - corrupt held-out rows are skipped like training rows
            skipped += 1
            continue
        if max_bytes is not None and used + img.nbytes > max_bytes:
            import logging
            logging.getLogger(__name__).warning(
                "held-out set of %s/%s: kept the first %d rows (%.0f MB of uint8 images, eval.max_memory_mb); "
                "the rest of the split is not evaluated", corpus, split, len(imgs), used / 2**20)
            break
        used += img.nbytes
        imgs.append(torch.from_numpy(np.ascontiguousarray(img)))
        texts.append([t for t in (row.get("texts") or []) if isinstance(t, str)])
        lab = dict(row.get("labels") or [])
        maps.append(lab)
        labels.append(int(lab[label_field]) if label_field and label_field in lab else -1)
        ids.append(str(row.get("sample_id")))
    if not imgs:
        return None
    has = bool(classnames) and label_field is not None and min(labels) >= 0
    return HeldOut(torch.stack(imgs), texts, torch.tensor(labels) if has else None, classnames, ids, skipped, maps)
