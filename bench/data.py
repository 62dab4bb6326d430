"""Data-path benchmark: medvl's Ray Data stream vs a torch DataLoader + PIL on the same Parquet shards.

    ./dev bench data [--model cxr-vit-small] [--scale 1 10 30] [--workers 2]

Both decode the same encoded images with the model's own open_clip train transform, tokenise the captions and end
with the same normalised float32 image tensors (the Ray side ships uint8 and normalises in the consumer, as the
training worker does; the DataLoader's transform normalises in its workers); both use 2 parallel decoders (Ray
Data decode tasks / DataLoader workers) and batch 64. Sides (`--variants`): `ray`, `dataloader`, `ray-f32` (the
Ray stream shipping float32 normalised in the decode tasks, as before the method seam: the uint8 transport's gain,
reported on its own), `ray-b256` (the Ray stream with `data.decoded_buffer_mb=256`: an object-store budget for
the decode pipeline, off by default) and `ray-k128` (the Ray stream with `data.decoded_block_mb=128`, Ray Data's own
block size: a decode task's window then leaves in blocks of ~870 rows instead of 128 at 224 px). For each corpus
scale (the digits train split copied 1x, 10x and 30x) it prints rows/s
(steady state, after the first batch), the bytes per row the consumer receives, and the peak memory of the whole
process tree (driver + Ray / DataLoader workers) as RSS and as PSS (RSS counts Ray's shared-memory object store
once per process that maps it; PSS divides shared pages among them), then, as the last line,
`ratio_ray_vs_dataloader=<x> rss_growth_10x_<side>=... pss_growth_10x_<side>=... (every larger scale against the
smallest) rss_growth_30x_vs_10x_<side>=... (the two largest against each other: ~1.0 once the peak has levelled off,
i.e. memory is bounded, not proportional to the corpus) uint8_vs_float32_rows_per_s=... uint8_vs_float32_bytes=...`
(the ratio and the uint8 figures at the largest scale).
One invocation measures everything: compare numbers only within one run (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from medvl.methods.clip import ClipDecoder  # noqa: E402 (after RAY_AUTH_MODE)


def _pss_kib(pid: int) -> int:
    """Proportional set size: shared pages (the object store's shared memory, libraries) divided among the
    processes that map them, so a tree's sum counts each page once."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def tree_mem_mib(root_pid: int) -> tuple[float, float]:
    """(RSS, PSS) of root_pid and all its descendants (Ray's raylet/workers are descendants of the driver). RSS
    counts a shared page once per process that maps it (Ray's object store is shared memory); PSS does not."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    keep, frontier = {root_pid}, [root_pid]
    while frontier:
        p = frontier.pop()
        for c, pp in parents.items():
            if pp == p and c not in keep:
                keep.add(c)
                frontier.append(c)
    rss = pss = 0
    for pid in keep:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            pss += _pss_kib(pid) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return rss / 2**20, pss / 2**20


class PeakSampler:
    def __init__(self):
        self.peak = self.peak_pss = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss, pss = tree_mem_mib(os.getpid())
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            time.sleep(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


def scaled_corpus(src: str, dst: Path, scale: int) -> str:
    from medvl.data.corpus import Manifest, Shard, load_manifest, write_manifest
    m = load_manifest(src)
    (dst / "shards").mkdir(parents=True, exist_ok=True)
    shards = []
    for k in range(scale):
        for s in m.shards:
            if s.split != "train":
                continue
            rel = f"shards/train-{k:03d}-{Path(s.path).name}"
            shutil.copy(Path(src) / s.path, dst / rel)
            shards.append(Shard(rel, "train", s.rows))
    write_manifest(dst, Manifest(source=f"{src} x{scale}", shards=shards))
    return str(dst)


class Float32Decoder(ClipDecoder):
    """The transport before the method seam: images normalised to float32 inside the decode task (4x the bytes
    of uint8 through the object store)."""

    def output_dtypes(self):
        return {"image": "float32", "text": "int64"}

    def collate(self, rows):
        import torch

        from medvl.config import ModelConfig, from_dict
        from medvl.data.decode import normalize_images
        from medvl.models.factory import image_norm
        out = super().collate(rows)
        out["image"] = normalize_images(torch.from_numpy(out["image"]),
                                        *image_norm(from_dict(ModelConfig, self.model_cfg))).numpy()
        return out


def run_ray(corpus: str, model: str, workers: int, batch: int, variant: str = "ray"
            ) -> tuple[float, int, float, float, float]:
    """`variant`: ray (uint8 transport, normalised by the consumer, as in training; data.decoded_buffer_mb's
    default), ray-f32 (float32 transport, normalised in the decode tasks: the path before the method seam),
    ray-b<MB> (ray with data.decoded_buffer_mb=<MB>, the object-store budget of the decode pipeline), ray-k<MB>
    (ray with data.decoded_block_mb=<MB>: ray-k128 is Ray Data's own block size, medvl's before 16 MB blocks)."""
    import ray
    import torch

    from medvl.config import DataConfig, ModelConfig
    from medvl.data.decode import normalize_images
    from medvl.data.stream import build_dataset
    from medvl.models.factory import image_norm
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        from dataclasses import asdict

        mc = ModelConfig(name=model)
        dec = (Float32Decoder if variant == "ray-f32" else ClipDecoder)(asdict(mc), train=True)
        data = DataConfig(corpus=corpus, decode_tasks=workers, decode_batch_size=batch)
        if variant.startswith("ray-b"):  # ray-b<MB>: another decoded_buffer_mb
            data.decoded_buffer_mb = float(variant[len("ray-b"):])
        if variant.startswith("ray-k"):  # ray-k<MB>: another decoded_block_mb (ray-k128: Ray Data's own size)
            data.decoded_block_mb = float(variant[len("ray-k"):])
        ds = build_dataset(data, dec, "train")
        norm = image_norm(mc)
        with PeakSampler() as ps:
            it = iter(ds.iter_torch_batches(batch_size=batch, prefetch_batches=2))
            n = len(next(it)["image"])
            t0, rows, nbytes = time.perf_counter(), 0, 0
            for b in it:
                rows += len(b["image"])
                nbytes += sum(v.nbytes for v in b.values() if isinstance(v, torch.Tensor))
                if b["image"].dtype == torch.uint8:  # the same float32 tensors as the other sides
                    b["image"] = normalize_images(b["image"], *norm)
            dt = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return rows / dt, rows + n, ps.peak, ps.peak_pss, nbytes / max(1, rows)


class ShardStream(__import__("torch").utils.data.IterableDataset):
    """torch IterableDataset over the same shards: each DataLoader worker takes every k-th shard."""

    def __init__(self, corpus: str, model: str):
        self.corpus, self.model = corpus, model

    def __iter__(self):
        import io

        import pyarrow.parquet as pq
        import torch
        from PIL import Image

        from medvl.config import ModelConfig
        from medvl.data.corpus import shard_paths
        from medvl.models.factory import image_transforms, tokenizer
        torch.set_num_threads(1)
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        tr, _ = image_transforms(ModelConfig(name=self.model))
        tok = tokenizer(ModelConfig(name=self.model))
        for i, p in enumerate(shard_paths(self.corpus, "train")):
            if i % nw != wid:
                continue
            for rb in pq.ParquetFile(p).iter_batches(batch_size=256, columns=["image", "texts"]):
                for img, texts in zip(rb.column("image").to_pylist(), rb.column("texts").to_pylist()):
                    with Image.open(io.BytesIO(img)) as im:
                        yield tr(im.convert("RGB")), tok([texts[0]])[0]


def run_dataloader(corpus: str, model: str, workers: int, batch: int, variant: str = "dataloader"
                   ) -> tuple[float, int, float, float, float]:
    import torch
    dl = torch.utils.data.DataLoader(ShardStream(corpus, model), batch_size=batch, num_workers=workers,
                                     prefetch_factor=2, persistent_workers=False)
    with PeakSampler() as ps:
        it = iter(dl)
        n = len(next(it)[0])
        t0, rows, nbytes = time.perf_counter(), 0, 0
        for img, tok in it:
            rows += len(img)
            nbytes += img.nbytes + tok.nbytes
        dt = time.perf_counter() - t0
    return rows / dt, rows + n, ps.peak, ps.peak_pss, nbytes / max(1, rows)


VARIANTS = ("ray", "dataloader", "ray-f32", "ray-b256", "ray-k128")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cxr-vit-small", help="its train transform is applied (224 px default)")
    ap.add_argument("--scale", type=int, nargs="+", default=[1, 10, 30],
                    help="corpus sizes (copies of the digits train split); growth is reported against the smallest, "
                         "and the two largest against each other (does the peak keep rising, or has it levelled?)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="which sides to run (ray and dataloader are needed for the ratios; ray-b<MB>: the Ray side "
                         "with data.decoded_buffer_mb=<MB>)")
    ap.add_argument("--which", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.which:  # child process: one measurement in a fresh interpreter, so RSS peaks don't mix
        fn = run_dataloader if a.which == "dataloader" else run_ray
        print(json.dumps(dict(zip(["rows_per_s", "rows", "peak_rss_mib", "peak_pss_mib", "bytes_per_row"],
                                  fn(a.corpus, a.model, a.workers, a.batch_size, a.which)))))
        return 0
    import subprocess

    from medvl.data.ingest import ingest_digits
    variants = [v for v in a.variants.split(",") if v]
    tmp = Path(tempfile.mkdtemp(prefix="medvl-bench-data-"))
    base = str(tmp / "digits")
    ingest_digits(base)
    results: dict[tuple[str, int], dict] = {}
    for scale in a.scale:
        corpus = scaled_corpus(base, tmp / f"x{scale}", scale)
        for which in variants:
            out = subprocess.run([sys.executable, __file__, "--which", which, "--corpus", corpus, "--model", a.model,
                                  "--workers", str(a.workers), "--batch-size", str(a.batch_size)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[(which, scale)] = r
            print(f"{which:>12} x{scale:<3} rows={r['rows']:>6}  {r['rows_per_s']:8.1f} rows/s  "
                  f"{r['bytes_per_row'] / 1024:6.1f} KiB/row delivered  peak RSS (process tree) "
                  f"{r['peak_rss_mib']:7.0f} MiB, PSS {r['peak_pss_mib']:7.0f} MiB", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    scales = sorted(set(a.scale))
    lo, hi = scales[0], scales[-1]
    parts = []
    if "ray" in variants and "dataloader" in variants:
        parts.append(f"ratio_ray_vs_dataloader={results[('ray', hi)]['rows_per_s'] / results[('dataloader', hi)]['rows_per_s']:.2f}")
    for v in variants:
        key = v.replace("-", "_")
        for x in scales[1:]:  # growth over the smallest corpus, at every larger scale
            for m in ("rss", "pss"):
                parts.append(f"{m}_growth_{x}x_{key}="
                             f"{results[(v, x)][f'peak_{m}_mib'] / results[(v, lo)][f'peak_{m}_mib']:.2f}")
        if len(scales) > 2:  # the plateau: the two largest corpora against each other
            mid = scales[-2]
            for m in ("rss", "pss"):
                parts.append(f"{m}_growth_{hi}x_vs_{mid}x_{key}="
                             f"{results[(v, hi)][f'peak_{m}_mib'] / results[(v, mid)][f'peak_{m}_mib']:.2f}")
    if "ray" in variants and "ray-f32" in variants:  # the uint8 transport's gain, reported on its own
        parts.append(f"uint8_vs_float32_rows_per_s={results[('ray', hi)]['rows_per_s'] / results[('ray-f32', hi)]['rows_per_s']:.2f}")
        parts.append(f"uint8_vs_float32_bytes={results[('ray', hi)]['bytes_per_row'] / results[('ray-f32', hi)]['bytes_per_row']:.2f}")
    print(" ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
