"""`medvl tune SWEEP.yaml [key=value ...]`: run (or resume) a hyperparameter sweep.

    medvl tune jobs/sweep_digits_small.yaml
    medvl tune jobs/sweep_digits_small.yaml num_samples=2 train.epochs=1 data.corpus=/tmp/digits
    medvl tune jobs/sweep_digits_lr_temp.yaml scheduler.kind=none search_space.optim.lr.high=1e-2
    medvl tune jobs/sweep_digits_small.yaml --check     # validate only (no Ray, no MLflow)
    medvl tune jobs/sweep_pipeline_probe.yaml           # `base:` a pipeline: search any stage's keys (probe.C)

Overrides: a key whose first part is a sweep field changes the spec (`num_samples`, `scheduler.kind`,
`search_space.<recipe key>.<low|high|values|...>`, `overrides.<recipe key>`, `name`); any other key must be a
recipe key and is applied to the base recipe of every trial. Ctrl+C stops the sweep after saving its state;
the same command resumes it.
"""
from __future__ import annotations

import argparse
import math


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return "-" if v is None else str(v)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="medvl tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep spec in jobs/ (sweep_*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the sweep (or of its base recipe)")
    p.add_argument("--check", action="store_true", help="validate the sweep and exit")
    p.add_argument("--quiet", action="store_true", help="no Tune status tables even with -v")
    a = p.parse_intermixed_args(argv)

    from medvl.tune.spec import load_sweep, validate_sweep
    spec = load_sweep(a.sweep, a.overrides)
    if a.check:
        import os

        from medvl.tune.sweep import check_ray_address
        recipe = validate_sweep(spec)
        address = recipe.runtime.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            check_ray_address(address)
        from medvl.tune.spec import is_pipeline_sweep
        from medvl.tune.sweep import trial_launch
        pipeline = is_pipeline_sweep(recipe)
        what = "pipeline" if pipeline else "recipe"
        how = "" if pipeline else (", each trained in its Tune actor (train.launch: in_process)"
                                   if trial_launch(recipe) == "in_process" else
                                   ", each trained by a Ray Train worker group (train.launch: workers)")
        print(f"sweep '{spec.sweep_name}' is valid: {len(spec.search_space)} dimension(s) over {what} "
              f"'{recipe.name}', {spec.num_samples} trials{how}, objective {spec.mode} {spec.metric}")
        return 0

    from medvl.tune.sweep import run_sweep
    import os

    from medvl.track.console import verbose
    # Tune's status tables only with `medvl -v`; the sweep's own progress line (medvl.tune.progress) otherwise.
    # Tune's new output engine prints its configuration box and TensorBoard hint even at verbose=0; its legacy
    # reporter prints nothing at 0.
    if not verbose():
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    out = run_sweep(spec, verbose=1 if verbose() and not a.quiet else 0)
    keys = list(spec.search_space)
    cols = ["trial_id", *keys, spec.metric, "epoch", "tune_status", "mlflow_status"]
    df = out.table
    print(f"\nsweep '{out.name}' {'finished' if out.complete else 'INTERRUPTED'} in {out.wall_s:.0f}s "
          f"({len(df)} trials, {int(df['stopped_early'].sum()) if len(df) else 0} stopped early by the scheduler)")
    if len(df):
        rows = [[_fmt(r.get(c)) for c in cols] for r in df[[c for c in cols if c in df]].to_dict("records")]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for r in rows:
            print("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)))
    incidents = [r for r in df.to_dict("records") if r.get("incidents")] if len(df) and "incidents" in df else []
    for r in incidents:  # node losses, worker restarts, trial errors: what happened, per trial
        print(f"  trial {r['trial_id']} ({r.get('tune_status')}): {r['incidents']}")
    if out.best:
        params = ", ".join(f"{k}={_fmt(out.best.get(k))}" for k in keys)
        print(f"best: trial {out.best['trial_id']} ({out.best.get('run_name')}): {spec.metric}="
              f"{_fmt(out.best[spec.metric])} with {params}")
    for name, path in out.plots.items():
        print(f"  plot {name}: {'logged' if not path.startswith('skipped') else path}")
    print(f"results: {out.sweep_dir / 'results.csv'}")
    from medvl.redact import redact_uri
    uri = redact_uri(out.tracking_uri)  # a password in $MLFLOW_TRACKING_URI is never printed
    ui = (f"mlflow ui --backend-store-uri {uri} --port 5000   # then open "
          f"http://127.0.0.1:5000/#/experiments/{out.experiment_id}" if uri.startswith("sqlite:")
          else f"{uri.rstrip('/')}/#/experiments/{out.experiment_id}")
    print(f"MLflow: parent run {out.parent_run_id} (trials nested under it): {ui}")
    if not out.complete:
        print(f"resume with: medvl tune {a.sweep} {' '.join(a.overrides)}".rstrip())
        return 130
    if out.best is not None:
        print(f"best_{spec.metric.replace('/', '_')}={out.best[spec.metric]:.4f}")
    return 0 if out.best is not None else 1
