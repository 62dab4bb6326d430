"""Axial slices of brain MRI cases as an image-text corpus, for training the CLIP-style model that CLISC's first
stage (`slice_labels`) uses.

    medvl ingest brain-slices runs/phantoms-pretrain --out runs/corpora/brain-slices [--size 64]

Each case (`medvl.data.volumes.find_cases`: BraTS folders or a reference CSV) is preprocessed as CLISC does (brain
crop, 99.9th-percentile clip, z-score in the brain); every axial slice holding at least `--min-brain-fraction` of
the largest slice's brain area becomes a PNG (min-max to 8 bit over the slice's brain pixels, black background, resized to
`--size`) with one caption: the CLISC reference's tumour prompt when the slice has at least
`--min-lesion-pixels` tumour pixels, its normal prompt when it has none (slices in between are left out, so no
caption is wrong). Label `tumour` (0/1); split by case (a case's slices are never on both sides).

THIS READS THE CASES' SEGMENTATIONS (to write the captions). It is for a pretraining set that stands in for the
data a real vision-language model was trained on: never point it at the cases a CLISC pipeline segments. The
CLISC pipeline takes the resulting CLIP checkpoint as an input and refuses a pretraining corpus that shares case
ids with its own cases (the manifest lists them).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from medvl.data.ingest import Ingestor, Rejected, split_for
from medvl.data.volumes import VolumeError, axial_slices, find_cases, load_case, preprocess

# CLISC reference (step 0): the two prompts its CLIP labels slices with
NORMAL_PROMPT = ("an image of brain tissue showing typical signal intensity without any regions of abnormal "
                 "intensity or suspicious mass")
TUMOUR_PROMPT = ("an image of brain tissue showing a tumor with uneven hyperintensity and irregular borders distinct "
                 "from surroundings")


def slice_png(sl: np.ndarray, size: int, brain: np.ndarray | None = None) -> bytes:
    """A 2D slice as an 8-bit PNG: min-max over the brain's pixels (the background stays black), resized
    (bilinear) to size x size."""
    from PIL import Image
    brain = sl != 0 if brain is None else brain
    vals = sl[brain] if brain.any() else sl.reshape(-1)
    lo, hi = float(vals.min()), float(vals.max())
    u8 = np.zeros(sl.shape, np.uint8)
    if hi > lo:
        u8[brain] = (1 + (sl[brain] - lo) / (hi - lo) * 254).round().astype(np.uint8)
    im = Image.fromarray(np.ascontiguousarray(u8.T[::-1]))  # (x, y) -> rows = y (anterior up), cols = x
    if size:
        im = im.resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def ingest_brain_slices(source: str, out: str, *, size: int = 64, min_lesion_pixels: int = 10,
                        min_brain_fraction: float = 0.15, val_fraction: float = 0.2, seed: int = 0,
                        shard_size: int = 2048):
    ing = Ingestor(out, source=str(Path(source).resolve()), shard_size=shard_size)
    cases = find_cases(source)
    for case in cases:
        try:
            v = preprocess(load_case(case, with_mask=True))
        except VolumeError as e:
            ing.reject(str(case.flair), None, "case", str(e))
            continue
        split = split_for(case.case_id, val_fraction, seed)
        for z, sl in axial_slices(v, min_brain_fraction):
            sid = f"{case.case_id}:{z:03d}"
            lesion = int(v.mask[:, :, z].sum())
            try:
                if 0 < lesion < min_lesion_pixels:
                    raise Rejected("seg", f"{lesion} tumour pixels (< {min_lesion_pixels}): ambiguous caption")
                ing.claim(sid, str(case.flair))
                tumour = lesion >= min_lesion_pixels
                ing.add({"sample_id": sid, "image": slice_png(sl, size, v.brain[:, :, z]), "image_uri": None,
                         "texts": [TUMOUR_PROMPT if tumour else NORMAL_PROMPT],
                         "labels": {"tumour": float(tumour)}, "split": split,
                         "study_id": case.case_id, "patient_id": case.case_id, "view": "axial"})
            except Rejected as r:
                ing.reject(str(case.flair), z, r.field, r.reason)
    return ing.finish(label_field="tumour", classnames=[NORMAL_PROMPT, TUMOUR_PROMPT], templates=["{}"],
                      text_kind="captions")


def add_parser(sub) -> None:
    p = sub.add_parser("brain-slices", help="axial slices of brain MRI cases with tumour/normal captions "
                                            "(reads the segmentations: a CLIP pretraining set only)")
    p.add_argument("source", help="folder of BraTS-style case folders, or a CSV image_pth,mask_pth")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=64, help="slice image size in pixels (0 = keep)")
    p.add_argument("--min-lesion-pixels", type=int, default=10)
    p.add_argument("--min-brain-fraction", type=float, default=0.15)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=2048)
    p.set_defaults(run=lambda a: ingest_brain_slices(
        a.source, a.out, size=a.size, min_lesion_pixels=a.min_lesion_pixels,
        min_brain_fraction=a.min_brain_fraction, val_fraction=a.val_fraction, seed=a.seed,
        shard_size=a.shard_size))
