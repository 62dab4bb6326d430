"""Reader for MedMNIST-format `.npz` files (the user supplies them; nothing is downloaded).

The exact layout MedMNIST v2/v3 ships (`pneumoniamnist.npz`, `breastmnist_224.npz`, ...): `train_images`,
`val_images`, `test_images` as uint8 [N, H, W] (grey) or [N, H, W, 3] (RGB), and `train_labels`, `val_labels`,
`test_labels` as integers [N, 1] (one class index; multi-class or binary) or [N, K] (ChestMNIST: K binary labels,
multi-label). A missing key, a wrong dtype/shape or a count mismatch is an error naming the file and the key.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvl.data.corpus import CorpusError

SPLITS = ("train", "val", "test")


@dataclass
class MedMnist:
    name: str
    """File stem, e.g. `pneumoniamnist`."""
    images: dict[str, np.ndarray]
    """Split -> uint8 [N, H, W] or [N, H, W, 3]."""
    labels: dict[str, np.ndarray]
    """Split -> int64 [N, K]."""

    @property
    def multilabel(self) -> bool:
        return self.labels["train"].shape[1] > 1

    @property
    def num_classes(self) -> int:
        """Classes (multi-class: max label + 1 over all splits) or labels (multi-label)."""
        if self.multilabel:
            return int(self.labels["train"].shape[1])
        return int(max(int(v.max()) for v in self.labels.values() if v.size)) + 1

    def targets(self, split: str) -> np.ndarray:
        """Class index [N] (multi-class) or 0/1 matrix [N, K] (multi-label)."""
        y = self.labels[split]
        return y if self.multilabel else y[:, 0]


def load_medmnist(path: str | Path, splits: tuple[str, ...] = SPLITS) -> MedMnist:
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"{p}: MedMNIST .npz file not found (MedMNIST data is never downloaded: pass the file)")
    try:
        npz = np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CorpusError(f"{p}: not a readable .npz file ({e})") from None
    with npz:
        keys = set(npz.files)
        want = [f"{s}_{k}" for s in splits for k in ("images", "labels")]
        missing = [k for k in want if k not in keys]
        if missing:
            raise CorpusError(f"{p}: missing key '{missing[0]}' (MedMNIST layout needs {', '.join(want)}; "
                              f"the file has {', '.join(sorted(keys)) or 'no arrays'})")
        images, labels = {}, {}
        for s in splits:
            x, y = npz[f"{s}_images"], npz[f"{s}_labels"]
            if x.dtype != np.uint8:
                raise CorpusError(f"{p}: key '{s}_images' must be uint8, got {x.dtype}")
            if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3))):
                raise CorpusError(f"{p}: key '{s}_images' must be [N, H, W] or [N, H, W, 3], got shape {x.shape}")
            if y.ndim == 1:
                y = y[:, None]
            if y.ndim != 2 or not np.issubdtype(y.dtype, np.integer):
                raise CorpusError(f"{p}: key '{s}_labels' must be integers [N, 1] or [N, K], got {y.dtype} {y.shape}")
            if len(y) != len(x):
                raise CorpusError(f"{p}: key '{s}_labels' has {len(y)} rows but '{s}_images' has {len(x)}")
            if (y < 0).any():
                raise CorpusError(f"{p}: key '{s}_labels' has negative labels")
            images[s], labels[s] = x, y.astype(np.int64)
    widths = {labels[s].shape[1] for s in splits}
    if len(widths) != 1:
        raise CorpusError(f"{p}: the label keys disagree on the number of columns ({sorted(widths)})")
    return MedMnist(p.name.split(".")[0], images, labels)


def to_model_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W(, C)] -> uint8 [N, 3, size, size] (grey replicated; bicubic resize, as open_clip's eval
    transform does)."""
    from PIL import Image
    out = np.empty((len(images), 3, size, size), dtype=np.uint8)
    for i, a in enumerate(images):
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        im = Image.fromarray(a).convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    return out
