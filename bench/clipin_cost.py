"""The cost of CLIPin's target branch: memory and samples/s of one training step of the base method vs the same
method with `clipin` on, in ONE invocation (the machine is shared: compare only figures from one run).

    PYTHONPATH=$PWD/platform .venv/bin/python bench/clipin_cost.py [--recipe jobs/clipin_digits.yaml]
        [--batch-size 64] [--steps 30] [--warmup 5] [--rounds 2] [--threads 2] [key=value ...]

Both sides build the recipe's model (the base side with `clipin.enabled=false`) and run `medvl.train.step.train_step`
(forward, loss, backward, AdamW with the trainer's groups, `after_step`: CLIPin's EMA update) on one in-memory
batch of random images/tokens, no data loading, one process, `--threads` torch threads. Each side runs in its own
fresh interpreter, alternating for `--rounds`; each figure is the median over the rounds.

Reported per side: samples/s (batch x timed steps / their time, after `--warmup` steps); state memory (exact:
parameters + gradients + AdamW's two moments of the optimised module, plus the target's parameters and buffers);
peak process memory above the post-import baseline (ru_maxrss, includes activations and allocator slack); on CUDA
`torch.cuda.max_memory_allocated`. Last line: `memory_ratio=<clipin/base peak> state_ratio=... speed_ratio=<clipin /
base samples/s>`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(args) -> None:
    import torch

    from medvl.config import load_recipe
    from medvl.methods import resolve_method
    from medvl.train.optim import build_optimizer, build_scheduler
    from medvl.train.step import StepSettings, train_step
    torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + [f"data.batch_size={args.batch_size}", "data.corpus=unused"]
    if args.part == "base":
        overrides.append("clipin.enabled=false")
    recipe = load_recipe(args.recipe, overrides)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    base_rss = _rss_mb()
    m = resolve_method(recipe)
    m.bind(m.dist, dev)
    model = m.build_model().to(dev)
    opt = build_optimizer(model, recipe.optim)
    sched = build_scheduler(opt, recipe.optim, args.steps + args.warmup)
    dtypes = m.batch_dtypes()
    size = model.inner.clip.visual.image_size if hasattr(model, "inner") else model.clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    ctx = recipe.model  # token ids: random in the tokenizer's range, the context length of the model
    n = args.batch_size
    clip = model.inner.clip if hasattr(model, "inner") else model.clip
    L = int(clip.context_length) if hasattr(clip, "context_length") else 77
    V = int(clip.vocab_size) if hasattr(clip, "vocab_size") else 1000
    g = torch.Generator().manual_seed(1)
    raw = {}
    for k, dt in dtypes.items():
        if k.startswith("image"):
            raw[k] = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        else:
            raw[k] = torch.randint(1, V - 1, (n, L), generator=g, dtype=torch.long)
    del ctx
    s = StepSettings(recipe.optim.accum_freq, recipe.optim.grad_clip, recipe.train.precision, dev.type)
    times = []
    for i in range(args.warmup + args.steps):
        batch = m.prepare_batch({k: v.clone().to(dev) for k, v in raw.items()}, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(m, model, batch, opt, sched, s)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    state = nbytes(model.parameters()) * 2 + nbytes(t for st in opt.state.values() for t in st.values()
                                                   if torch.is_tensor(t) and t.dim() > 0)
    target = getattr(m, "target", None)
    target_bytes = nbytes(list(target.parameters()) + list(target.buffers())) if target is not None else 0
    out = {"part": args.part, "samples_per_s": n * len(times) / sum(times),
           "state_mb": (state + target_bytes) / 2**20, "target_mb": target_bytes / 2**20,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "peak_rss_mb": _rss_mb() - base_rss,
           "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None}
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="jobs/clipin_digits.yaml")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=["base", "clipin"], help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="recipe overrides for both sides (key=value)")
    args = ap.parse_args()
    if args.part:
        return child(args)
    res: dict[str, list[dict]] = {"base": [], "clipin": []}
    for r in range(args.rounds):
        for part in ("base", "clipin"):
            cmd = [sys.executable, __file__, "--part", part, "--recipe", args.recipe, "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
                   str(args.threads), *args.overrides]
            p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                sys.exit(f"{part} failed:\n{p.stderr[-3000:]}")
            res[part].append(json.loads(line[-1][len("RESULT "):]))
            print(f"round {r + 1} {part}: {res[part][-1]}", flush=True)
    med = {part: {k: statistics.median(x[k] for x in rows) for k in rows[0] if isinstance(rows[0][k], (int, float))}
           for part, rows in res.items()}
    for part in ("base", "clipin"):
        print(f"{part:7s} " + " ".join(f"{k}={v:.3f}" for k, v in med[part].items()))
    b, c = med["base"], med["clipin"]
    cuda = f" cuda_memory_ratio={c['cuda_peak_mb'] / b['cuda_peak_mb']:.2f}" if "cuda_peak_mb" in b else ""
    print(f"memory_ratio={c['peak_rss_mb'] / b['peak_rss_mb']:.2f} state_ratio={c['state_mb'] / b['state_mb']:.2f}"
          f"{cuda} speed_ratio={c['samples_per_s'] / b['samples_per_s']:.2f}")


if __name__ == "__main__":
    main()
