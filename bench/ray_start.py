"""How long medvl's embedded Ray takes to start, alone and next to another Ray node: this code against older ones.

    ./dev bench ray_start [--rounds 3] [--ref REV ...]

  e.g. ./dev bench ray_start --ref 0b4e93a     # before the dashboard agent's port and the prestarted workers

Each measurement is a fresh interpreter that calls medvl's `ensure_ray` (the embedded Ray of `medvl train`, sweeps and
pipelines; PYTHONPATH = this `platform/` or the ref's, extracted from git), then runs one trivial task and shuts Ray
down. It reports `init_s` (the `ensure_ray` call) and `first_task_s` (submit to result: in one of the workers Ray
prestarted when it started, or in a new Python process when those cannot be used). A second fresh interpreter
reports `job_ready_s`: interpreter start until `medvl train jobs/digits_clip.yaml` would make its first MLflow
call (recipe parsed, embedded Ray up, MLflow's client imported; see `child_job`). Two situations:
  alone   no other Ray on this machine;
  beside  another Ray node runs meanwhile, started by this script with a plain `ray.init()` (Ray's own fixed
          dashboard-agent port, 52365), as with two commands at once, a sweep next to a job, or the test suite's
          two processes.
The parts alternate within each round (round r starts at the r-th part). Printed: every measurement, the medians,
and per situation and ref `<init|first_task|job_ready>_ratio_<ref>_vs_now=<median ref / median now>` (above 1:
this code is faster).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def _pid() -> int:
    return os.getpid()


def child() -> None:
    """One measurement, in a fresh interpreter: medvl's `ensure_ray`, then one task."""
    import ray

    from medvl.train.launcher import ensure_ray
    t0 = time.perf_counter()
    ensure_ray()
    t1 = time.perf_counter()
    ray.get(ray.remote(_pid).remote())
    t2 = time.perf_counter()
    ray.shutdown()
    print("RESULT " + json.dumps({"init_s": t1 - t0, "first_task_s": t2 - t1}), flush=True)


def child_job() -> None:
    """One measurement, in a fresh interpreter: what `medvl train jobs/digits_clip.yaml` does before its first
    MLflow call: parse the recipe (which imports torch, open_clip and the methods), start the embedded Ray, and
    import MLflow's client. Since 35e088c the recipe loads in a helper thread while Ray starts
    (`_parse(..., start_ray=True)`); older code did one after the other."""
    import inspect

    import psutil
    from medvl.train import cli
    argv = [str(ROOT / "jobs" / "digits_clip.yaml")]
    if "start_ray" in inspect.signature(cli._parse).parameters:
        cli._parse("medvl train", argv, start_ray=True)
    else:
        from medvl.train.launcher import ensure_ray
        ensure_ray(cli._parse("medvl train", argv)[1])
    import mlflow.tracking  # noqa: F401 - prepare_job's first call needs these
    from mlflow.store.tracking import sqlalchemy_store  # noqa: F401
    ready = time.time() - psutil.Process().create_time()
    import ray
    ray.shutdown()
    print("RESULT " + json.dumps({"job_ready_s": ready}), flush=True)


def measure(platform_dir: str, mode: str = "--child") -> dict:
    env = {**os.environ, "PYTHONPATH": platform_dir, "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}
    env.pop("RAY_ADDRESS", None)  # always a new embedded Ray
    out = subprocess.run([sys.executable, __file__, mode], env=env, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"measurement failed ({platform_dir}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ref", action="append", default=[], help="also measure `platform/` of this git revision")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-job", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child()
    if a.child_job:
        return child_job()
    from throughput import checkout_platform, rotated
    work = Path(tempfile.mkdtemp(prefix="ray_start-", dir=ROOT / "bench" / "out"))
    codes = {"now": str(ROOT / "platform"), **{rev: checkout_platform(rev, work) for rev in a.ref}}
    got: dict[tuple[str, str], list[dict]] = {}
    for situation in ("alone", "beside"):
        other = None
        if situation == "beside":
            import ray
            ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
            other = ray
            time.sleep(5)  # its agent is up and holds its port
        for rnd in range(a.rounds):
            for label in rotated(list(codes), rnd):
                r = measure(codes[label])
                time.sleep(2)
                r.update(measure(codes[label], "--child-job"))
                got.setdefault((situation, label), []).append(r)
                print(f"{situation:6s} round {rnd + 1} {label:>10s}: init {r['init_s']:.2f} s, first task "
                      f"{r['first_task_s']:.2f} s; medvl train ready {r['job_ready_s']:.2f} s", flush=True)
                time.sleep(2)
        if other is not None:
            other.shutdown()
    metrics = ("init_s", "first_task_s", "job_ready_s")
    med = {k: {m: statistics.median(r[m] for r in v) for m in metrics} for k, v in got.items()}
    print("medians (s):")
    for (situation, label), m in med.items():
        print(f"  {situation:6s} {label:>10s}: init {m['init_s']:.2f}, first task {m['first_task_s']:.2f}, "
              f"medvl train ready {m['job_ready_s']:.2f}")
    for situation in ("alone", "beside"):
        now = med[(situation, "now")]
        print(f"{situation}: " + " ".join(
            f"{m[:-2]}_ratio_{rev}_vs_now={med[(situation, rev)][m] / now[m]:.2f}" for rev in a.ref for m in metrics)
            or f"{situation}: init {now['init_s']:.2f} s (no --ref)")
    (work / "results.json").write_text(json.dumps({f"{s}/{lab}": v for (s, lab), v in got.items()}, indent=1))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
