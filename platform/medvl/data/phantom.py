"""SYNTHETIC brain-tumour phantoms in the BraTS layout, for running CLISC on a machine without BraTS.

    medvl ingest brain-phantoms --out runs/phantoms --cases 40 [--seed 0] [--resolution 2]

Every case starts from the same real brain: the MNI ICBM152 2009 tissue maps that ship inside nilearn's wheel
(`load_mni152_gm_template` / `_wm_template` / `load_mni152_brain_mask`, read from the package, never fetched),
at 2 mm by default (99 x 117 x 95 voxels). A FLAIR-like contrast is composed from the tissue maps (grey matter
brighter than white matter, CSF dark), then per case, seeded by (seed, case index):
  1. one lesion (sometimes a second, smaller one) of random size (`RADIUS`: 5-12 voxels, 10-24 mm at 2 mm),
     elongation, orientation and irregular border (an ellipsoid perturbed by smoothed noise), placed inside the
     brain away from its edge, with a random contrast over the local tissue (`CONTRAST`: 0.8-1.5 of the brain's
     mean intensity), a heterogeneous interior and a soft rim; labelled 1 (core) and 2 (rim), as BraTS labels several tumour classes (> 0 = whole tumour);
  2. MONAI transforms, applied jointly to image, lesion and brain mask: a random affine (rotation, scale,
     translation) and an elastic deformation (`RandAffined`, `Rand3DElasticd`), then on the image only a smooth
     multiplicative bias field (`RandBiasField`), a random gamma (`RandAdjustContrast`) and Rician noise
     (`RandRicianNoise`).
The bias field and the contrast range make lesion and normal tissue intensities overlap, so a plain intensity
threshold does not segment the lesions (`otsu_baseline`, Dice <= 0.5 on these phantoms: see tests/test_clisc_data).

Output: `<out>/<case>/<case>_flair.nii.gz` (float32, 0 outside the brain, as in skull-stripped BraTS) and
`<case>_seg.nii.gz` (uint8), with the template's affine; `<out>/phantoms.json` records the generator's settings.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from medvl.data.volumes import CaseFiles, save_nifti

NAME = "SYNTHETIC-brain-phantom"


@lru_cache(maxsize=2)
def template(resolution: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FLAIR-like image in [0, 1], brain mask, affine) composed from nilearn's MNI152 tissue maps."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_template, load_mni152_wm_template
    gm_img = load_mni152_gm_template(resolution=resolution)
    gm = np.asarray(gm_img.get_fdata(), dtype=np.float32)
    wm = np.asarray(load_mni152_wm_template(resolution=resolution).get_fdata(), dtype=np.float32)
    brain = np.asarray(load_mni152_brain_mask(resolution=resolution).get_fdata()) > 0.5
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    flair = np.where(brain, 0.62 * wm + 0.82 * gm + 0.18 * csf, 0.0).astype(np.float32)
    return flair, brain, np.asarray(gm_img.affine, dtype=np.float64)


@lru_cache(maxsize=2)
def _depth(resolution: int = 2) -> np.ndarray:
    """Distance (voxels) of each template brain voxel to the brain's edge (where lesion centres may go)."""
    from scipy.ndimage import distance_transform_edt
    return distance_transform_edt(template(resolution)[1])


def _lesion(rng: np.random.Generator, brain: np.ndarray, dist: np.ndarray, radius: float) -> np.ndarray:
    """A float field in [0, 1] (1 inside) of one irregular ellipsoidal lesion centred inside the brain."""
    from scipy.ndimage import gaussian_filter
    cands = np.argwhere(dist >= radius + 3)
    if not len(cands):
        cands = np.argwhere(dist >= dist.max() * 0.6)
    c = cands[rng.integers(len(cands))].astype(np.float32)
    axes = radius * rng.uniform(0.65, 1.35, size=3)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in brain.shape], indexing="ij"), -1)
    local = (grid - c) @ rot.astype(np.float32)
    r = np.sqrt(((local / axes.astype(np.float32)) ** 2).sum(-1))
    noise = gaussian_filter(rng.normal(size=brain.shape).astype(np.float32), sigma=2.0)
    noise /= max(float(np.abs(noise).max()), 1e-6)
    return np.clip(1.0 - (r + 0.35 * noise), 0.0, 1.0) * brain


RADIUS = (5.0, 12.0)
"""Main lesion radius range in voxels (at 2 mm: 10-24 mm, ~4-60 mL, the lower half of BraTS whole tumours)."""
SECOND_RADIUS = (3.0, 6.0)
"""Radius range of the optional second, smaller lesion (30 % of the cases)."""
CONTRAST = (0.8, 1.5)
"""Lesion contrast over the local tissue, as a fraction of the brain's mean intensity (before bias and gamma)."""


def make_case(index: int, seed: int = 0, resolution: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FLAIR float32, seg uint8 {0,1,2}, affine) of phantom case `index`; a pure function of (seed, index)."""
    import torch
    from monai.transforms import (Compose, Rand3DElasticd, RandAdjustContrast, RandAffined, RandBiasField,
                                  RandRicianNoise)
    from scipy.ndimage import gaussian_filter
    base, brain, affine = template(resolution)
    rng = np.random.default_rng([seed, index, 0x5EED])
    dist = _depth(resolution)
    field = _lesion(rng, brain, dist, rng.uniform(*RADIUS))
    if rng.random() < 0.3:
        field = np.maximum(field, _lesion(rng, brain, dist, rng.uniform(*SECOND_RADIUS)))
    core, whole = field > 0.35, field > 0.0
    mean = float(base[brain].mean())
    contrast = rng.uniform(*CONTRAST) * mean
    texture = 1.0 + 0.15 * gaussian_filter(rng.normal(size=base.shape).astype(np.float32), 1.0) / 0.2
    soft = gaussian_filter(whole.astype(np.float32), 0.8)
    image = base + contrast * soft * texture * (0.6 + 0.4 * core)
    seg = np.where(core, 1, np.where(whole, 2, 0)).astype(np.float32)

    tseed = int(rng.integers(2 ** 31))
    spatial = Compose([
        RandAffined(keys=("image", "seg", "brain"), prob=1.0, rotate_range=(0.15, 0.15, 0.15),
                    scale_range=(0.08, 0.08, 0.08), translate_range=(3, 3, 3), mode=("bilinear", "nearest",
                                                                                    "nearest"),
                    padding_mode="zeros"),
        Rand3DElasticd(keys=("image", "seg", "brain"), prob=1.0, sigma_range=(6, 8), magnitude_range=(40, 80),
                       mode=("bilinear", "nearest", "nearest"), padding_mode="zeros"),
    ]).set_random_state(tseed)
    out = spatial({"image": torch.as_tensor(image)[None], "seg": torch.as_tensor(seg)[None],
                   "brain": torch.as_tensor(brain.astype(np.float32))[None]})
    img, seg_t, br = out["image"], out["seg"][0].numpy(), out["brain"][0].numpy() > 0.5
    img = RandBiasField(degree=3, coeff_range=(0.25, 0.5), prob=1.0).set_random_state(tseed + 1)(img)
    img = RandAdjustContrast(prob=1.0, gamma=(0.7, 1.5)).set_random_state(tseed + 2)(torch.clamp(img, min=0))
    img = RandRicianNoise(prob=1.0, std=0.06, relative=True, sample_std=True).set_random_state(tseed + 3)(img)
    img = np.asarray(img[0], dtype=np.float32)
    img = np.where(br, np.maximum(img, 1e-3), 0.0).astype(np.float32) * 1000.0  # > 0 inside, 0 outside
    seg_out = np.where(br, np.rint(seg_t), 0).astype(np.uint8)
    return img, seg_out, affine


def make_phantoms(out: str | Path, cases: int, seed: int = 0, resolution: int = 2, start: int = 0,
                  prefix: Optional[str] = None) -> list[CaseFiles]:
    """Write phantom cases `start .. start+cases-1` in the BraTS layout under `out`; returns their files.
    Disjoint index ranges give disjoint case sets (e.g. a CLIP pretraining set and the CLISC cases)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = prefix or f"Phantom_s{seed}"
    files = []
    for i in range(start, start + cases):
        cid = f"{prefix}_{i:04d}"
        img, seg, affine = make_case(i, seed, resolution)
        flair = save_nifti(img, affine, out / cid / f"{cid}_flair.nii.gz")
        segp = save_nifti(seg, affine, out / cid / f"{cid}_seg.nii.gz")
        files.append(CaseFiles(cid, flair, segp))
    (out / "phantoms.json").write_text(json.dumps({
        "name": NAME, "template": "nilearn MNI152 2009 tissue maps", "seed": seed, "resolution_mm": resolution,
        "cases": [f.case_id for f in files]}, indent=1))
    return files


class _Written:
    def __init__(self, files: list[CaseFiles]):
        self.files = files

    def rows(self) -> int:
        return len(self.files)


def add_parser(sub) -> None:
    """`medvl ingest brain-phantoms --out DIR --cases N [--seed S] [--resolution MM] [--start I]`."""
    p = sub.add_parser("brain-phantoms", help="SYNTHETIC brain-tumour phantoms (MNI152, BraTS layout) for CLISC")
    p.add_argument("--out", required=True, help="folder to write the case folders to")
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=2, choices=[1, 2], help="voxel size in mm")
    p.add_argument("--start", type=int, default=0, help="first case index (disjoint ranges = disjoint case sets)")

    def run(a):
        import time
        t0 = time.perf_counter()
        files = make_phantoms(a.out, a.cases, seed=a.seed, resolution=a.resolution, start=a.start)
        print(f"brain-phantoms: {len(files)} {NAME} cases in {time.perf_counter() - t0:.1f} s -> {a.out}")
        return _Written(files)
    p.set_defaults(run=run)
