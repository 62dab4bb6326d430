"""Training-throughput benchmark: medvl vs open_clip_train vs a bare PyTorch loop, in ONE invocation, on the same
model config, images, captions, preprocessing, batch size, number of steps and machine.

    ./dev bench throughput [--model digits-vit-tiny] [--batch-size 64] [--epochs 3 | --steps N]
                           [--repeat 2] [--rounds 1] [--loader-workers 2] [--log-every 5] [--warmup 10]
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
  (c) bare: the same model (`medvl.models.factory.create_model`) and the same optimizer as medvl
      (`build_optimizer`: AdamW with open_clip's decay groups, fused kernel by default, `optim.impl`), forward +
      ClipLoss + backward + grad clip + AdamW on one in-memory batch, torch threads = cores. The compute limit:
      ratio_vs_bare is medvl's whole overhead (Ray, data, logging), not a difference in the math. open_clip_train
      uses torch's default AdamW (the per-parameter for-loop kernel on CPU); medvl's fused AdamW is part of why it
      is faster than (a).

  (r) optional (`--parts ...,r`): the bare loop (c) in a process that has first started an embedded Ray the way
      medvl does (`ensure_ray`) and waited for it to settle; Ray stays idle. `ratio_bare_ray_vs_bare` is what Ray's
      own processes (raylet, GCS, agents, prestarted workers) cost a compute-bound loop on this machine, a floor
      for any trainer that runs next to them; `medvl_ratio_vs_bare_ray` is medvl against that floor.

Every part runs in its own fresh interpreter (and its own Ray instance), one after the other; with `--rounds R`
the sequence repeats R times, interleaved, and each figure is the median over the rounds (a shared machine has
bursts of other jobs: compare only figures from one invocation). Round r starts at the r-th part, so no part
always runs first or after the same neighbour.

Steady-state samples/s = batch x steps / summed step time over all steps after the first `--warmup` (so
epoch-boundary stalls count, as a user pays them; checkpoint saving is outside both trainers' step timers).
Step time always includes waiting for data. Sources: (a) its per-step log line `Batch (t): ..., X/s` (one per
step), (b) medvl's rank-0 MLflow metric history `train/samples_per_s` (one value per `train.log_every` window;
window time = batch x steps-in-window / value), (c) timed directly. The median over `--log-every`-step windows
is printed too (robust to other jobs on a shared machine). While (a) and (b) run, CPU seconds per process kind
(trainer, data loaders / Ray Data decode tasks, Ray services) are sampled from /proc.

A/B in the same invocation: `--ref <git rev>` adds a medvl 1-worker part that imports medvl from that revision's
`platform/` (a regression check: "did this change slow the trainer down?"), `--variant LABEL:K=V[,K=V]` one with
environment variables and/or dotted recipe overrides (e.g. `spin:GOMP_SPINCOUNT=20000`,
`nopic:track.pictures=false`). Both run right after (b) in every round.

medvl's part also prints its start-up timeline (`medvl.track.timeline`: imports, Ray, job, workers, model, data,
first step), from the run's `startup/*` metrics.

Last line: `ratio_vs_open_clip_train=<medvl 1 worker / a> ratio_vs_bare=<medvl 1 worker / c>
ratio_wall_vs_open_clip_train=<whole-run wall-clock of medvl's part / a's>` (each part's process, from
interpreter start to exit; the median over rounds), then `ratio_vs_<rev or label>=<medvl 1 worker / that part>` for
each --ref / --variant. The line before it gives each --ref / --variant part's own three ratios.
Results (JSON), open_clip_train's log and the medvl run roots are kept under `--out/<timestamp>/`.
"""
from __future__ import annotations

import argparse
import dataclasses
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
        return "train_worker"
    if "read_and_decode" in cmd or "MapBatches" in cmd:
        return "decode_tasks"
    if "open_clip_train" in cmd:
        return "open_clip_train"  # its main process and its DataLoader workers (forked, same command line)
    if "--part" in cmd:
        return "driver"
    if cmd.startswith("ray::") or any(x in cmd for x in ("raylet", "gcs_server", "dashboard", "monitor.py",
                                                            "default_worker.py", "setup_worker.py")):
        return "ray_other"  # controller, split coordinator, stats/autoscaler actors, idle workers, services
    return "other"


def _busy_jiffies() -> int:
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(v) - v[3] - v[4]  # all but idle and iowait


class CpuSampler:
    """Every 0.5 s: CPU seconds (user+sys) used so far by each kind of process in this process's tree
    (Ray re-titles its workers `ray::RayTrainWorker...`, `ray::MapBatches(read_and_decode)...`), plus the
    machine's CPU seconds used by processes outside it ("foreign": other people's jobs on a shared machine).
    `between(t0, t1)` gives the CPU seconds of each kind in a wall-clock interval (e.g. the steady state)."""

    def __init__(self):
        self.last: dict[int, int] = {}
        self.total: dict[str, float] = {}
        self.snaps: list[tuple[float, dict[str, float]]] = []
        self.busy0 = _busy_jiffies()
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
            kind = _kind(cmd)  # a reused Ray worker may change role: new ticks go to its current role
            self.total[kind] = self.total.get(kind, 0.0) + (ticks - self.last.get(pid, 0)) / _TICK
            self.last[pid] = ticks
        ours = sum(self.total.values())
        snap = dict(self.total)
        snap["foreign"] = (_busy_jiffies() - self.busy0) / _TICK - ours
        self.snaps.append((time.time(), snap))

    def _run(self):
        while not self._stop.wait(0.5):
            self.sample()

    def __enter__(self):
        self.sample()
        self.total = {}  # count only what is used from now on (already running processes: their baseline)
        self.busy0 = _busy_jiffies()
        self.snaps = []
        self.sample()
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()
        self.sample()

    def between(self, t0: float, t1: float) -> dict[str, float]:
        def at(t):
            return min(self.snaps, key=lambda s: abs(s[0] - t))
        (ta, a), (tb, b) = at(t0), at(t1)
        out = {k: round(b.get(k, 0.0) - a.get(k, 0.0), 1) for k in b}
        out = {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.1}
        out["wall_s"] = round(tb - ta, 1)
        return out

    def whole(self) -> dict[str, float]:
        return self.between(self.snaps[0][0], self.snaps[-1][0])


def wait_quiet(max_wait: float, cores: int, threshold: float = 0.25, span: float = 5.0) -> float:
    """Shared machine: wait (at most `max_wait` s) until the whole machine used < `threshold` of its cores over
    the last `span` s, so a part does not start in the middle of someone else's burst. Returns seconds waited."""
    t0 = time.time()
    while time.time() - t0 < max_wait:
        b0 = _busy_jiffies()
        time.sleep(span)
        if (_busy_jiffies() - b0) / _TICK / span / cores < threshold:
            break
    return time.time() - t0


# --------------------------------------------------------------------------- data


def repeat_train(base: Path, out: Path, k: int) -> str:
    """A corpus whose train split is `base`'s repeated k times (the shards copied; other splits dropped; the
    manifest's classes kept); k <= 1: `base` itself."""
    from medvl.data.corpus import Shard, load_manifest, write_manifest
    if k <= 1:
        return str(base)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    m, shards = load_manifest(base), []
    for i in range(k):
        for sh in m.shards:
            if sh.split == "train":
                rel = f"shards/train-{i:03d}-{Path(sh.path).name}"
                shutil.copy(base / sh.path, out / rel)
                shards.append(Shard(rel, "train", sh.rows))
    write_manifest(out, dataclasses.replace(m, source=f"{base} x{k}", shards=shards))
    return str(out)


def make_data(tmp: Path, repeat: int) -> tuple[str, Path, int]:
    """The digits corpus (medvl format; its train split repeated `repeat` times) and a TSV listing the same
    train images (the PNGs it was ingested from), in the same multiplicity, with the first caption."""
    from medvl.data.corpus import iter_rows, shard_paths
    from medvl.data.ingest import ingest_digits
    base = tmp / "digits"
    ingest_digits(str(base))
    rows = list(iter_rows(shard_paths(base, "train"), columns=["sample_id", "texts"]))
    corpus = repeat_train(base, tmp / f"digits-x{repeat}", repeat)
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


def rotated(parts: list, k: int) -> list:
    """`parts` starting at index k (mod len): the order of round k, so that every part takes every position."""
    k %= max(1, len(parts))
    return parts[k:] + parts[:k]


def parse_variant(v: str) -> tuple[str, tuple[dict, list[str]]]:
    """`LABEL:K=V[,K=V]` -> (label, (environment variables, dotted recipe overrides)): recipe keys are dotted,
    variable names not."""
    label, _, kv = v.partition(":")
    pairs = dict(x.split("=", 1) for x in kv.split(",") if x)
    return label, ({k: x for k, x in pairs.items() if "." not in k}, [f"{k}={x}" for k, x in pairs.items() if "." in k])


def checkout_platform(rev: str, work: Path) -> str:
    """`platform/` of an older git revision, extracted under the results directory; its path goes first on
    PYTHONPATH of that part (medvl's own package, while the benchmark script and the data stay this one's)."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE, capture_output=True, text=True,
                          check=True).stdout.strip()
    dest = work / f"ref-{''.join(c if c.isalnum() else '_' for c in rev)}"
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "platform"], cwd=root, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return str(dest / "platform")


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
    # one line per step (--log-every-n-steps 1), "<asctime> | INFO | Train Epoch: ... Batch (t): <avg>, X/s, ..."
    # with X = batch / that step's time (data wait included); asctime has 1 s resolution (only used for CPU
    # accounting of the steady-state interval)
    steps = re.findall(r"^(\d{4}-\d\d-\d\d,\d\d:\d\d:\d\d) \| INFO \| Train Epoch: .*?"
                       r"Batch \(t\): [\d.]+, ([\d.eE+-]+)/s,", text, flags=re.M)
    if out.returncode != 0 or not steps:
        raise RuntimeError(f"open_clip_train failed (rc {out.returncode}):\n{text[-3000:]}")
    threads = re.search(r"torch threads (\d+)", text)
    windows = [[1, a.batch_size / float(r), time.mktime(time.strptime(ts, "%Y-%m-%d,%H:%M:%S")) + 0.5]
               for ts, r in steps]
    return {"windows": windows, "wall_s": wall, "torch_threads": int(threads.group(1)) if threads else None,
            "cpu": cpu}


def mlflow_windows(tracking_uri: str, run_id: str, batch: int) -> list[list[float]]:
    """[steps, seconds, end time] per `train.log_every` window, from a run's `train/samples_per_s` history."""
    from mlflow.tracking import MlflowClient
    hist = sorted(MlflowClient(tracking_uri).get_metric_history(run_id, "train/samples_per_s"), key=lambda m: m.step)
    windows, prev = [], 0
    for m in hist:  # value = global batch x steps in window / window time; timestamp = end of window (ms)
        n = m.step - prev
        windows.append([n, batch * n / m.value, m.timestamp / 1000])
        prev = m.step
    return windows


def part_medvl(a) -> dict:
    from mlflow.tracking import MlflowClient

    from medvl.config import load_recipe
    from medvl.train.launcher import run_training
    os.environ.pop("RAY_ADDRESS", None)  # always an embedded Ray on this machine
    root = Path(a.work) / f"medvl-{a.workers}w"
    shutil.rmtree(root, ignore_errors=True)
    os.environ["MEDVL_RUN_ROOT"] = str(root)
    data = {
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
        "runtime": {"run_root": str(root)}}
    try:  # as `medvl train` loads its recipe: while Ray starts (a --ref older than 35e088c: one after the other)
        from medvl.config import peek_runtime
        from medvl.train.launcher import load_while_ray_starts
    except ImportError:
        recipe = load_recipe(data=data, overrides=a.set or None)
    else:
        recipe = load_while_ray_starts(lambda: load_recipe(data=data, overrides=a.set or None),
                                       peek_runtime(overrides=a.set, data=data))
    t0 = time.perf_counter()
    with CpuSampler() as cpu:
        job, _ = run_training(recipe)
    wall = time.perf_counter() - t0
    windows = mlflow_windows(job.tracking_uri, job.mlflow_run_id, a.batch_size)
    wait = MlflowClient(job.tracking_uri).get_metric_history(job.mlflow_run_id, "train/data_wait_s")
    run = MlflowClient(job.tracking_uri).get_run(job.mlflow_run_id)
    startup = {k.split("/", 1)[1][:-2]: v for k, v in run.data.metrics.items()
               if k.startswith("startup/") and not k.startswith("startup/restart_")}
    return {"windows": windows, "wall_s": wall, "steps_expected": job.total_steps, "startup_s": startup,
            "data_wait_s_per_step": [m.value for m in sorted(wait, key=lambda m: m.step)],
            "tracking_uri": job.tracking_uri, "run_id": job.mlflow_run_id, "cpu": cpu}


def part_bare(a) -> dict:
    import math

    import torch
    if a.with_ray:  # the same loop next to an idle embedded Ray, started as medvl starts it
        os.environ.pop("RAY_ADDRESS", None)
        from medvl.train.launcher import ensure_ray
        ensure_ray()
        settle_ray(a.cpus_per_worker)
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
    windows = []
    with CpuSampler() as cpu:
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
            windows.append([1, time.perf_counter() - t0, time.time()])
    return {"windows": windows, "torch_threads": torch.get_num_threads(), "cpu": cpu}


def settle_ray(cores: int, timeout: float = 30.0) -> None:
    """Wait until the Ray just started has finished starting its processes (the machine quiet again), so the
    loop next to it meets Ray's idle state, not its start-up."""
    time.sleep(2.0)
    wait_quiet(timeout, cores)


# --------------------------------------------------------------------------- driver


def steady(windows: list[list[float]], batch: int, warmup: int, group: int) -> dict:
    """windows: [steps, seconds, end time] in order. Drop windows that start before step `warmup`; then
    samples/s = batch x steps / seconds, and the median over ~`group`-step windows."""
    kept, start, t_begin = [], 0, None
    for n, t, t_end in windows:
        if start >= warmup:
            kept.append((int(n), t))
            if t_begin is None:
                t_begin = t_end - t
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
            "steps_total": start, "steps_measured": steps,
            "interval": [t_begin, windows[-1][2]] if kept else None}


def run_part(name: str, a, env: dict | None = None, sets: list[str] | None = None, **extra) -> dict:
    waited = wait_quiet(a.wait_quiet, os.cpu_count() or 2)
    if waited > 6:
        print(f"      (waited {waited:.0f} s for the machine to go quiet)", flush=True)
    args = [sys.executable, __file__, "--part", name, "--work", a.work, "--model", a.model,
            "--batch-size", str(a.batch_size), "--epochs", str(a.epochs),
            "--loader-workers", str(a.loader_workers), "--log-every", str(a.log_every), "--warmup", str(a.warmup)]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    for s in (a.set or []) + (sets or []):
        args += ["--set", s]
    a.part_seq = getattr(a, "part_seq", 0) + 1  # rounds keep their own result and log files
    tag = "".join(c if c.isalnum() else "_" for c in (env or {}).get("MEDVL_BENCH_LABEL", ""))
    kind = name + ("_ray" if extra.get("with_ray") else "")
    res_file = Path(a.work) / f"part{a.part_seq:02d}-{kind}-{extra.get('workers', '')}{tag}.json"
    args += ["--result", str(res_file)]
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})})
    proc_wall = time.perf_counter() - t0
    res_file.with_suffix(".log").write_text(p.stdout + p.stderr)
    if p.returncode != 0 or not res_file.exists():
        raise RuntimeError(f"part {name} failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")
    r = json.loads(res_file.read_text())
    r["process_wall_s"] = proc_wall  # the whole part: interpreter, imports, start-up, training, shutdown
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-vit-tiny",
                    help="a medvl/open_clip model name; e.g. cxr-vit-small (224 px: the 32 px digits are upscaled "
                         "by the model's own train transform, so decoding costs more)")
    ap.add_argument("--batch-size", type=int, default=64, help="global batch")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, help="instead of --epochs: at least this many steps (rounded up to "
                                              "whole epochs, since open_clip_train has no max-steps)")
    ap.add_argument("--repeat", type=int, default=2, help="repeat the digits train split k times (longer epochs)")
    ap.add_argument("--loader-workers", type=int, default=2,
                    help="open_clip_train --workers and medvl data.decode_tasks")
    ap.add_argument("--log-every", type=int, default=5, help="medvl train.log_every (MLflow logging window)")
    ap.add_argument("--warmup", type=int, default=10, help="steps excluded from the steady state")
    ap.add_argument("--skip-two-workers", action="store_true", help="skip the medvl 2 workers x 1 CPU run")
    ap.add_argument("--parts", default="a,b1,b2,c", help="which runs: a (open_clip_train), b1 / b2 (medvl 1 / 2 "
                                                         "workers), c (bare), r (bare next to an idle embedded Ray: "
                                                         "what Ray's own processes cost the loop); comma-separated "
                                                         "(default: a,b1,b2,c)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the parts this many times, interleaved (a, b1, b2, c, a, b1, ...); each figure is "
                         "the median over rounds, so one burst of other jobs on a shared machine cannot decide it")
    ap.add_argument("--wait-quiet", type=float, default=120,
                    help="before each part, wait up to this many seconds for the shared machine to be idle")
    ap.add_argument("--ref", action="append", default=[], metavar="GIT_REV",
                    help="also run medvl 1 worker from this git revision's platform/ (e.g. a commit before a change) "
                         "in the same invocation; prints ratio_vs_<rev> (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:K=V[,K=V]",
                    help="also run medvl 1 worker with these environment variables and dotted recipe overrides "
                         "(e.g. spin:GOMP_SPINCOUNT=20000 or nopic:track.pictures=false); prints "
                         "ratio_vs_<label> (repeatable)")
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
    ap.add_argument("--with-ray", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.part:
        fn = {"open_clip_train": part_open_clip_train, "medvl": part_medvl, "bare": part_bare}[a.part]
        r = fn(a)
        if a.with_ray:
            import ray
            ray.shutdown()
        cpu = r.pop("cpu")
        st = steady(r["windows"], a.batch_size, a.warmup, max(a.log_every, 5))
        r["cpu_whole_run"] = cpu.whole()
        r["cpu_steady_state"] = cpu.between(*st["interval"]) if st["interval"] else None
        Path(a.result).write_text(json.dumps(r))
        if a.part == "medvl":  # exits as `medvl train` does (medvl.cli.exit_now; a --ref older than it: sys.exit)
            from medvl import cli
            getattr(cli, "exit_now", sys.exit)(0)
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
    rounds: dict[str, list[float]] = {}
    refs = {rev: checkout_platform(rev, work) for rev in a.ref}
    variants = dict(parse_variant(v) for v in a.variant)

    walls: dict[str, list[float]] = {}

    def show(key: str, label: str, r: dict) -> None:
        st = steady(r["windows"], a.batch_size, a.warmup, max(a.log_every, 5))
        r.update(st)
        rounds.setdefault(key, []).append(st["samples_per_s"])
        r["rounds_samples_per_s"] = rounds[key]
        if "process_wall_s" in r:
            walls.setdefault(key, []).append(r["process_wall_s"])
            r["rounds_process_wall_s"] = walls[key]
        res[key] = r
        wall = f", whole run {r['process_wall_s']:.0f} s wall" if "process_wall_s" in r else ""
        print(f"{label:<36} {st['samples_per_s']:7.1f} samples/s steady state  (median window "
              f"{st['median_window_samples_per_s']:.1f}; {st['steps_measured']}/{st['steps_total']} steps{wall})",
              flush=True)
        if r.get("startup_s"):
            ph = r["startup_s"]
            print(f"{'':<6}start-up timeline (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items() if k != "total")
                  + f"  = {ph.get('total', float('nan')):.1f} s to the first step", flush=True)
        c = r.get("cpu_steady_state")
        if c:
            share = c.get("foreign", 0.0) / max(1e-9, c["wall_s"] * cores)
            r["foreign_share"] = share
            print(f"{'':<6}CPU seconds in the steady state, by process: {c}"
                  f"{'  <- NOISY: other jobs used %.0f%% of the machine' % (100 * share) if share > 0.1 else ''}",
                  flush=True)

    parts = set(a.parts.split(","))
    jobs = []  # (key, title, run): one round's parts
    if "a" in parts:
        jobs.append(("open_clip_train", f"(a) open_clip_train, {a.loader_workers} loader workers",
                     lambda: run_part("open_clip_train", a, tsv=tsv)))
    if "b1" in parts:
        jobs.append(("medvl_1w", f"(b) medvl 1 worker x {cores} CPUs",
                     lambda: run_part("medvl", a, corpus=corpus, workers=1, cpus_per_worker=cores)))
    for rev, path in refs.items():
        jobs.append((f"medvl_1w@{rev}", f"(b) medvl 1 worker at {rev}",
                     lambda path=path, rev=rev: run_part("medvl", a, env={"PYTHONPATH": path, "MEDVL_BENCH_LABEL": rev},
                                                         corpus=corpus, workers=1, cpus_per_worker=cores)))
    for label, (env, sets) in variants.items():
        jobs.append((f"medvl_1w[{label}]", f"(b) medvl 1 worker [{label}]",
                     lambda label=label, env=env, sets=sets: run_part(
                         "medvl", a, env={**env, "MEDVL_BENCH_LABEL": label}, sets=sets, corpus=corpus, workers=1,
                         cpus_per_worker=cores)))
    if "b2" in parts and not a.skip_two_workers and a.batch_size % 2 == 0 and cores >= 2:
        jobs.append(("medvl_2w", f"(b) medvl 2 workers x {cores // 2} CPU",
                     lambda: run_part("medvl", a, corpus=corpus, workers=2, cpus_per_worker=cores // 2)))
    if "c" in parts:
        jobs.append(("bare", f"(c) bare PyTorch loop, {cores} threads",
                     lambda: run_part("bare", a, steps_total=total, cpus_per_worker=cores)))
    if "r" in parts:
        jobs.append(("bare_ray", "(r) bare loop next to an idle Ray",
                     lambda: run_part("bare", a, steps_total=total, cpus_per_worker=cores, with_ray=True)))
    for k in range(a.rounds):
        if a.rounds > 1:
            print(f"--- round {k + 1}/{a.rounds}", flush=True)
        # round k starts at the k-th part: no part always runs first or right after the same neighbour (an A/A run
        # of identical code measured 0.96-1.00 for the first part against the second, 2026-12-05)
        for key, title, run in rotated(jobs, k):
            show(key, title, run())
    for key, vals in rounds.items():
        res[key]["samples_per_s"] = statistics.median(vals)
    if a.rounds > 1:
        print("median over rounds (samples/s): " + ", ".join(f"{k} {statistics.median(v):.1f} "
              f"[{' '.join(f'{x:.0f}' for x in v)}]" for k, v in rounds.items()), flush=True)
        if "medvl_1w" in rounds:
            for ref in ("open_clip_train", "bare", "bare_ray"):
                if ref in rounds:
                    per = [o / r for o, r in zip(rounds["medvl_1w"], rounds[ref])]
                    print(f"per-round medvl 1 worker / {ref}: {' '.join(f'{x:.2f}' for x in per)}", flush=True)
    for k, r in res.items():
        if r["steps_total"] != total:
            print(f"WARNING: {k} ran {r['steps_total']} steps, expected {total}", flush=True)
    if "medvl_1w" in res:
        w = res["medvl_1w"]["data_wait_s_per_step"][1:]
        print(f"medvl 1 worker: mean data wait {statistics.mean(w) * 1000 if w else float('nan'):.0f} ms/step "
              f"(after the first window)", flush=True)
    ours = res.get("medvl_1w", {}).get("samples_per_s", float("nan"))
    oc = res.get("open_clip_train", {}).get("samples_per_s", float("nan"))
    bare = res.get("bare", {}).get("samples_per_s", float("nan"))
    summary = {"model": a.model, "batch_size": a.batch_size, "epochs": a.epochs, "steps": total, "rows": rows,
               "same_preprocessing": same_pp, "cores": cores, "loader_workers": a.loader_workers,
               "log_every": a.log_every, "warmup": a.warmup, "set": a.set, "results": res,
               "wall_s": time.perf_counter() - t_start}
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"results: {work / 'results.json'} (total {summary['wall_s']:.0f} s)", flush=True)
    extra = "".join(f" ratio_vs_{k.split('@', 1)[1] if '@' in k else k.split('[', 1)[1].rstrip(']')}="
                    f"{ours / r['samples_per_s']:.2f}" for k, r in res.items() if "@" in k or "[" in k)
    def wall(key: str) -> float:  # median whole-run wall-clock over rounds
        return statistics.median(walls[key]) if walls.get(key) else float("nan")
    wall_ours, wall_oc = wall("medvl_1w"), wall("open_clip_train")
    for k, r in res.items():  # each --ref / --variant part against the same references
        if "@" in k or "[" in k:
            print(f"{k}: ratio_vs_open_clip_train={r['samples_per_s'] / oc:.2f} "
                  f"ratio_vs_bare={r['samples_per_s'] / bare:.2f} "
                  f"ratio_wall_vs_open_clip_train={wall(k) / wall_oc:.2f}", flush=True)
    if "bare_ray" in res:  # Ray's idle processes' share of the gap to the bare loop (this machine, this load)
        bare_ray = res["bare_ray"]["samples_per_s"]
        print(f"ratio_bare_ray_vs_bare={bare_ray / bare:.2f} medvl_ratio_vs_bare_ray={ours / bare_ray:.2f}",
              flush=True)
    print(f"ratio_vs_open_clip_train={ours / oc:.2f} ratio_vs_bare={ours / bare:.2f} "
          f"ratio_wall_vs_open_clip_train={wall_ours / wall_oc:.2f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
