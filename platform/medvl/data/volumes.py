"""Brain MRI volumes for CLISC: BraTS-style cases read with nibabel, the reference's preprocessing, case-level
splits and 2D axial slices.

Layouts (`find_cases`):
  - a folder per case holding `*_flair.nii.gz` (other modalities optional, ignored) and optionally `*_seg.nii.gz`
    (BraTS 2020 training data; the case id is the folder name), or
  - a CSV with columns `image_pth,mask_pth` (the CLISC reference's split files; `mask_pth` may be empty),
    paths relative to the CSV's folder.

`load_case` keeps the NIfTI affine and voxel spacing; arrays are in nibabel's (x, y, z) voxel order and axial
slices are taken along z. `preprocess` follows the reference: crop to the brain's bounding box (brain = voxels
> 0, as in skull-stripped BraTS), clip at the 99.9th percentile within the brain, z-score within the brain (0
outside); the crop offset is kept and the affine updated, so a prediction maps back to the original grid
(`uncrop`). Segmentation labels > 0 become 1 (whole tumour).

Ground truth (the `seg`) is loaded only when asked (`with_mask=True`): the label-free CLISC stages never ask.
Bad input gets a `VolumeError` naming the case and file: a case folder without FLAIR, an unreadable or non-3D
file, an image/mask shape mismatch, an all-zero (empty) volume.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np


class VolumeError(ValueError):
    """A case that cannot be used, with the case id and file in the message."""


@dataclass(frozen=True)
class CaseFiles:
    case_id: str
    flair: Path
    seg: Optional[Path] = None


@dataclass
class Volume:
    case_id: str
    image: np.ndarray                     # float32 (x, y, z)
    affine: np.ndarray                    # 4x4 voxel -> world (mm)
    mask: Optional[np.ndarray] = None     # uint8 (x, y, z), 1 = tumour; None when not loaded
    brain: Optional[np.ndarray] = None    # bool (x, y, z), set by preprocess
    crop: tuple[tuple[int, int], ...] = field(default_factory=tuple)  # per-axis [start, stop) in the original grid
    shape_before_crop: tuple[int, ...] = ()

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(x) for x in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


# --------------------------------------------------------------------------- finding cases


def find_cases(source: str | Path) -> list[CaseFiles]:
    """The cases of a BraTS-style folder tree or of a reference-style CSV, sorted by case id."""
    src = Path(source)
    if src.is_file() and src.suffix.lower() == ".csv":
        return _cases_from_csv(src)
    if not src.is_dir():
        raise VolumeError(f"{src}: neither a folder of cases nor a CSV with columns image_pth,mask_pth")
    cases = []
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        flair = sorted(d.glob("*_flair.nii*"))
        if not flair:
            if any(d.glob("*.nii*")):
                raise VolumeError(f"case {d.name}: no FLAIR file (*_flair.nii.gz) in {d}")
            continue
        seg = sorted(d.glob("*_seg.nii*"))
        cases.append(CaseFiles(d.name, flair[0], seg[0] if seg else None))
    if not cases:
        raise VolumeError(f"{src}: no case folders with a *_flair.nii.gz file")
    return cases


def _cases_from_csv(path: Path) -> list[CaseFiles]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "image_pth" not in reader.fieldnames:
            raise VolumeError(f"{path}: expected a header with image_pth[,mask_pth], got {reader.fieldnames}")
        out = []
        for i, row in enumerate(reader, start=2):
            img = (row.get("image_pth") or "").strip()
            if not img:
                raise VolumeError(f"{path}: row {i}: empty image_pth")
            ip = Path(img) if Path(img).is_absolute() else path.parent / img
            m = (row.get("mask_pth") or "").strip()
            mp = (Path(m) if Path(m).is_absolute() else path.parent / m) if m else None
            case_id = ip.name.split(".nii")[0].removesuffix("_flair")
            if not ip.exists():
                raise VolumeError(f"case {case_id}: {path} row {i}: image_pth {ip} does not exist")
            out.append(CaseFiles(case_id, ip, mp))
    return sorted(out, key=lambda c: c.case_id)


# --------------------------------------------------------------------------- loading and preprocessing


def _read(path: Path, case_id: str, what: str):
    import nibabel as nib
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel raises several types for truncated / foreign files
        raise VolumeError(f"case {case_id}: cannot read {what} {path} ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"case {case_id}: {what} {path} has shape {data.shape}, expected a 3D volume")
    return data, img.affine


def load_case(case: CaseFiles, with_mask: bool = False) -> Volume:
    """The case's FLAIR (float32) with its affine; the tumour mask (labels > 0) only with `with_mask`."""
    image, affine = _read(case.flair, case.case_id, "FLAIR")
    image = image.astype(np.float32)
    if not np.any(image):
        raise VolumeError(f"case {case.case_id}: FLAIR {case.flair} is all zero")
    mask = None
    if with_mask:
        if case.seg is None:
            raise VolumeError(f"case {case.case_id}: no segmentation file (needed for evaluation)")
        seg, _ = _read(case.seg, case.case_id, "segmentation")
        if seg.shape != image.shape:
            raise VolumeError(f"case {case.case_id}: segmentation {case.seg} has shape {seg.shape}, FLAIR "
                              f"{case.flair} has {image.shape}")
        mask = (seg > 0).astype(np.uint8)
    return Volume(case.case_id, image, np.asarray(affine, dtype=np.float64), mask)


def preprocess(v: Volume, clip_percentile: float = 99.9, margin: int = 0) -> Volume:
    """Crop to the brain's bounding box (+ `margin` voxels), clip at the percentile, z-score within the brain."""
    brain = v.image > 0
    idx = np.nonzero(brain)
    crop = tuple((max(0, int(i.min()) - margin), min(s, int(i.max()) + 1 + margin))
                 for i, s in zip(idx, v.image.shape))
    sl = tuple(slice(a, b) for a, b in crop)
    img, brain = v.image[sl].astype(np.float32), brain[sl]
    vals = img[brain]
    hi = np.percentile(vals, clip_percentile)
    img = np.minimum(img, hi)
    vals = img[brain]
    mu, sd = float(vals.mean()), float(vals.std())
    img = np.where(brain, (img - mu) / max(sd, 1e-6), 0.0).astype(np.float32)
    affine = v.affine.copy()
    affine[:3, 3] = v.affine[:3, :3] @ np.array([a for a, _ in crop], dtype=np.float64) + v.affine[:3, 3]
    return Volume(v.case_id, img, affine, v.mask[sl] if v.mask is not None else None, brain, crop,
                  tuple(v.image.shape))


def uncrop(v: Volume, arr: np.ndarray, fill=0) -> np.ndarray:
    """An array on the cropped grid put back on the original grid (e.g. a prediction, to save next to the FLAIR)."""
    return uncrop_array(arr, v.shape_before_crop, v.crop, fill)


def uncrop_array(arr: np.ndarray, shape_before_crop, crop, fill=0) -> np.ndarray:
    """`uncrop` from the stored meta alone (`shape_before_crop`, `crop` = [(start, stop)] per axis)."""
    out = np.full(tuple(shape_before_crop), fill, dtype=arr.dtype)
    out[tuple(slice(a, b) for a, b in crop)] = arr
    return out


def save_nifti(arr: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    import nibabel as nib
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_zooms(tuple(float(x) for x in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))
    nib.save(img, str(path))
    return path


# --------------------------------------------------------------------------- splits and slices


def split_cases(case_ids: Sequence[str], fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                seed: int = 0) -> dict[str, list[str]]:
    """Case-level train/val/test split (the reference's 7:1:2), by a seeded hash of the case id: a case never
    has slices on two sides, and adding cases does not move existing ones between splits."""
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise VolumeError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for cid in sorted(case_ids):
        h = int.from_bytes(hashlib.sha256(f"{seed}:{cid}".encode()).digest()[:8], "big") / 2 ** 64
        name = "train" if h < fractions[0] else "val" if h < fractions[0] + fractions[1] else "test"
        out[name].append(cid)
    return out


def axial_slices(v: Volume, min_brain_fraction: float = 0.0) -> list[tuple[int, np.ndarray]]:
    """(z, 2D slice) for the volume's axial slices whose brain area is at least `min_brain_fraction` of the
    largest slice's (0 keeps every slice that contains brain)."""
    brain = v.brain if v.brain is not None else v.image != 0
    area = brain.reshape(-1, brain.shape[2]).sum(axis=0)
    keep = area > max(0, min_brain_fraction * area.max())
    return [(int(z), v.image[:, :, z]) for z in np.nonzero(keep)[0]]


# --------------------------------------------------------------------------- volume corpora (unet3d)


def write_volume_corpus(out: str | Path, cases: Iterable[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]],
                        source: str = "medvl volumes", inline: bool = False, shard_size: int = 256) -> Path:
    """A corpus of whole cases for `unet3d`: `cases` = (case id, split, image, label, affine); each case is one
    `.npz` (image float32, label uint8 0/1, affine). `inline=False`: saved as `<out>/volumes/<case>.npz` and
    referenced by an absolute `image_uri`; `inline=True`: the npz bytes are the row's `image` (a corpus that can be
    moved, e.g. a pipeline stage's output, which is published by renaming its directory). Returns the manifest."""
    import io

    from medvl.data.corpus import Manifest, ShardWriter, write_manifest
    out = Path(out)
    if not inline:
        (out / "volumes").mkdir(parents=True, exist_ok=True)
    w = ShardWriter(out, shard_size=shard_size)
    for case_id, split, image, label, affine in cases:
        arrays = {"image": np.asarray(image, np.float32), "label": (np.asarray(label) > 0).astype(np.uint8),
                  "affine": np.asarray(affine, np.float64)}
        if inline:
            buf = io.BytesIO()
            np.savez_compressed(buf, **arrays)
            w.add({"sample_id": case_id, "image": buf.getvalue(), "image_uri": None, "split": split})
        else:
            p = out / "volumes" / f"{case_id}.npz"
            np.savez(p, **arrays)
            w.add({"sample_id": case_id, "image_uri": str(p.resolve()), "split": split})
    return write_manifest(out, Manifest(source=source, shards=w.close(), created_by="medvl unet3d volumes"))
