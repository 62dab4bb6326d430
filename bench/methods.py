"""Every method's training throughput through medvl against a bare single-process loop of the same model and loss,
and what each method costs over plain CLIP, in ONE invocation (the machine is shared: compare only figures from
one run).

    ./dev bench methods [--methods clip,cxr_clip,pmc_clip,clipin,clip_it,slice_classifier,unet3d] [--epochs 2]
                        [--repeat 2] [--rounds 1]
                        [--batch-size 64] [--warmup 10] [--log-every 5] [--out bench/out]
                        [--ref GIT_REV] [--variant LABEL:K=V[,K=V]]

For each method, its shipped digits recipe (`jobs/digits_clip.yaml`, `jobs/cxr_clip_digits.yaml`,
`jobs/pmc_clip_digits.yaml`, `jobs/clipin_digits.yaml`: the same `digits-vit-tiny` towers, global batch 64), on
the digits corpus (train split repeated `--repeat` times), fp32:

  (m) medvl: `medvl.train.launcher.run_training(recipe)` with 1 Ray Train worker x <cores> CPUs, eval off,
      no model logging; steady-state samples/s from the run's `train/samples_per_s` windows (after `--warmup`
      steps; step time includes waiting for data, as in bench/throughput).
  (b) bare: the same recipe's method (`resolve_method`), model, optimizer (`build_optimizer`), scheduler and
      step (`medvl.train.step.train_step`: forward, every loss term, backward, clipping, AdamW, `after_step`,
      e.g. CLIPin's EMA) on ONE batch decoded once from the same corpus by the method's own decoder, in one
      process, torch threads = cores, no Ray, no data loading in the loop: the compute limit.

Each part runs in a fresh interpreter, one after the other ((m) then (b) per method, methods in order; with
`--rounds R` the whole sequence repeats and each figure is the median over rounds; round r starts each method's
parts at the r-th, so no part always runs first: an A/A run of identical code measured the first part at 0.96-1.00 of
the second).

Printed per method: medvl and bare samples/s, over all steady-state steps and as the median of 5-step windows
(robust to bursts of other jobs on a shared machine; the ratios use it), `ratio_vs_bare` (medvl / bare: medvl's
whole overhead for that method: Ray, streaming, logging) and `cost_vs_clip` (the method's bare samples/s / plain
CLIP's bare samples/s: what the method's extra terms and branches cost on the same towers and batch). Last line:
`methods_ratio_vs_bare=<min over methods> <method>_ratio_vs_bare=... <method>_cost_vs_clip=...`.
A/B in the same invocation: `--ref REV` adds, per method, a medvl part run from that git revision's `platform/`
(a regression check of a change), `--variant LABEL:K=V` one with other environment variables / dotted recipe keys;
each prints `<method>_ratio_vs_<label>` (this code / that part) and `<method>@<label>_ratio_vs_bare`.
CLISC's two trained models run on data made here from brain phantoms (`--phantoms` cases at 2 mm, seed 0):
`slice_classifier` (`jobs/clisc_classifier.yaml`: resnet18 widths 16-128, 128 px, batch 32) on the phantoms'
brain-slices corpus with its `tumour` labels, `unet3d` (`jobs/clisc_unet.yaml`: MONAI UNet, 48^3 patches, batch 2)
on a volume corpus of the same phantoms (preprocessed FLAIR + ground-truth mask: the labels' source does not change
the step); their train splits are repeated so that each run has at least `--min-steps` steps. Their
`cost_vs_clip` is not printed (other models, other inputs). `clip_it` (CLIP-IT's distillation: the `distill`
stage of `jobs/clip_it_digits.yaml`, the digits-vit-tiny image tower + classifier, distilling the frozen text
teacher's embeddings of the paired reports, batch 64) first runs that pipeline up to `pair` (its pairing CLIP for
`--clip-it-epochs` epochs: the step's cost does not depend on how good the pairs are), then trains on the paired
half of the digits, repeated for at least `--min-steps` steps; its `cost_vs_clip` compares with plain CLIP on the
same image tower.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

RECIPES = {"clip": "digits_clip.yaml", "cxr_clip": "cxr_clip_digits.yaml", "pmc_clip": "pmc_clip_digits.yaml",
           "clipin": "clipin_digits.yaml", "slice_classifier": "clisc_classifier.yaml", "unet3d": "clisc_unet.yaml",
           "clip_it": "clip_it_digits.yaml"}  # clip_it: the `distill` stage of that pipeline
CLIP_FAMILY = ("clip", "cxr_clip", "pmc_clip", "clipin")   # the same digits towers: cost_vs_clip is meaningful
COSTED = CLIP_FAMILY + ("clip_it",)  # clip_it: the same image tower, its frozen text teacher, batch 64


def train_rows(corpus: str) -> int:
    from medvl.data.corpus import load_manifest
    return sum(sh.rows for sh in load_manifest(corpus).shards if sh.split == "train")


def make_clisc_data(work: Path, cases: int) -> dict[str, str]:
    """Brain phantoms -> the slice corpus (slice_classifier) and the volume corpus (unet3d)."""
    from medvl.data.ingest_brain import ingest_brain_slices
    from medvl.data.phantom import make_phantoms
    from medvl.data.volumes import find_cases, load_case, preprocess, write_volume_corpus
    ph = work / "phantoms"
    make_phantoms(ph, cases=cases, seed=0, resolution=2)
    ingest_brain_slices(str(ph), str(work / "brain-slices"))
    vols = []
    for f in find_cases(ph):
        v = preprocess(load_case(f, with_mask=True))
        vols.append((f.case_id, "train", v.image, v.mask.astype("uint8"), v.affine))
    write_volume_corpus(work / "volumes", vols)
    return {"slice_classifier": str(work / "brain-slices"), "unet3d": str(work / "volumes")}


def repeated_for_steps(a, corpus: str, batch: int, name: str) -> dict:
    """A method's corpus with its train split repeated until a run has at least `--min-steps` steps."""
    from throughput import repeat_train
    n = train_rows(corpus)
    k = max(1, -(-a.min_steps * batch // max(n * a.epochs, 1)))  # ceil
    c = repeat_train(Path(corpus), Path(a.work) / f"{name}-x{k}", k)
    return {"corpus": c, "batch": batch, "steps_total": (n * k // batch) * a.epochs, "rows": n, "k": k}


def clip_it_data(a) -> dict:
    """CLIP-IT's distillation needs its pipeline's paired corpus and teacher: run `jobs/clip_it_digits.yaml` up to
    `pair` (the pairing CLIP for `--clip-it-epochs` epochs) and write the `distill` stage's recipe with those
    outputs bound."""
    import yaml

    from medvl.config import set_path, to_dict
    from medvl.pipelines import load_pipeline, run_pipeline
    root = Path(a.work) / "clip-it-pipeline"
    digits = str(Path(a.work) / "digits")
    p = load_pipeline(ROOT / "jobs" / RECIPES["clip_it"], [
        f"clip_part.corpus={digits}", f"image_part.corpus={digits}", f"clip.train.epochs={a.clip_it_epochs}",
        f"runtime.run_root={root}", f"track.tracking_uri=sqlite:///{root / 'mlflow.db'}"])
    out = run_pipeline(p, only=["clip_part", "image_part", "clip", "pair"], say=lambda line: print(line, flush=True))
    where = {row["stage"]: Path(row["location"]) for row in out.table if row.get("location")}
    node = p.stages["distill"]
    recipe = to_dict(node.stage.config)
    for key, (stage, sub) in node.refs().items():
        set_path(recipe, key, str(where[stage] / sub if sub else where[stage]))
    path = Path(a.work) / "clip_it_distill.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return {"recipe": str(path), "corpus": recipe["data"]["corpus"], "batch": recipe["data"]["batch_size"],
            "pair_accuracy": out.metrics.get("pair/accuracy")}


def recipe_path(a) -> Path:
    return Path(a.recipe) if getattr(a, "recipe", None) else ROOT / "jobs" / RECIPES[a.method]


def _overrides(a) -> list[str]:
    return [f"data.corpus={a.corpus}", f"data.batch_size={a.batch_size}", "data.val_split=null",
            f"train.epochs={a.epochs}", "train.num_workers=1", f"train.cpus_per_worker={a.cpus}",
            f"train.log_every={a.log_every}", "train.ckpt_every=1000000000", "train.max_failures=0",
            "train.precision=fp32", "eval.every_epoch=false", "track.log_model=false", "track.pictures=false"] + \
        list(getattr(a, "set", None) or [])  # a --variant's recipe keys last: they win


def part_medvl(a) -> dict:
    from throughput import mlflow_windows

    from medvl.config import load_recipe
    from medvl.train.launcher import run_training
    os.environ.pop("RAY_ADDRESS", None)  # always an embedded Ray on this machine
    root = Path(a.work) / f"medvl-{a.method}"
    shutil.rmtree(root, ignore_errors=True)
    os.environ["MEDVL_RUN_ROOT"] = str(root)
    recipe = load_recipe(recipe_path(a), _overrides(a) + [
        f"name=bench-methods-{a.method}", "track.experiment=bench-methods",
        f"track.tracking_uri=sqlite:///{root / 'mlflow.db'}", f"runtime.run_root={root}"])
    job, _ = run_training(recipe)
    return {"windows": mlflow_windows(job.tracking_uri, job.mlflow_run_id, a.batch_size),
            "steps_expected": job.total_steps}


def part_bare(a) -> dict:
    import torch

    from medvl.config import load_recipe
    from medvl.methods import resolve_method
    from medvl.methods.base import decoded_batch
    from medvl.train.optim import build_optimizer, build_scheduler
    from medvl.train.step import StepSettings, train_step
    torch.set_num_threads(a.cpus)
    torch.manual_seed(0)
    recipe = load_recipe(recipe_path(a), _overrides(a))
    m = resolve_method(recipe)
    m.bind(m.dist, torch.device("cpu"))
    model = m.build_model().train()
    opt = build_optimizer(model, recipe.optim)
    sched = build_scheduler(opt, recipe.optim, a.steps_total + 1)
    batch = decoded_batch(m, a.corpus, a.batch_size)
    s = StepSettings(recipe.optim.accum_freq, recipe.optim.grad_clip, "fp32", "cpu")
    windows = []
    for _ in range(a.steps_total):
        t0 = time.perf_counter()
        terms = train_step(m, model, dict(batch), opt, sched, s)
        float(terms["loss"])
        windows.append([1, time.perf_counter() - t0, time.time()])
    return {"windows": windows, "torch_threads": torch.get_num_threads(), "terms": sorted(terms)}


def run_part(name: str, method: str, a, env: dict | None = None, sets: list[str] | None = None,
             tag: str = "") -> dict:
    from throughput import wait_quiet
    waited = wait_quiet(a.wait_quiet, os.cpu_count() or 2)
    if waited > 6:
        print(f"      (waited {waited:.0f} s for the machine to go quiet)", flush=True)
    a.seq = getattr(a, "seq", 0) + 1
    res = Path(a.work) / f"part{a.seq:02d}-{name}-{method}{'-' + tag if tag else ''}.json"
    d = a.per[method]  # this method's corpus, global batch and planned steps
    args = [sys.executable, __file__, "--part", name, "--method", method, "--work", a.work, "--corpus", d["corpus"],
            "--batch-size", str(d["batch"]), "--epochs", str(a.epochs), "--log-every", str(a.log_every),
            "--warmup", str(a.warmup), "--steps-total", str(d["steps_total"]), "--cpus", str(a.cpus),
            "--result", str(res)] + (["--recipe", d["recipe"]] if d.get("recipe") else []) + \
        [f"--set={x}" for x in sets or []]
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "platform"), **(env or {})})
    res.with_suffix(".log").write_text(p.stdout + p.stderr)
    if p.returncode != 0 or not res.exists():
        raise RuntimeError(f"part {name} {method} failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")
    r = json.loads(res.read_text())
    r["process_wall_s"] = time.perf_counter() - t0
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(RECIPES), help="comma-separated, from: " + ", ".join(RECIPES))
    ap.add_argument("--batch-size", type=int, default=64, help="global batch of the digits (CLIP-family) recipes; "
                    "slice_classifier and unet3d use their recipes' own (32, 2)")
    ap.add_argument("--phantoms", type=int, default=8, help="brain phantoms for slice_classifier and unet3d")
    ap.add_argument("--min-steps", type=int, default=300, help="slice_classifier / unet3d: repeat the train split "
                    "until a run has at least this many steps")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="repeat the digits train split k times (longer epochs)")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=10, help="steps excluded from the steady state")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--wait-quiet", type=float, default=60)
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--ref", action="append", default=[], metavar="GIT_REV",
                    help="also run each method through medvl from this git revision's platform/ in the same "
                         "invocation; prints <method>_ratio_vs_<rev> (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:K=V[,K=V]",
                    help="also run each method through medvl with these environment variables and dotted recipe "
                         "overrides; prints <method>_ratio_vs_<label> (repeatable)")
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=["medvl", "bare", "clip_it_data"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--steps-total", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    ap.add_argument("--clip-it-epochs", type=int, default=3, help="clip_it: epochs of its pipeline's pairing CLIP "
                    "(the distillation's throughput does not depend on how good the pairs are)")
    a = ap.parse_args()
    from throughput import make_data, steady

    if a.part == "clip_it_data":
        Path(a.result).write_text(json.dumps(clip_it_data(a)))
        return 0
    if a.part:
        r = {"medvl": part_medvl, "bare": part_bare}[a.part](a)
        r["steady"] = steady(r["windows"], a.batch_size, a.warmup, max(a.log_every, 5))
        Path(a.result).write_text(json.dumps(r))
        return 0

    methods = [x.strip() for x in a.methods.split(",") if x.strip()]
    unknown = [x for x in methods if x not in RECIPES]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {sorted(RECIPES)}")
    if "clip" not in methods:
        methods.insert(0, "clip")  # the baseline of cost_vs_clip
    work = Path(a.out).resolve() / time.strftime("methods-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    a.work = str(work)
    corpus, _, rows = make_data(work, a.repeat)
    a.per = {m: {"corpus": corpus, "batch": a.batch_size, "steps_total": (rows // a.batch_size) * a.epochs}
             for m in methods if m in CLIP_FAMILY}
    print(f"digits-vit-tiny recipes, global batch {a.batch_size}, {rows} train images x {a.epochs} epochs = "
          f"{a.per['clip']['steps_total']} steps (warm-up {a.warmup} excluded), {a.cpus} cores, fp32, 1 worker; "
          f"methods {', '.join(methods)}; {a.rounds} round(s)", flush=True)
    if "clip_it" in methods:  # its pipeline's pairs and teacher, in a fresh interpreter (its own embedded Ray)
        res = work / "clip_it_data.json"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--part", "clip_it_data", "--work", str(work), "--result",
                            str(res), "--clip-it-epochs", str(a.clip_it_epochs)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "platform")})
        (work / "clip_it_data.log").write_text(p.stdout + p.stderr)
        if p.returncode != 0 or not res.exists():
            raise RuntimeError(f"clip_it's pipeline failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")
        ci = json.loads(res.read_text())
        d = a.per["clip_it"] = {**repeated_for_steps(a, ci["corpus"], ci["batch"], "clip_it"), "recipe": ci["recipe"]}
        print(f"clip_it: the distill stage of jobs/{RECIPES['clip_it']} (pairs from a {a.clip_it_epochs}-epoch "
              f"pairing CLIP, pair accuracy {ci['pair_accuracy'] or float('nan'):.3f}; "
              f"{time.perf_counter() - t0:.0f} s) -> {d['rows']} train rows x {d['k']}, global batch {d['batch']}, "
              f"{d['steps_total']} steps", flush=True)
    if any(m not in COSTED for m in methods):
        from medvl.config import load_recipe
        base = make_clisc_data(work, a.phantoms)
        for m in (m for m in methods if m not in COSTED):  # CLISC's models: the recipe's own global batch
            d = a.per[m] = repeated_for_steps(a, base[m], load_recipe(ROOT / "jobs" / RECIPES[m]).data.batch_size, m)
            print(f"{m}: jobs/{RECIPES[m]}, {a.phantoms} phantoms -> {d['rows']} train rows x {d['k']}, global batch "
                  f"{d['batch']}, {d['steps_total']} steps", flush=True)
    from throughput import checkout_platform, parse_variant, rotated
    others: dict[str, tuple[dict, list[str]]] = {}  # label -> (environment, recipe overrides) of a medvl part
    for rev in a.ref:
        others[rev] = ({"PYTHONPATH": checkout_platform(rev, work), "MEDVL_BENCH_LABEL": rev}, [])
    others.update(parse_variant(v) for v in a.variant)
    parts = ["medvl"] + [f"medvl@{k}" for k in others] + ["bare"]
    got: dict[str, dict[str, list[float]]] = {m: {p: [] for p in parts} for m in methods}
    win: dict[str, dict[str, list[float]]] = {m: {p: [] for p in parts} for m in methods}
    for rnd in range(a.rounds):
        for m in methods:
            for part in rotated(parts, rnd):  # round r starts at the r-th part (see throughput.rotated)
                label = part.partition("@")[2]
                env, sets = others.get(label, ({}, []))
                r = run_part(part.partition("@")[0], m, a, env=env, sets=sets,
                             tag="".join(c if c.isalnum() else "_" for c in label))
                sps = r["steady"]["samples_per_s"]
                got[m][part].append(sps)
                win[m][part].append(r["steady"]["median_window_samples_per_s"])
                extra = f", terms {', '.join(r['terms'])}" if part == "bare" else ""
                print(f"  round {rnd + 1} {m:16s} {part:12s} {sps:8.1f} samples/s (median window "
                      f"{r['steady']['median_window_samples_per_s']:.1f}; process {r['process_wall_s']:.0f} s"
                      f"{extra})", flush=True)
    med = {m: {p: statistics.median(v) for p, v in d.items()} for m, d in got.items()}
    wmed = {m: {p: statistics.median(v) for p, v in d.items()} for m, d in win.items()}
    print("\nsamples/s: over all steady-state steps [median of 5-step windows, robust to bursts of other jobs]")
    print("method            medvl            bare             ratio_vs_bare  cost_vs_clip (bare / clip's bare)")
    ratios, tail = {}, []
    for m in methods:  # the ratios use the median windows; the all-steps figures are shown beside them
        rv, rv_all = wmed[m]["medvl"] / wmed[m]["bare"], med[m]["medvl"] / med[m]["bare"]
        cost, cost_all = wmed[m]["bare"] / wmed["clip"]["bare"], med[m]["bare"] / med["clip"]["bare"]
        ratios[m] = rv
        cost_s = f"{cost:5.2f} [all {cost_all:4.2f}]" if m in COSTED else "  n/a (another model)"
        print(f"{m:17s} {med[m]['medvl']:6.1f} [{wmed[m]['medvl']:6.1f}]  {med[m]['bare']:6.1f} "
              f"[{wmed[m]['bare']:6.1f}]  {rv:5.2f} [all {rv_all:4.2f}]   {cost_s}")
        tail += [f"{m}_ratio_vs_bare={rv:.2f}"] + ([f"{m}_cost_vs_clip={cost:.2f}"] if m in COSTED else [])
        for label in others:  # this code against the other revision / variant, and that one against the bare loop
            other = wmed[m][f"medvl@{label}"]
            tail += [f"{m}_ratio_vs_{label}={wmed[m]['medvl'] / other:.2f}",
                     f"{m}@{label}_ratio_vs_bare={other / wmed[m]['bare']:.2f}"]
    (work / "results.json").write_text(json.dumps({"samples_per_s": got, "median_window_samples_per_s": win,
                                                   "median": med, "median_window": wmed}, indent=1))
    print(f"(results: {work})")
    print(f"methods_ratio_vs_bare={min(ratios.values()):.2f} " + " ".join(tail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
