"""Training-throughput benchmark, all in ONE invocation on the same model, images, captions, batch and machine:

    ./dev bench throughput [--model digits-vit-tiny] [--batch-size 64] [--epochs 3]

  (a) open_clip_train 3.3.0 from the installed package (`open_clip_train.main`, CSV of the same PNGs,
      --local-loss --gather-with-grad, fp32, 1 DataLoader worker). Our model JSONs are registered with
      `open_clip.add_model_config` in a one-line wrapper, since open_clip_train only knows built-in names.
  (b) medvl with 1 Ray Train worker (2 CPUs, so torch uses both cores like (a)), and with 2 workers x 1 CPU.
  (c) a bare forward + backward + AdamW loop on in-memory tensors (the limit).

Steady-state samples/s = batch x steps / summed step time, over every step after the first `--warmup` steps
(epoch-boundary stalls included, as a user pays them). Per-step times: (a) its per-step log line
(`--log-every-n-steps 1`), (b) medvl's rank-0 `train/samples_per_s` metric (`train.log_every=1`),
(c) timed directly. Last line: `ratio_vs_open_clip_train=<b1/a> ratio_vs_bare=<b1/c>`.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]


def make_data(tmp: Path) -> tuple[str, Path]:
    """The digits corpus (medvl format) and a TSV of the same train images + first captions for open_clip_train."""
    from medvl.data.corpus import iter_rows, shard_paths
    from medvl.data.ingest import ingest_digits
    corpus = tmp / "digits"
    ingest_digits(str(corpus))
    tsv = tmp / "train.tsv"
    with open(tsv, "w") as f:
        f.write("filepath\ttitle\n")
        for row in iter_rows(shard_paths(corpus, "train"), columns=["sample_id", "texts"]):
            f.write(f"{corpus / 'source_images' / row['sample_id']}.png\t{row['texts'][0]}\n")
    return str(corpus), tsv


def steady(step_times: list[float], batch: int, warmup: int) -> float:
    t = step_times[warmup:]
    return batch * len(t) / sum(t)


def run_open_clip_train(tsv: Path, model: str, batch: int, epochs: int, logs: Path) -> list[float]:
    from medvl.models.factory import PACKAGE_CONFIGS
    wrapper = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
               "from open_clip_train.main import main; main(sys.argv[1:])")
    cmd = [sys.executable, "-c", wrapper, str(PACKAGE_CONFIGS), "--train-data", str(tsv), "--dataset-type", "csv",
           "--csv-img-key", "filepath", "--csv-caption-key", "title", "--csv-separator", "\t",
           "--model", model, "--batch-size", str(batch), "--epochs", str(epochs), "--workers", "1",
           "--precision", "fp32", "--lr", "1e-3", "--wd", "0.1", "--warmup", "50", "--grad-clip-norm", "1.0",
           "--local-loss", "--gather-with-grad", "--log-every-n-steps", "1", "--save-frequency", "0",
           "--report-to", "", "--logs", str(logs), "--name", "oc", "--seed", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    text = out.stdout + out.stderr
    rates = [float(x) for x in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s", text)]
    if out.returncode != 0 or not rates:
        raise RuntimeError(f"open_clip_train failed (rc {out.returncode}):\n{text[-3000:]}")
    return [batch / r for r in rates]


def run_medvl(corpus: str, model: str, batch: int, epochs: int, workers: int, cpus: int, root: Path) -> list[float]:
    from mlflow.tracking import MlflowClient

    from medvl.config import load_recipe
    from medvl.train.launcher import run_training
    recipe = load_recipe(data={
        "name": f"bench-{workers}w", "data": {"corpus": corpus, "batch_size": batch, "val_split": None,
                                              "text_sampling": "first"},
        "model": {"name": model}, "optim": {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 50, "grad_clip": 1.0},
        "train": {"epochs": epochs, "num_workers": workers, "cpus_per_worker": cpus, "log_every": 1,
                  "ckpt_every": 10_000, "max_failures": 0},
        "track": {"experiment": "bench", "log_model": False}, "runtime": {"run_root": str(root)}})
    job, _ = run_training(recipe)
    hist = sorted(MlflowClient(job.tracking_uri).get_metric_history(job.mlflow_run_id, "train/samples_per_s"),
                  key=lambda m: m.step)
    return [batch / m.value for m in hist]


def run_bare(model: str, batch: int, steps: int) -> list[float]:
    import torch

    from medvl.config import LossConfig, ModelConfig, OptimConfig
    from medvl.losses import build_loss
    from medvl.models.factory import create_model, model_arch
    from medvl.train.optim import build_optimizer, build_scheduler
    from medvl.train.step import StepSettings, train_step
    torch.set_num_threads(os.cpu_count() or 2)
    cfg = ModelConfig(name=model)
    arch = model_arch(cfg)
    size, ctx = arch["vision_cfg"]["image_size"], arch["text_cfg"]["context_length"]
    m = create_model(cfg)
    opt = build_optimizer(m, OptimConfig())
    sched = build_scheduler(opt, OptimConfig(), steps)
    loss_fn = build_loss(LossConfig(local_loss=False, gather_with_grad=False))
    data = {"image": torch.randn(batch, 3, size, size), "text": torch.randint(1, 49000, (batch, ctx))}
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step(m, data, loss_fn, opt, sched, StepSettings())
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-vit-tiny")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10, help="steps excluded from the steady state")
    ap.add_argument("--skip-two-workers", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medvl-bench-tp-"))
    corpus, tsv = make_data(tmp)
    res = {}
    oc = run_open_clip_train(tsv, a.model, a.batch_size, a.epochs, tmp / "oc-logs")
    res["open_clip_train"] = steady(oc, a.batch_size, a.warmup)
    print(f"open_clip_train           {res['open_clip_train']:8.1f} samples/s  ({len(oc)} steps)", flush=True)
    ours = run_medvl(corpus, a.model, a.batch_size, a.epochs, 1, os.cpu_count() or 2, tmp / "runs")
    res["medvl_1w"] = steady(ours, a.batch_size, a.warmup)
    print(f"medvl 1 worker            {res['medvl_1w']:8.1f} samples/s  ({len(ours)} steps)", flush=True)
    if not a.skip_two_workers:
        ours2 = run_medvl(corpus, a.model, a.batch_size, a.epochs, 2, 1, tmp / "runs")
        res["medvl_2w"] = steady(ours2, a.batch_size, a.warmup)
        print(f"medvl 2 workers (global)  {res['medvl_2w']:8.1f} samples/s  ({len(ours2)} steps)", flush=True)
    bare = run_bare(a.model, a.batch_size, len(ours))
    res["bare"] = steady(bare, a.batch_size, a.warmup)
    print(f"bare PyTorch loop         {res['bare']:8.1f} samples/s  ({len(bare)} steps)", flush=True)
    print(f"ratio_vs_open_clip_train={res['medvl_1w'] / res['open_clip_train']:.2f} "
          f"ratio_vs_bare={res['medvl_1w'] / res['bare']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
