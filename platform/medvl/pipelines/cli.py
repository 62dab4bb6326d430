"""`medvl pipeline RECIPE [overrides] [--only STAGE] [--force STAGE] [--dry-run]`: run a multi-stage pipeline.

    medvl pipeline jobs/pipeline_digits_probe.yaml                      # build what is missing, reuse the rest
    medvl pipeline jobs/pipeline_digits_probe.yaml --dry-run            # what would run / be reused, and why
    medvl pipeline jobs/pipeline_digits_probe.yaml probe.C=0.1          # a new probe key; clip + embed reused
    medvl pipeline jobs/pipeline_digits_probe.yaml --force embed        # rebuild embed (and so everything below)
    medvl pipeline jobs/pipeline_digits_probe.yaml --only probe         # rebuild probe alone (inputs must exist)

Overrides name a stage's key as `<stage>.<key>=value` (`clip.train.epochs=2`) and the pipeline's settings by
section (`cache.root=/shared/stages`, `track.experiment=x`). `--only` and `--force` may be repeated.
"""
from __future__ import annotations

import argparse
import math
import time


def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = [("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths))).rstrip()]
    lines += [("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip() for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def print_plan(p, plans) -> None:
    rows = [[pl.name, pl.kind, "Ray task" if pl.executor == "task" else "driver", pl.action,
             pl.key or "(after inputs)", pl.reason] for pl in plans.values()]
    print(_table(rows, ["stage", "kind", "runs as", "action", "key", "why"]), flush=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="medvl pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="pipeline recipe in jobs/ (a YAML with `stages:`)")
    ap.add_argument("overrides", nargs="*", help="<stage>.<key>=value or <section>.<key>=value")
    ap.add_argument("--only", action="append", default=[], metavar="STAGE",
                    help="rebuild only this stage (its inputs must be complete, or named by --force); repeatable")
    ap.add_argument("--force", action="append", default=[], metavar="STAGE",
                    help="rebuild this stage even if its output exists (stages below it follow); repeatable")
    ap.add_argument("--dry-run", action="store_true", help="print what would be built or reused, and why; run nothing")
    a = ap.parse_intermixed_args(argv)

    from medvl.pipelines import load_pipeline, plan_pipeline
    from medvl.pipelines.runner import cache_root
    p = load_pipeline(a.recipe, a.overrides)
    if a.dry_run:
        plans = plan_pipeline(p, a.only, a.force)
        print(f"pipeline '{p.name}' ({a.recipe}): outputs under {cache_root(p)}/<stage>/<key>/")
        print_plan(p, plans)
        n = {k: sum(pl.action == k for pl in plans.values()) for k in ("build", "reuse", "skip")}
        print(f"dry run: {n['build']} to build, {n['reuse']} reused, {n['skip']} skipped (nothing was run)")
        return 0

    from medvl.pipelines import run_pipeline
    plans = plan_pipeline(p, a.only, a.force)
    print(f"pipeline '{p.name}' ({a.recipe}):", flush=True)
    print_plan(p, plans)
    t0 = time.time()
    from medvl.pipelines import StageFailed
    try:
        out = run_pipeline(p, a.only, a.force)
    except StageFailed as e:
        import sys
        import traceback
        if e.__cause__ is not None:
            traceback.print_exception(e.__cause__)
        print(f"medvl pipeline: error: {e}", file=sys.stderr)
        return 1
    rows = [[r["stage"], r["kind"], r["action"], r.get("key") or "-", f"{r['seconds']:.1f}",
             ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(r["metrics"].items())[:4]) or "-"] for r in out.table]
    print(f"\npipeline '{p.name}' finished in {time.time() - t0:.0f}s "
          f"({sum(r['action'] == 'built' for r in out.table)} built, "
          f"{sum(r['action'] == 'reused' for r in out.table)} reused)")
    print(_table(rows, ["stage", "kind", "action", "key", "s", "metrics"]))
    print(f"outputs: {out.store}/<stage>/<key>/")
    uri = out.tracking_uri or ""
    ui = (f"mlflow ui --backend-store-uri {uri} --port 5000   # then open "
          f"http://127.0.0.1:5000/#/experiments/{out.experiment_id}/runs/{out.run_id}" if uri.startswith("sqlite:")
          else f"{uri.rstrip('/')}/#/experiments/{out.experiment_id}/runs/{out.run_id}")
    print(f"MLflow: pipeline run {out.run_id} (stages nested under it): {ui}")
    leaves = [n for n in p.stages if not p.descendants(n)]
    for r in out.table:
        if r["stage"] in leaves:
            for k, v in sorted(r["metrics"].items()):
                print(f"{r['stage']}/{k}={_fmt(v)}")
    return 0
