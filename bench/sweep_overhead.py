"""Sweep overhead and ASHA savings on the digits demo: two sweeps back to back in one invocation.

    .venv/bin/python bench/sweep_overhead.py [--samples 4] [--epochs 3] [--corpus runs/corpora/digits]
    ./dev bench sweep_overhead

Both sweeps run `jobs/sweep_digits_small.yaml` (1 worker per trial, up to 2 trials at a time) with the same seed
and `n_startup_trials = samples`, so Optuna proposes the same configurations to both: the first with ASHA
(grace 1 epoch, reduction factor 2), the second with `scheduler.kind=none` (every trial to the end). The second
reuses finished trials' Tune actors (`resources.reuse_actors`, the default; never with ASHA, see
`medvl.tune.spec.ResourcesSpec`); `--no-reuse-sweep` adds a third sweep, every trial to the end in a new actor each
(`resources.reuse_actors=false`), so the reuse's effect on the per-trial overhead is measured in the same
invocation (`overhead_ratio_reuse_vs_new`). The trials train the default way: `train.launch: auto`, which for these
1-worker trials is `in_process` (each trial trains inside its Tune actor: no Train controller or worker group per
trial); `--workers` adds the full sweep with `train.launch=workers` (Ray Train's controller and worker group per
trial, the default before 2026-12-04), printed as `overhead_ratio_in_process_vs_workers`.

Per-trial overhead = the trial's start (Tune `on_trial_start`, recorded by `SweepCallback`) -> its first training
step done (timestamp of the child run's first `train/loss`, logged every step here), split into trial start ->
MLflow child run created (trial actor + `prepare_job`) and run created -> first step (Train controller, worker
group, Ray Data pipeline, model build, held-out set decode, one step). Compute = trial-seconds × CPUs reserved
per trial, and epochs trained. The trial's own start-up phases (`startup/*` metrics of its child run, see
`medvl.track.timeline`: job, workers, model, data, first step) are printed as medians. Output: a report on stdout and `bench/out/sweep_overhead/summary.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "jobs" / "sweep_digits_small.yaml"


def _corpus(arg: str | None) -> str:
    if arg:
        return str(Path(arg).resolve())
    default = ROOT / "runs" / "corpora" / "digits"
    if (default / "manifest.json").exists():
        return str(default)
    from medvl.data.ingest import ingest_digits
    out = Path(tempfile.mkdtemp(prefix="medvl-digits-")) / "digits"
    ingest_digits(str(out))
    return str(out)


def _timings(out, metric: str) -> list[dict]:
    """Per trial: overhead parts from the Tune start time and the child run's first train/loss timestamp."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(out.tracking_uri)
    rows = []
    for r in out.table.to_dict("records"):
        if not r.get("mlflow_run_id") or r.get("trial_start") is None:
            continue
        run = client.get_run(r["mlflow_run_id"])
        hist = sorted(client.get_metric_history(r["mlflow_run_id"], "train/loss"), key=lambda m: m.step)
        created = run.info.start_time / 1000
        first = hist[0].timestamp / 1000 if hist else float("nan")
        phases = {k.split("/", 1)[1][:-2]: v for k, v in run.data.metrics.items()
                  if k.startswith("startup/") and not k.startswith("startup/restart_") and k != "startup/total_s"}
        rows.append({"trial_id": r["trial_id"], "first_step": hist[0].step if hist else None, "phases": phases,
                     "start_to_run_s": created - r["trial_start"], "run_to_first_step_s": first - created,
                     "overhead_s": first - r["trial_start"], "trial_wall_s": r["trial_wall_s"],
                     "epochs": r["epoch"], "objective": r[metric], "stopped_early": r["stopped_early"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--corpus", default=None, help="digits corpus (default: runs/corpora/digits, else ingest one)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "sweep_overhead"))
    p.add_argument("--no-reuse-sweep", action="store_true",
                   help="also run the full sweep with a new Tune actor per trial (resources.reuse_actors=false)")
    p.add_argument("--workers", action="store_true",
                   help="also run the full sweep with train.launch=workers (a Ray Train controller and worker group "
                        "per trial) and print overhead_ratio_in_process_vs_workers (the default trains 1-worker "
                        "trials in their Tune actors)")
    a = p.parse_args(argv)

    from medvl.tune.spec import load_sweep
    from medvl.tune.sweep import reuses_actors, run_sweep

    corpus = _corpus(a.corpus)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_root = Path(tempfile.mkdtemp(prefix="run-", dir=out_dir))
    common = [f"data.corpus={corpus}", f"runtime.run_root={run_root}", f"num_samples={a.samples}",
              f"train.epochs={a.epochs}", f"n_startup_trials={a.samples}", "train.log_every=1"]
    results = {}
    variants = [("asha", "asha", True, []), ("full", "none", True, [])]
    if a.no_reuse_sweep:
        variants.append(("full-new-actors", "none", False, []))
    if a.workers:
        variants.append(("full-workers", "none", True, ["train.launch=workers"]))
    for label, sched, reuse, extra in variants:
        spec = load_sweep(SWEEP, [*common, f"name=bench-{label}", f"scheduler.kind={sched}",
                                  f"resources.reuse_actors={str(reuse).lower()}", *extra])
        print(f"[bench] sweep {label}: {a.samples} trials × {a.epochs} epochs, scheduler={sched}, "
              f"trial actors reused: {reuses_actors(spec)}{' ' + ' '.join(extra) if extra else ''}", flush=True)
        t0 = time.time()
        out = run_sweep(spec, verbose=0)
        results[label] = {"out": out, "wall_s": time.time() - t0, "trials": _timings(out, spec.metric)}

    metric, keys = spec.metric, list(spec.search_space)
    same = (results["asha"]["out"].table[keys].round(12).to_dict("records")
            == results["full"]["out"].table[keys].round(12).to_dict("records"))
    summary: dict = {"samples": a.samples, "epochs": a.epochs, "metric": metric, "same_configs": same,
                     "cpus_per_trial": results["asha"]["out"].cpus_per_trial,
                     "max_concurrent_trials": results["asha"]["out"].max_concurrent_trials}
    print(f"\n== per-trial timings (same {len(keys)}-dim configurations in both sweeps: {same})")
    for label, res in results.items():
        print(f"-- {label}")
        print("   trial      start->run  run->step1  overhead  wall    epochs  " + metric)
        for t in res["trials"]:
            print(f"   {t['trial_id']}  {t['start_to_run_s']:9.1f}  {t['run_to_first_step_s']:10.1f}  "
                  f"{t['overhead_s']:8.1f}  {t['trial_wall_s']:6.1f}  {t['epochs']!s:6}  {t['objective']:.4f}")
        cpu = res["out"].cpus_per_trial
        summary[label] = {
            "sweep_wall_s": res["wall_s"],
            "trial_seconds": sum(t["trial_wall_s"] for t in res["trials"]),
            "cpu_seconds": cpu * sum(t["trial_wall_s"] for t in res["trials"]),
            "epochs_trained": int(sum(t["epochs"] for t in res["trials"])),
            "stopped_early": int(sum(bool(t["stopped_early"]) for t in res["trials"])),
            "best": max(t["objective"] for t in res["trials"]),
            "overhead_s": [t["overhead_s"] for t in res["trials"]],
            "trials": res["trials"]}
    if "full-new-actors" in summary:
        new = summary["full-new-actors"]["overhead_s"]
        reused = summary["full"]["overhead_s"]
        summary["overhead_median_new_actors_s"] = statistics.median(new)
        summary["overhead_median_reused_s"] = statistics.median(reused)
        summary["overhead_ratio_reuse_vs_new"] = statistics.median(reused) / statistics.median(new)
    if "full-workers" in summary:
        ip, wk = summary["full"]["overhead_s"], summary["full-workers"]["overhead_s"]
        summary["overhead_median_in_process_s"] = statistics.median(ip)
        summary["overhead_median_workers_s"] = statistics.median(wk)
        summary["overhead_ratio_in_process_vs_workers"] = statistics.median(ip) / statistics.median(wk)
    overheads = summary["asha"]["overhead_s"] + summary["full"]["overhead_s"]
    summary["overhead_median_s"] = statistics.median(overheads)
    summary["overhead_mean_s"] = statistics.fmean(overheads)
    for k in ("trial_seconds", "epochs_trained", "sweep_wall_s"):
        summary[f"asha_over_full_{k}"] = summary["asha"][k] / max(summary["full"][k], 1e-9)
    A, F = summary["asha"], summary["full"]
    names = [k for k in ("job", "workers", "model", "data", "first_step")
             if any(k in t["phases"] for res in results.values() for t in res["trials"])]
    def phases(labels):
        return {k: statistics.median(v) for k in names
                if (v := [t["phases"][k] for lb in labels for t in results[lb]["trials"] if k in t["phases"]])}
    summary["phase_median_s"] = phases([lb for lb in results if lb != "full-workers"])
    print("\nper-trial start-up phases (medvl.track.timeline, trial function start -> first step), median s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in summary["phase_median_s"].items()))
    if "full-workers" in results:
        summary["phase_median_workers_s"] = phases(["full-workers"])
        print("  the same with train.launch=workers: "
              + ", ".join(f"{k} {v:.1f}" for k, v in summary["phase_median_workers_s"].items()))
    print(f"\nper-trial overhead (trial start -> first step): median {summary['overhead_median_s']:.1f}s, "
          f"mean {summary['overhead_mean_s']:.1f}s over {len(overheads)} trials")
    if "overhead_ratio_reuse_vs_new" in summary:
        print(f"every trial to the end, reused vs new Tune actors: median overhead "
              f"{summary['overhead_median_reused_s']:.1f}s vs {summary['overhead_median_new_actors_s']:.1f}s; "
              f"sweep wall {summary['full']['sweep_wall_s']:.0f}s vs {summary['full-new-actors']['sweep_wall_s']:.0f}s")
        print(f"overhead_ratio_reuse_vs_new={summary['overhead_ratio_reuse_vs_new']:.2f}")
    if "overhead_ratio_in_process_vs_workers" in summary:
        print(f"every trial to the end, train.launch in_process vs workers: median overhead "
              f"{summary['overhead_median_in_process_s']:.1f}s vs {summary['overhead_median_workers_s']:.1f}s; "
              f"sweep wall {F['sweep_wall_s']:.0f}s vs {summary['full-workers']['sweep_wall_s']:.0f}s")
        print(f"overhead_ratio_in_process_vs_workers={summary['overhead_ratio_in_process_vs_workers']:.2f}")
    print(f"epochs trained: ASHA {A['epochs_trained']} vs full {F['epochs_trained']} "
          f"(ratio {summary['asha_over_full_epochs_trained']:.2f}; {A['stopped_early']} trial(s) stopped early)")
    print(f"trial-seconds:  ASHA {A['trial_seconds']:.0f}s vs full {F['trial_seconds']:.0f}s "
          f"(ratio {summary['asha_over_full_trial_seconds']:.2f}; × {summary['cpus_per_trial']} CPUs per trial)")
    print(f"sweep wall:     ASHA {A['sweep_wall_s']:.0f}s vs full {F['sweep_wall_s']:.0f}s "
          f"(ratio {summary['asha_over_full_sweep_wall_s']:.2f})")
    print(f"best {metric}: ASHA {A['best']:.4f} vs full {F['best']:.4f}")
    print(f"ASHA_compute_ratio={summary['asha_over_full_trial_seconds']:.3f}")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"summary: {out_dir / 'summary.json'} (runs under {run_root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
