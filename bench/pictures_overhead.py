"""What drawing the run's pictures at each epoch end costs training: the same short run with `track.pictures` off and
on, in ONE invocation (one Ray cluster, alternating), comparing training samples/s (the mean of the logged
`train/samples_per_s`, which excludes evaluation and start-up) and the seconds each drawing took (`time/pictures_s`,
spent in rank 0's background thread).

    PYTHONPATH=$PWD/platform RAY_AUTH_MODE=disabled .venv/bin/python bench/pictures_overhead.py \\
        [--recipe jobs/digits_clip.yaml] [--rounds 1] [key=value ...]

Last line: `speed_ratio=<on/off samples/s> pictures_s_mean=<s> pictures_s_max=<s>`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="jobs/digits_clip.yaml")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("overrides", nargs="*", default=["train.epochs=3", "eval.max_rows=200"])
    a = p.parse_args()
    from mlflow.tracking import MlflowClient

    from medvl.config import load_recipe
    from medvl.data.ingest import ingest_digits
    from medvl.track import runs
    from medvl.train.launcher import run_training
    tmp = tempfile.mkdtemp(prefix="medvl-bench-pictures-")
    corpus = os.path.join(tmp, "digits")
    ingest_digits(corpus)
    speeds: dict[bool, list[float]] = {False: [], True: []}
    pics: list[float] = []
    for r in range(a.rounds):
        for on in (False, True):
            recipe = load_recipe(a.recipe, [*a.overrides, f"data.corpus={corpus}", f"runtime.run_root={tmp}/runs",
                                            f"track.pictures={str(on).lower()}", f"name=pictures-{on}-{r}",
                                            "track.experiment=bench-pictures", "track.log_model=false"])
            t0 = time.perf_counter()
            job, _ = run_training(recipe)
            wall = time.perf_counter() - t0
            c = MlflowClient(runs.tracking_uri(recipe))
            sps = [m.value for m in c.get_metric_history(job.mlflow_run_id, "train/samples_per_s")][1:]
            speeds[on].append(statistics.mean(sps))
            ps = [m.value for m in c.get_metric_history(job.mlflow_run_id, "time/pictures_s")]
            pics += ps
            print(f"round {r} pictures={'on ' if on else 'off'}: {statistics.mean(sps):8.1f} samples/s "
                  f"(mean of {len(sps)} windows), wall {wall:.1f} s, drawings {[round(x, 2) for x in ps]}",
                  flush=True)
    off, on = statistics.median(speeds[False]), statistics.median(speeds[True])
    print(f"speed_ratio={on / off:.3f} pictures_s_mean={statistics.mean(pics):.2f} pictures_s_max={max(pics):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
