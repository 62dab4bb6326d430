"""Test data in the PMC-OA / ROCO / WebDataset / MedMNIST layouts, written at test time from real images that
installed packages ship (scikit-image's IHC histology, fundus, microaneurysm and cell images) with real caption
text (the first sentences of those images' own descriptions in scikit-image). Nothing is downloaded."""
from __future__ import annotations

import inspect
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np

SOURCES = ("immunohistochemistry", "retina", "microaneurysms", "cell")


def real_images(n_per_source: int = 8, size: int = 48, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """(file name, JPEG bytes, caption): crops of scikit-image's biomedical images with their own descriptions."""
    import skimage.data as sd
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = []
    for name in SOURCES:
        fn = getattr(sd, name)
        img = np.asarray(fn())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.dtype != np.uint8:
            img = (255 * (img - img.min()) / max(1e-9, float(img.max() - img.min()))).astype(np.uint8)
        paras = (inspect.getdoc(fn) or name).split("\n\n")
        desc = " ".join(" ".join(p.split()) for p in paras[:2])
        h, w = img.shape[:2]
        for k in range(n_per_source):
            c = int(min(h, w) * 0.4)
            y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
            crop = Image.fromarray(np.ascontiguousarray(img[y:y + c, x:x + c, :3])).resize((size, size))
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=90)
            pmcid = f"PMC{1000 + SOURCES.index(name)}"
            out.append((f"{pmcid}_Fig{k // 4 + 1}_{k % 4 + 1}.jpg", buf.getvalue(),
                        f"{desc} Panel {k + 1} at ({x}, {y})."))
    return out


def write_pmc_oa(root: Path, n_per_source: int = 8, bad_rows: bool = True, folder_in_zip: str = "caption_subfigures",
                 scores: bool = True) -> tuple[Path, Path]:
    """`pmc_oa.jsonl` + `images.zip` (members under a sub-folder, as PMC-OA's archive has them); with `bad_rows`,
    four more rows: an image missing from the zip, an empty caption, a caption of only special characters, and a
    line that is not JSON."""
    root.mkdir(parents=True, exist_ok=True)
    items = real_images(n_per_source)
    zp, jp = root / "images.zip", root / "pmc_oa.jsonl"
    with zipfile.ZipFile(zp, "w") as z:
        for name, data, _ in items:
            z.writestr(f"{folder_in_zip}/{name}", data)
    with open(jp, "w") as f:
        for i, (name, _, cap) in enumerate(items):
            row = {"image": name, "caption": cap}
            if scores:
                row.update(alignment_type="subcaption", alignment_score=round(0.5 + 0.5 * (i % 10) / 10, 2))
            f.write(json.dumps(row) + "\n")
        if bad_rows:
            f.write(json.dumps({"image": "PMC9999_Fig1_1.jpg", "caption": "A figure that is not in the archive.",
                                "alignment_score": 0.9}) + "\n")
            f.write(json.dumps({"image": items[0][0], "caption": "   ", "alignment_score": 0.9}) + "\n")
            f.write(json.dumps({"image": items[1][0], "caption": "### -- ;;", "alignment_score": 0.9}) + "\n")
            f.write("{not json\n")
    return jp, zp


def write_webdataset(path: Path, n_per_source: int = 2, broken: bool = True) -> Path:
    """One tar shard in open_clip's WebDataset layout (`<key>.jpg` + `<key>.txt`, one `<key>.json` caption);
    with `broken`, a sample without an image and one whose image is corrupt."""
    items = real_images(n_per_source, seed=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        def add(name, data: bytes):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        for i, (name, data, cap) in enumerate(items):
            key = f"sample{i:05d}"
            add(f"{key}.jpg", data)
            if i == 0:
                add(f"{key}.json", json.dumps({"caption": cap}).encode())
            else:
                add(f"{key}.txt", cap.encode())
        if broken:
            add("noimage.txt", b"a caption without its image")
            add("corrupt.jpg", b"\xff\xd8 not really a jpeg")
            add("corrupt.txt", b"a caption with a corrupt image")
    return path


def write_medmnist(path: Path, n: tuple[int, int, int] = (60, 20, 30), size: int = 28, channels: int = 0,
                   classes: int = 2, seed: int = 0) -> Path:
    """A `.npz` in MedMNIST's exact layout (`train_images` uint8 [N, 28, 28] (or [N, 28, 28, 3]), `train_labels`
    int [N, 1], and the same for `val_*` and `test_*`), from the IHC image: class c = crops from region c (distinct
    textures), so a probe can learn it."""
    import skimage.data as sd
    from PIL import Image
    rng = np.random.default_rng(seed)
    img = np.asarray(sd.immunohistochemistry())
    h, w = img.shape[:2]
    regions = [(0, 0), (h // 2, w // 2), (0, w // 2), (h // 2, 0)][:classes]
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        xs, ys = [], []
        for i in range(count):
            c = i % classes
            y0, x0 = regions[c]
            y, x = y0 + int(rng.integers(0, h // 2 - 64)), x0 + int(rng.integers(0, w // 2 - 64))
            crop = Image.fromarray(img[y:y + 64, x:x + 64]).resize((size, size))
            a = np.asarray(crop if channels == 3 else crop.convert("L"), dtype=np.uint8)
            xs.append(a)
            ys.append([c])
        arrays[f"{split}_images"] = np.stack(xs)
        arrays[f"{split}_labels"] = np.asarray(ys, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path
