"""Training-throughput benchmark: medvl vs open_clip_train vs a bare PyTorch loop, in ONE invocation, on the same
model config, images, captions, preprocessing, batch size, number of steps and machine.

    ./dev bench throughput [--model digits-vit-tiny] [--batch-size 64] [--epochs 4 | --steps N]
                           [--repeat 1] [--loader-workers 2] [--log-every 5] [--warmup 10]
                           [--skip-two-workers] [--out bench/out]

  (a) open_clip_train 3.3.0, the installed package's own `open_clip_train.main` (its CsvDataset + DataLoader
      with `--workers <loader-workers>`, fp32, --grad-clip-norm 1, --local-loss --gather-with-grad, no val /
      zero-shot, --save-frequency 0, --log-every-n-steps 1), on a TSV of the SAME PNG files the medvl corpus
      was ingested from (`<corpus>/source_images/<class>/<n>.png`) with the same caption (the first template).
      open_clip_train only knows model names registered with open_clip, so it runs through a one-line wrapper
      that calls `open_clip.add_model_config(<medvl configs dir>)` and then `open_clip_train.main.main(argv)`;
      nothing else about it is changed.
  (b) medvl: `medvl.train.launcher.run_training(recipe)` with 1 Ray Train worker x <cores> CPUs (torch uses
      every core, like (a)), `data.decode_tasks=<loader-workers>`, eval off; then 2 workers x 1 CPU (global
      batch unchanged, split 2 x B/2).
  (c) bare: the same model (`medvl.models.factory.create_model`) and optimizer groups, forward + ClipLoss +
      backward + grad clip + AdamW on one in-memory batch, torch threads = cores. The compute limit.

Every part runs in its own fresh interpreter (and its own Ray instance), one after the other.

Steady-state samples/s = batch x steps / summed step time over all steps after the first `--warmup` (so
epoch-boundary stalls count, as a user pays them; checkpoint saving is outside both trainers' step timers).
Step time always includes waiting for data. Sources: (a) its per-step log line `Batch (t): ..., X/s` (one per
step), (b) medvl's rank-0 MLflow metric history `train/samples_per_s` (one value per `train.log_every` window;
window time = batch x steps-in-window / value), (c) timed directly. The median over `--log-every`-step windows
is printed too (robust to other jobs on a shared machine). While (a) and (b) run, CPU seconds per process kind
(trainer, data loaders / Ray Data decode tasks, Ray services) are sampled from /proc.

Last line: `ratio_vs_open_clip_train=<medvl 1 worker / a> ratio_vs_bare=<medvl 1 worker / c>`.
Results (JSON), open_clip_train's log and the medvl run roots are kept under `--out/<timestamp>/`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- CPU accounting from /proc

_TICK = os.sysconf("SC_CLK_TCK")


def _kind(cmd: str) -> str:
    if "RayTrainWorker" in cmd:
        return "train worker"
    if "read_and_decode" in cmd or "MapBatches" in cmd or "ReadAndDecode" in cmd:
        return "decode tasks"
    if cmd.startswith("ray::IDLE"):
        return "ray idle workers"
    if cmd.startswith("ray::"):
        return "other ray actors (" + cmd.split()[0][5:].split("(")[0][:24] + ")"
    if "raylet" in cmd or "gcs_server" in cmd or "dashboard" in cmd or "log_monitor" in cmd \
            or "monitor.py" in cmd or "runtime_env" in cmd:
        return "ray services"
    if "open_clip_train" in cmd:
        return "open_clip_train (main + DataLoader workers)"
    if "--part" in cmd:
        return "driver"
    return "other"


class CpuSampler:
    """Every 0.5 s: user+sys CPU ticks of every descendant of this process, attributed by command line
    (Ray re-titles its workers `ray::RayTrainWorker...`, `ray::MapBatches(read_and_decode)...`)."""

    def __init__(self):
        self.last: dict[int, tuple[str, int]] = {}
        self.total: dict[str, float] = {}
        self.threads: dict[str, int] = {}
        self.env: dict[str, dict[str, str]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _descendants(self) -> list[int]:
        parents = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    pass
        keep, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            p = frontier.pop()
            for c, pp in parents.items():
                if pp == p and c not in keep:
                    keep.add(c)
                    frontier.append(c)
        return sorted(keep)

    def sample(self) -> None:
        for pid in self._descendants():
            try:
                st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks = int(st[11]) + int(st[12])
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            kind = _kind(cmd)
            prev_kind, prev = self.last.get(pid, (kind, 0))
            if prev_kind != kind:  # a reused Ray worker changed role: attribute the new ticks to the new role
                prev = self.last[pid][1]
            self.total[kind] = self.total.get(kind, 0.0) + (ticks - prev) / _TICK
            self.last[pid] = (kind, ticks)
            if kind in ("train worker", "decode tasks") and kind not in self.env:
                try:
                    env = dict(x.split("=", 1) for x in
                               Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                               if "=" in x)
                    self.env[kind] = {k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in env}
                except OSError:
                    pass
            if kind == "train worker":
                try:
                    self.threads[str(pid)] = len(os.listdir(f"/proc/{pid}/task"))
                except OSError:
                    pass

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.5)

    def __enter__(self):
        self.sample()
        self.total = {}  # count only what is used from now on
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()
        self.sample()

    def report(self) -> dict:
        return {"cpu_s": {k: round(v, 1) for k, v in sorted(self.total.items(), key=lambda kv: -kv[1])
                          if v >= 0.05},
                "train_worker_env": self.env, "train_worker_threads": self.threads}


# --------------------------------------------------------------------------- data


def make_data(tmp: Path, repeat: int) -> tuple[str, Path, int]:
    """The digits corpus (medvl format; its train split repeated `repeat` times) and a TSV listing the same
    train images (the PNGs it was ingested from), in the same multiplicity, with the first caption."""
    from medvl.data.corpus import Manifest, Shard, iter_rows, load_manifest, shard_paths, write_manifest
    from medvl.data.ingest import ingest_digits
    base = tmp / "digits"
    ingest_digits(str(base))
    rows = list(iter_rows(shard_paths(base, "train"), columns=["sample_id", "texts"]))
    corpus = base
    if repeat > 1:
        corpus = tmp / f"digits-x{repeat}"
        (corpus / "shards").mkdir(parents=True, exist_ok=True)
        m, shards = load_manifest(base), []
        for k in range(repeat):
            for s in m.shards:
                if s.split == "train":
                    rel = f"shards/train-{k:03d}-{Path(s.path).name}"
                    shutil.copy(base / s.path, corpus / rel)
                    shards.append(Shard(rel, "train", s.rows))
        write_manifest(corpus, Manifest(source=f"{base} x{repeat}", shards=shards))
    tsv = tmp / "train.tsv"
    with open(tsv, "w") as f:
        f.write("filepath\ttitle\n")
        for _ in range(repeat):
            for r in rows:
                png = base / "source_images" / f"{r['sample_id']}.png"
                assert png.is_file(), png
                f.write(f"{png}\t{r['texts'][0]}\n")
    return str(corpus), tsv, len(rows) * repeat


def check_same_preprocessing(model: str) -> bool:
    """open_clip_train's train transform (from create_model_and_transforms) == medvl's decode transform."""
    import open_clip

    from medvl.config import ModelConfig
    from medvl.models.factory import image_transforms, register_configs
    register_configs()
    _, oc_train, _ = open_clip.create_model_and_transforms(model, pretrained=None)
    ours, _ = image_transforms(ModelConfig(name=model))
    return repr(oc_train) == repr(ours)


# --------------------------------------------------------------------------- the three parts (child processes)


def part_open_clip_train(a) -> dict:
    from medvl.models.factory import PACKAGE_CONFIGS
    # The only addition to stock open_clip_train: register medvl's model JSONs so `--model` resolves.
    wrapper = ("import sys, open_clip, torch; open_clip.add_model_config(sys.argv.pop(1)); "
               "print('torch threads', torch.get_num_threads(), flush=True); "
               "from open_clip_train.main import main; main(sys.argv[1:])")
    logs = Path(a.work) / "open_clip_train"
    shutil.rmtree(logs, ignore_errors=True)
    cmd = [sys.executable, "-c", wrapper, str(PACKAGE_CONFIGS),
           "--train-data", a.tsv, "--dataset-type", "csv", "--csv-img-key", "filepath",
           "--csv-caption-key", "title", "--csv-separator", "\t",
           "--model", a.model, "--batch-size", str(a.batch_size), "--epochs", str(a.epochs),
           "--workers", str(a.loader_workers), "--precision", "fp32", "--device", "cpu",
           "--lr", "1e-3", "--wd", "0.1", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--warmup", "50",
           "--grad-clip-norm", "1.0", "--local-loss", "--gather-with-grad",
           "--log-every-n-steps", "1", "--save-frequency", "0", "--zeroshot-frequency", "0",
           "--val-frequency", "0", "--report-to", "", "--logs", str(logs), "--name", "oc", "--seed", "0"]
    t0 = time.perf_counter()
    with CpuSampler() as cpu:
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    wall = time.perf_counter() - t0
    text = out.stdout + out.stderr
    (Path(a.work) / "open_clip_train.log").write_text(text)
    rates = [float(x) for x in re.findall(r"Batch \(t\): [\d.]+, ([\d.eE+-]+)/s,", text)]
    if out.returncode != 0 or not rates:
        raise RuntimeError(f"open_clip_train failed (rc {out.returncode}):\n{text[-3000:]}")
    threads = re.search(r"torch threads (\d+)", text)
    # one line per step (--log-every-n-steps 1): X/s = batch / that step's time (data wait included)
    return {"windows": [[1, a.batch_size / r] for r in rates], "wall_s": wall,
            "torch_threads": int(threads.group(1)) if threads else None, **cpu.report()}


def part_medvl(a) -> dict:
    from mlflow.tracking import MlflowClient

    from medvl.config import load_recipe
    from medvl.train.launcher import run_training
    os.environ.pop("RAY_ADDRESS", None)  # always an embedded Ray on this machine
    root = Path(a.work) / f"medvl-{a.workers}w"
    shutil.rmtree(root, ignore_errors=True)
    os.environ["MEDVL_RUN_ROOT"] = str(root)
    recipe = load_recipe(data={
        "name": f"bench-throughput-{a.workers}w",
        "data": {"corpus": a.corpus, "batch_size": a.batch_size, "val_split": None, "text_sampling": "first",
                 "decode_tasks": a.loader_workers},
        "model": {"name": a.model},
        "optim": {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 50, "grad_clip": 1.0},
        "train": {"epochs": a.epochs, "num_workers": a.workers, "cpus_per_worker": a.cpus_per_worker,
                  "log_every": a.log_every, "ckpt_every": 10**9, "max_failures": 0, "precision": "fp32"},
        "eval": {"every_epoch": False},
        "track": {"experiment": "bench-throughput", "log_model": False,
                  "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        "runtime": {"run_root": str(root)}}, overrides=a.set or None)
    t0 = time.perf_counter()
    with CpuSampler() as cpu:
        job, _ = run_training(recipe)
    wall = time.perf_counter() - t0
    hist = sorted(MlflowClient(job.tracking_uri).get_metric_history(job.mlflow_run_id, "train/samples_per_s"),
                  key=lambda m: m.step)
    windows, prev = [], 0
    for m in hist:  # value = global batch x steps in window / window time
        n = m.step - prev
        windows.append([n, a.batch_size * n / m.value])
        prev = m.step
    return {"windows": windows, "wall_s": wall, "steps_expected": job.total_steps,
            "tracking_uri": job.tracking_uri, "run_id": job.mlflow_run_id, **cpu.report()}


def part_bare(a) -> dict:
    import math

    import torch
    from open_clip.loss import ClipLoss

    from medvl.config import ModelConfig, OptimConfig
    from medvl.models.factory import create_model, model_arch
    from medvl.train.optim import build_optimizer
    torch.set_num_threads(a.cpus_per_worker)
    torch.manual_seed(0)
    cfg = ModelConfig(name=a.model)
    arch = model_arch(cfg)
    size, ctx = arch["vision_cfg"]["image_size"], arch["text_cfg"]["context_length"]
    model = create_model(cfg).train()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1))
    loss_fn = ClipLoss(cache_labels=True)
    images = torch.randn(a.batch_size, 3, size, size)
    texts = torch.randint(1, arch["text_cfg"]["vocab_size"] - 1, (a.batch_size, ctx))
    times = []
    for _ in range(a.steps_total):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        float(loss)
        times.append(time.perf_counter() - t0)
    return {"windows": [[1, t] for t in times], "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- driver


def steady(windows: list[list[float]], batch: int, warmup: int, group: int) -> dict:
    """windows: [steps, seconds] in order. Drop windows that start before step `warmup`; then
    samples/s = batch x steps / seconds, and the median over ~`group`-step windows."""
    kept, start = [], 0
    for n, t in windows:
        if start >= warmup:
            kept.append((int(n), t))
        start += int(n)
    steps = sum(n for n, _ in kept)
    secs = sum(t for _, t in kept)
    groups, cur_n, cur_t = [], 0, 0.0
    for n, t in kept:
        cur_n, cur_t = cur_n + n, cur_t + t
        if cur_n >= group:
            groups.append(batch * cur_n / cur_t)
            cur_n, cur_t = 0, 0.0
    return {"samples_per_s": batch * steps / secs if secs else float("nan"),
            "median_window_samples_per_s": statistics.median(groups) if groups else float("nan"),
            "steps_total": start, "steps_measured": steps}


def run_part(name: str, a, **extra) -> dict:
    args = [sys.executable, __file__, "--part", name, "--work", a.work, "--model", a.model,
            "--batch-size", str(a.batch_size), "--epochs", str(a.epochs),
            "--loader-workers", str(a.loader_workers), "--log-every", str(a.log_every)]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    for s in a.set or []:
        args += ["--set", s]
    res_file = Path(a.work) / f"part-{name}-{extra.get('workers', '')}.json"
    args += ["--result", str(res_file)]
    p = subprocess.run(args, capture_output=True, text=True)
    (Path(a.work) / f"part-{name}-{extra.get('workers', '')}.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0 or not res_file.exists():
        raise RuntimeError(f"part {name} failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")
    return json.loads(res_file.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-vit-tiny",
                    help="a medvl/open_clip model name; e.g. cxr-vit-small (224 px: the 32 px digits are upscaled "
                         "by the model's own train transform, so decoding costs more)")
    ap.add_argument("--batch-size", type=int, default=64, help="global batch")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, help="instead of --epochs: at least this many steps (rounded up to "
                                              "whole epochs, since open_clip_train has no max-steps)")
    ap.add_argument("--repeat", type=int, default=1, help="repeat the digits train split k times (longer epochs)")
    ap.add_argument("--loader-workers", type=int, default=2,
                    help="open_clip_train --workers and medvl data.decode_tasks")
    ap.add_argument("--log-every", type=int, default=5, help="medvl train.log_every (MLflow logging window)")
    ap.add_argument("--warmup", type=int, default=10, help="steps excluded from the steady state")
    ap.add_argument("--skip-two-workers", action="store_true", help="skip the medvl 2 workers x 1 CPU run")
    ap.add_argument("--set", action="append", help="extra medvl recipe override key.sub=value (repeatable), "
                                                   "e.g. --set data.prefetch_batches=4")
    ap.add_argument("--out", default=str(HERE / "out"), help="results directory (default bench/out, gitignored)")
    # child-process arguments
    ap.add_argument("--part", choices=["open_clip_train", "medvl", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--tsv", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--cpus-per-worker", type=int, default=os.cpu_count() or 2, help=argparse.SUPPRESS)
    ap.add_argument("--steps-total", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.part:
        fn = {"open_clip_train": part_open_clip_train, "medvl": part_medvl, "bare": part_bare}[a.part]
        Path(a.result).write_text(json.dumps(fn(a)))
        return 0

    cores = os.cpu_count() or 2
    work = Path(a.out).resolve() / time.strftime("throughput-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    a.work = str(work)
    t_start = time.perf_counter()
    corpus, tsv, rows = make_data(work, a.repeat)
    steps_per_epoch = rows // a.batch_size
    if a.steps:
        a.epochs = max(1, -(-a.steps // steps_per_epoch))
    total = steps_per_epoch * a.epochs
    same_pp = check_same_preprocessing(a.model)
    print(f"model {a.model}, global batch {a.batch_size}, {rows} train images x {a.epochs} epochs = {total} steps "
          f"(warm-up {a.warmup} excluded), {cores} cores, loader workers/decode tasks {a.loader_workers}; "
          f"same train preprocessing in open_clip_train and medvl: {same_pp}", flush=True)
    if not same_pp:
        print("WARNING: preprocessing differs", flush=True)

    res: dict[str, dict] = {}
    lines = []

    def show(key: str, label: str, r: dict) -> None:
        s = steady(r["windows"], a.batch_size, a.warmup, max(a.log_every, 5))
        r.update(s)
        res[key] = r
        extra = f"  wall {r['wall_s']:6.1f} s" if "wall_s" in r else ""
        line = (f"{label:<34} {s['samples_per_s']:8.1f} samples/s  (median window {s['median_window_samples_per_s']:7.1f}; "
                f"{s['steps_measured']}/{s['steps_total']} steps measured){extra}")
        lines.append(line)
        print(line, flush=True)
        if "cpu_s" in r:
            print(f"{'':<34} CPU seconds by process: {r['cpu_s']}", flush=True)

    show("open_clip_train", "(a) open_clip_train 3.3.0",
         run_part("open_clip_train", a, tsv=tsv))
    show("medvl_1w", f"(b) medvl 1 worker x {cores} CPUs",
         run_part("medvl", a, corpus=corpus, workers=1, cpus_per_worker=cores))
    for k in ("open_clip_train", "medvl_1w"):
        if res[k]["steps_total"] != total:
            print(f"WARNING: {k} ran {res[k]['steps_total']} steps, expected {total}", flush=True)
    if not a.skip_two_workers and a.batch_size % 2 == 0 and cores >= 2:
        show("medvl_2w", f"(b) medvl 2 workers x {cores // 2} CPU",
             run_part("medvl", a, corpus=corpus, workers=2, cpus_per_worker=cores // 2))
    show("bare", f"(c) bare PyTorch loop, {cores} threads",
         run_part("bare", a, steps_total=total, cpus_per_worker=cores))
    print(f"medvl 1w train-worker env {res['medvl_1w'].get('train_worker_env')}, "
          f"threads {res['medvl_1w'].get('train_worker_threads')}; open_clip_train torch threads "
          f"{res['open_clip_train'].get('torch_threads')}", flush=True)
    ours = res["medvl_1w"]["samples_per_s"]
    summary = {"model": a.model, "batch_size": a.batch_size, "epochs": a.epochs, "steps": total, "rows": rows,
               "same_preprocessing": same_pp, "cores": cores, "loader_workers": a.loader_workers,
               "log_every": a.log_every, "warmup": a.warmup, "set": a.set, "results": res,
               "wall_s": time.perf_counter() - t_start}
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"results: {work / 'results.json'} (total {summary['wall_s']:.0f} s)", flush=True)
    print(f"ratio_vs_open_clip_train={ours / res['open_clip_train']['samples_per_s']:.2f} "
          f"ratio_vs_bare={ours / res['bare']['samples_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
