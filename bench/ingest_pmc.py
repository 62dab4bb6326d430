"""PMC-OA ingest throughput: `medvl ingest pmc-oa` in-process vs on 1 and 2 Ray workers (cores), one invocation.

    ./dev bench ingest_pmc [--rows 3000] [--size 256] [--store bytes|uri] [--model minilm-efficientnet-lite0]

Writes a PMC-OA-format set (`pmc_oa.jsonl` + `images.zip`, JPEG subfigures of `--size` px cut from the real
biomedical images scikit-image ships, with their real descriptions as captions), then ingests it three times,
each in a fresh process (so Ray gets exactly `--workers` CPUs): in-process (`--workers 0`, the reference), 1 Ray
worker, 2 Ray workers. Each row is fully decoded (the default `--check full`) and its caption tokenised to count
over-long ones. Prints rows/s overall and after start-up (worker start: imports, opening the archive), then, as
the last line, `ratio_2_vs_1_workers=<x> ratio_1_worker_vs_in_process=<y>` (steady-state rows/s). The machine is
shared: compare numbers within one invocation only.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]


def write_set(root: Path, rows: int, size: int) -> tuple[Path, Path]:
    import inspect

    import numpy as np
    import skimage.data as sd
    from PIL import Image
    rng = np.random.default_rng(0)
    srcs = []
    for name in ("immunohistochemistry", "retina", "microaneurysms", "cell"):
        fn = getattr(sd, name)
        img = np.asarray(fn())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = img[..., :3].astype(np.uint8)
        desc = " ".join(" ".join(p.split()) for p in (inspect.getdoc(fn) or name).split("\n\n")[:2])
        srcs.append((img, desc))
    root.mkdir(parents=True, exist_ok=True)
    jp, zp = root / "pmc_oa.jsonl", root / "images.zip"
    with zipfile.ZipFile(zp, "w", compression=zipfile.ZIP_STORED) as z, open(jp, "w") as f:
        for i in range(rows):
            img, desc = srcs[i % len(srcs)]
            h, w = img.shape[:2]
            c = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
            y, x = int(rng.integers(0, h - c)), int(rng.integers(0, w - c))
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(img[y:y + c, x:x + c])).resize((size, size)).save(
                buf, format="JPEG", quality=90)
            name = f"PMC{100000 + i // 6}_Fig{i % 6 // 3 + 1}_{i % 3 + 1}.jpg"
            z.writestr(f"pmc_oa_subfigures/{name}", buf.getvalue())
            f.write(json.dumps({"image": name, "caption": f"{desc} Panel {i % 3 + 1}.", "alignment_type": "subcaption",
                                "alignment_score": round(float(rng.uniform(0.3, 1.0)), 3)}) + "\n")
    return jp, zp


def run_one(jp: Path, zp: Path, out: Path, workers: int, store: str, model: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'platform'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}
    cmd = [sys.executable, "-m", "medvl.cli", "ingest", "pmc-oa", str(jp), "--images", str(zp), "--out", str(out),
           "--workers", str(workers), "--store", store, "--model", model]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return json.loads((out / "ingest_stats.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--size", type=int, default=256, help="subfigure side in px (JPEG)")
    ap.add_argument("--store", choices=["bytes", "uri"], default="uri")
    ap.add_argument("--model", default="minilm-efficientnet-lite0", help="tokenizer counting long captions")
    ap.add_argument("--work", help="folder for the data set and corpora (default: a temp dir)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="medvl-bench-ingest-"))
    jp, zp = write_set(work / "src", a.rows, a.size)
    print(f"bench ingest_pmc: {a.rows} rows, {zp.stat().st_size / 2**20:.0f} MiB images.zip, store={a.store}",
          flush=True)
    res = {}
    for label, w in (("in-process", 0), ("1 worker", 1), ("2 workers", 2)):
        s = run_one(jp, zp, work / f"out-{w}", w, a.store, a.model)
        res[label] = s
        print(f"  {label:10s}: {s['rows_per_s']:7.1f} rows/s overall ({s['seconds']:.1f}s), "
              f"{s['rows_per_s_after_startup']:7.1f} rows/s after start-up; accepted {s['accepted']}, "
              f"{s['truncated_captions']} long captions", flush=True)
    r21 = res["2 workers"]["rows_per_s_after_startup"] / res["1 worker"]["rows_per_s_after_startup"]
    r10 = res["1 worker"]["rows_per_s_after_startup"] / res["in-process"]["rows_per_s_after_startup"]
    print(f"ratio_2_vs_1_workers={r21:.2f} ratio_1_worker_vs_in_process={r10:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
