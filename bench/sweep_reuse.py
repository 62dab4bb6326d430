"""What sharing stages across a pipeline sweep's trials saves: the same sweep run twice in ONE invocation, once with
the trials sharing one stage cache (the default: stages with equal keys, the unsearched prefix, are built once) and
once with `share_stages=false` (every trial builds every stage in a cache of its own), each in a fresh run root.

    ./dev bench sweep_reuse [--sweep jobs/sweep_pipeline_probe.yaml] [--set num_samples=4 --set clip.train.epochs=2]
                            [--order shared,unshared] [--out bench/out]

  e.g. ./dev bench sweep_reuse --sweep jobs/sweep_clip_it_lambda.yaml --set num_samples=4 \\
           --set clip.train.epochs=4 --set distill.train.epochs=2

Each sweep is `medvl tune <sweep> <sets> share_stages=<...> runtime.run_root=<fresh>` in its own process (its own
embedded Ray). Printed per sweep: wall-clock (process start to exit), stage builds per stage (output folders in
its cache), the best objective; last line: `reuse_wall_ratio=<shared / unshared wall-clock>` and the stage builds
saved. The digits corpus is ingested into the bench folder first where a train stage reads a corpus of its own
(its `data.corpus` is set to it); CLISC's stages read the phantoms (set-up steps of jobs/clisc_phantom.yaml):

  ./dev bench sweep_reuse --sweep jobs/sweep_clisc_amda_s3f.yaml --set num_samples=2 ... (short trainings)
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def stage_builds(stages: Path) -> Counter:
    """Complete stage outputs under a cache root: `<stage>/<key>/` (shared) or `unshared/<trial>/<stage>/<key>/`."""
    n: Counter = Counter()
    if not stages.is_dir():
        return n
    roots = [stages] + ([d for d in (stages / "unshared").iterdir() if d.is_dir()]
                        if (stages / "unshared").is_dir() else [])
    for r in roots:
        for stage in r.iterdir():
            if stage.is_dir() and stage.name != "unshared":
                n[stage.name] += sum(1 for k in stage.iterdir() if k.is_dir() and not k.name.startswith("."))
    return n


def run_sweep(a, share: bool, corpus_sets: list[str], work: Path) -> dict:
    label = "shared" if share else "unshared"
    root = work / label
    log = work / f"{label}.log"
    cmd = [str(ROOT / ".venv" / "bin" / "medvl"), "tune", a.sweep, *a.set, *corpus_sets,
           f"share_stages={str(share).lower()}", f"runtime.run_root={root}", "--quiet"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "platform")})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{label} sweep failed (rc {p.returncode}); log: {log}\n{log.read_text()[-3000:]}")
    results = next((root / "sweeps").glob("*/results.csv"))
    rows = list(csv.DictReader(open(results)))
    return {"label": label, "wall_s": wall, "builds": stage_builds(root / "stages"), "rows": rows, "log": str(log)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default=str(ROOT / "jobs" / "sweep_pipeline_probe.yaml"))
    ap.add_argument("--set", action="append", default=None, help="sweep override (repeatable); default: "
                    "num_samples=4 clip.train.epochs=2")
    ap.add_argument("--order", default="shared,unshared")
    ap.add_argument("--out", default=str(HERE / "out"))
    a = ap.parse_args()
    a.set = a.set if a.set is not None else ["num_samples=4", "clip.train.epochs=2"]
    sys.path.insert(0, str(ROOT / "platform"))
    from medvl.data.ingest import ingest_digits
    from medvl.tune.spec import load_sweep
    work = Path(a.out).resolve() / time.strftime("sweep_reuse-%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    corpus = work / "digits"
    # the sweep's corpus keys: every train stage's of the pipeline whose data.corpus is not bound to an upstream
    # output (CLISC's are all bound: its data are the phantoms its own stages read)
    spec = load_sweep(a.sweep, a.set)
    from medvl.pipelines import load_pipeline
    from medvl.tune.spec import resolve_base
    p = load_pipeline(resolve_base(spec))
    corpus_sets = [f"{n}.data.corpus={corpus}" for n, node in p.stages.items()
                   if node.kind == "train" and "data.corpus" not in node.bound_keys]
    if corpus_sets:
        ingest_digits(str(corpus))
    print(f"sweep {a.sweep} {' '.join(a.set)}; corpus {corpus}; order {a.order}", flush=True)
    res = {}
    for label in a.order.split(","):
        r = run_sweep(a, label == "shared", corpus_sets, work)
        res[label] = r
        obj = spec.metric
        vals = [float(x[obj]) for x in r["rows"] if x.get(obj) not in (None, "")]
        best = (max(vals) if spec.mode == "max" else min(vals)) if vals else float("nan")
        print(f"  {label:8s} {r['wall_s']:7.1f} s  stage builds {dict(sorted(r['builds'].items()))}  "
              f"best {obj} {best:.4f}  ({len(r['rows'])} trials; log {r['log']})", flush=True)
    s, u = res["shared"], res["unshared"]
    saved = sum(u["builds"].values()) - sum(s["builds"].values())
    print(f"reuse_wall_ratio={s['wall_s'] / u['wall_s']:.2f} shared_wall_s={s['wall_s']:.1f} "
          f"unshared_wall_s={u['wall_s']:.1f} stage_builds_saved={saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
