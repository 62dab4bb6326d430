"""Chest X-ray ingest throughput: `medvl ingest mimic-cxr` in one process vs Ray tasks on 1 and 2 CPUs.

    ./dev bench ingest_cxr [--studies 400] [--size 2000] [--workers 0 1 2] [--resize 512]

Writes (once, cached under bench/out/) a MIMIC-CXR-JPG-shaped tree of `--studies` studies with 1-3 views each,
the JPEGs at MIMIC-JPG-like resolution (`--size` px on the long side, quality 95) cut from the real PA radiograph
RG1_UNCI.dcm (pydicom-data) with a different crop, shift and noise per image, plus MIMIC-style reports and the
metadata / CheXpert-label CSVs. Then ingests it with each `--workers` setting (0 = in-process, N = N Ray tasks at a
time on a local Ray with N CPUs, start-up not counted), each into a fresh corpus, and prints studies (rows)/s and
images/s, and images per CPU-second spent in the decoding tasks (the per-core cost, which other load on a shared
machine does not change). The last line: `rows_per_s_<w>=... ratio_<w>_vs_inline=...`. One invocation measures all
settings: compare numbers only within one run (the machine is shared).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 INDICATION:  ___ with shortness of breath
 COMPARISON:  None.
 FINDINGS:
 The lungs are clear without focal consolidation.  No pleural effusion or pneumothorax.  Heart size is
 {heart}.
 IMPRESSION:
 {impression}
"""


def write_layout(root: Path, studies: int, size: int, seed: int = 0) -> int:
    """The synthetic MIMIC-CXR-JPG tree; returns the number of images."""
    import numpy as np
    import pydicom.data
    from PIL import Image

    from medvl.data.ingest_cxr import dicom_to_uint8
    base = dicom_to_uint8(pydicom.data.get_testdata_file("RG1_UNCI.dcm", download=False))
    rng = np.random.default_rng(seed)
    meta = ["dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns"]
    labels = ["subject_id,study_id,Atelectasis,Cardiomegaly,Edema,No Finding,Pleural Effusion"]
    n_img = 0
    big = Image.fromarray(base).resize((round(base.shape[1] * size / base.shape[0]), size), Image.BICUBIC)
    big = np.asarray(big)
    for s in range(studies):
        sub, stu = str(10000000 + s // 2 * 7), str(50000000 + s)
        d = root / "files" / f"p{sub[:2]}" / f"p{sub}"
        (d / f"s{stu}").mkdir(parents=True, exist_ok=True)
        views = ["PA", "LATERAL", "AP"][: 1 + s % 3]
        for j, v in enumerate(views):
            did = f"{s:06d}-{j}"
            dy, dx = rng.integers(0, 40, size=2)
            img = np.roll(big, (int(dy), int(dx)), axis=(0, 1)).astype(np.int16)
            img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"s{stu}" / f"{did}.jpg", "JPEG", quality=95)
            meta.append(f"{did},{sub},{stu},CHEST (PA AND LAT),{v},{img.shape[0]},{img.shape[1]}")
            n_img += 1
        (d / f"s{stu}.txt").write_text(REPORT.format(heart=["normal", "enlarged"][s % 2],
                                                     impression=["No acute process.", "Cardiomegaly."][s % 2]))
        labels.append(f"{sub},{stu},,{['0.0', '1.0'][s % 2]},,{['1.0', ''][s % 2]},")
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text("\n".join(meta) + "\n")
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text("\n".join(labels) + "\n")
    (root / "READY").write_text(str(n_img))
    return n_img


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=400)
    ap.add_argument("--size", type=int, default=2000, help="long side of the synthetic JPEGs (px)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--resize", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "ingest_cxr"))
    a = ap.parse_args()
    out = Path(a.out)
    layout = out / f"mimic-{a.studies}-{a.size}"
    if not (layout / "READY").exists():
        shutil.rmtree(layout, ignore_errors=True)
        print(f"writing the synthetic MIMIC-CXR-JPG tree ({a.studies} studies) to {layout}", flush=True)
        write_layout(layout, a.studies, a.size)
    from medvl.data.ingest import Ingestor
    from medvl.data.ingest_cxr import ChunkOptions, ImageOptions, mimic_studies, write_studies
    res = {}
    for w in a.workers:
        corpus = out / f"corpus-w{w}"
        shutil.rmtree(corpus, ignore_errors=True)
        ing = Ingestor(corpus, source=str(layout))
        studies, classes = mimic_studies(layout, ing)
        rep = write_studies(studies, ing, ChunkOptions(ImageOptions(resize=a.resize)), workers=w, chunk=a.chunk,
                            manifest_kw={"classnames": classes, "text_kind": "report"})
        res[w] = rep
        print(f"workers={w}: {rep.studies} studies, {rep.images} images in {rep.seconds:.1f} s -> "
              f"{rep.rows_per_s:.1f} rows/s, {rep.images_per_s:.1f} images/s, {rep.images_per_cpu_s:.1f} images "
              f"per task CPU-second", flush=True)
    load = os.getloadavg()[0]
    base = res.get(0) or res[a.workers[0]]
    print(f"load average during the last part: {load:.1f} on {os.cpu_count()} cores")
    print(" ".join(f"rows_per_s_{w}={r.rows_per_s:.1f} images_per_s_{w}={r.images_per_s:.1f} "
                   f"images_per_cpu_s_{w}={r.images_per_cpu_s:.1f} ratio_{w}_vs_inline={r.rows_per_s / base.rows_per_s:.2f}"
                   for w, r in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
