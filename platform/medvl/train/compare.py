"""`medvl compare`: train two recipes (or one recipe with two override sets) on the same data, budget and seed,
and log them side by side: a parent MLflow run with both runs nested under it and a table of their final metrics.

    medvl compare jobs/digits_clip.yaml jobs/cxr_clip_digits.yaml --name clip-vs-cxr
    medvl compare jobs/digits_clip.yaml --a loss.kind=clip --b loss.kind=siglip --label-a clip --label-b siglip
    medvl compare jobs/a.yaml jobs/b.yaml train.epochs=3          # overrides for both sides

What "the same" means is checked before anything trains: the corpus and its splits, the global batch, the epochs
and step budget, and the seed must be equal on both sides (an error names every key that differs). Each side
is a normal training run named `<name>-<label>` (re-running the command resumes or reuses both), tagged
`medvl.compare=<name>`. The table (`compare/table.csv` / `table.md` on the parent run, and printed) holds every
numeric final metric of either run plus its wall-clock; the parent's metrics are `<label>/<metric>`.
"""
from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Optional

from medvl.config import ConfigError, Recipe, apply_overrides, load_recipe, to_dict

SAME_KEYS = ("data.corpus", "data.train_split", "data.val_split", "data.val_corpus", "data.batch_size",
             "train.epochs", "train.max_steps", "train.seed")
"""Keys that define "the same data, budget and seed"."""


@dataclass
class Comparison:
    name: str
    labels: tuple[str, str]
    recipes: tuple[Recipe, Recipe]
    parent_run_id: str
    run_ids: tuple[str, str]
    table: Any
    """pandas DataFrame: one row per metric, one column per side."""
    tracking_uri: str


def _get(d: dict, key: str):
    for p in key.split("."):
        d = d.get(p) if isinstance(d, dict) else None
    return d


def check_same_budget(a: Recipe, b: Recipe) -> None:
    da, db = to_dict(a), to_dict(b)
    diff = [f"{k} ({_get(da, k)!r} vs {_get(db, k)!r})" for k in SAME_KEYS if _get(da, k) != _get(db, k)]
    if diff:
        raise ConfigError("the two sides must train on the same data, budget and seed; these differ: "
                          + "; ".join(diff))


def plan(recipe_a: str, recipe_b: Optional[str], over_a: list[str], over_b: list[str], common: list[str],
         name: Optional[str], labels: tuple[str, str]) -> tuple[str, Recipe, Recipe]:
    if labels[0] == labels[1]:
        raise ConfigError(f"--label-a and --label-b must differ (both {labels[0]!r})")
    for lab in labels:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", lab):
            raise ConfigError(f"label {lab!r}: letters, digits, '.', '_' or '-' only (it names a run)")
    ra = load_recipe(recipe_a, list(common) + list(over_a))
    rb = load_recipe(recipe_b or recipe_a, list(common) + list(over_b))
    if recipe_b is None and not over_a and not over_b:
        raise ConfigError("compare one recipe with itself? give a second recipe or --a/--b overrides")
    if not name:
        name = f"compare-{ra.name}-vs-{rb.name}" if recipe_b else f"compare-{ra.name}"
    check_same_budget(ra, rb)
    out = []
    for r, lab in ((ra, labels[0]), (rb, labels[1])):
        d = apply_overrides(to_dict(r), {"track.run_name": f"{name}-{lab}", "track.experiment": ra.track.experiment})
        out.append(load_recipe(data=d))
    return name, out[0], out[1]


def run_comparison(name: str, a: Recipe, b: Recipe, labels: tuple[str, str] = ("a", "b")) -> Comparison:
    import pandas as pd

    from medvl.track import runs
    from medvl.train.launcher import ensure_ray, run_training
    uri = runs.tracking_uri(a)
    client = runs._client(uri)
    exp_id = runs.ensure_experiment(uri, a.track.experiment, runs.run_root(a))
    parent_dir = runs.run_root(a) / "compare" / name
    parent_dir.mkdir(parents=True, exist_ok=True)
    id_file = parent_dir / runs.RUN_ID_FILE
    parent = None
    if id_file.exists():
        try:
            parent = client.get_run(id_file.read_text().strip()).info.run_id
            client.update_run(parent, status="RUNNING")
        except Exception:  # noqa: BLE001 - another tracking store: start a new parent
            parent = None
    if parent is None:
        parent = client.create_run(exp_id, run_name=name, tags={
            "mlflow.runName": name, "medvl.kind": "comparison", "medvl.compare": name,
            "mlflow.note.content": f"Comparison `{name}`: {labels[0]} = method `{a.method}` "
                                   f"({a.name}), {labels[1]} = method `{b.method}` ({b.name}); same data, budget "
                                   f"and seed; the two runs are nested below."}).info.run_id
        id_file.write_text(parent)
    ensure_ray(a)
    results, run_ids = {}, []
    try:
        for r, lab in ((a, labels[0]), (b, labels[1])):
            t0 = time.time()
            print(f"medvl compare: training {lab} ({r.method}, run {r.run_name})", flush=True)
            job, metrics = run_training(r, parent_run_id=parent, tags={"medvl.compare": name,
                                                                       "medvl.compare_label": lab},
                                        progress_label=lab)
            metrics = {k: float(v) for k, v in metrics.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))}
            metrics["wall_s"] = time.time() - t0
            results[lab] = metrics
            run_ids.append(job.mlflow_run_id)
    except BaseException:
        client.set_terminated(parent, status="FAILED")
        raise
    keys = sorted(set(results[labels[0]]) | set(results[labels[1]]))
    table = pd.DataFrame({lab: [results[lab].get(k, float("nan")) for k in keys] for lab in labels}, index=keys)
    table.index.name = "metric"
    from mlflow.entities import Metric, Param
    ts = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(f"{lab}/{k}", v, ts, 0) for lab in labels
                                      for k, v in results[lab].items()],
                     params=[Param(f"{lab}.method", r.method) for lab, r in zip(labels, (a, b))] +
                     [Param(f"{lab}.run_id", rid) for lab, rid in zip(labels, run_ids)])
    csv, md = parent_dir / "table.csv", parent_dir / "table.md"
    table.to_csv(csv)
    md.write_text(table_markdown(table))
    client.log_artifact(parent, str(csv), artifact_path="compare")
    client.log_artifact(parent, str(md), artifact_path="compare")
    client.set_terminated(parent, status="FINISHED")
    return Comparison(name, labels, (a, b), parent, tuple(run_ids), table, uri)  # type: ignore[arg-type]


def table_markdown(table) -> str:
    cols = list(table.columns)
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k, row in table.iterrows():
        lines.append(f"| {k} | " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "-" if v != v else (f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="medvl compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="+", help="RECIPE_A [RECIPE_B] [key.sub=value ... for both sides]")
    p.add_argument("--a", action="append", default=[], metavar="KEY=VALUE", help="override for side A")
    p.add_argument("--b", action="append", default=[], metavar="KEY=VALUE", help="override for side B")
    p.add_argument("--label-a", default=None), p.add_argument("--label-b", default=None)
    p.add_argument("--name", help="comparison name (parent MLflow run, run-name prefix)")
    a = p.parse_intermixed_args(argv)
    files = [x for x in a.args if "=" not in x]
    common = [x for x in a.args if "=" in x]
    if not 1 <= len(files) <= 2:
        raise ConfigError(f"give one or two recipe files, got {files}")
    ra0 = load_recipe(files[0], common)
    rb0 = load_recipe(files[-1], common) if len(files) == 2 else None
    la = a.label_a or (ra0.method if rb0 and rb0.method != ra0.method else "a")
    lb = a.label_b or (rb0.method if rb0 and rb0.method != ra0.method else "b")
    name, ra, rb = plan(files[0], files[1] if len(files) == 2 else None, a.a, a.b, common, a.name, (la, lb))
    out = run_comparison(name, ra, rb, (la, lb))
    print(f"\ncomparison '{name}' ({la} = {ra.method}, {lb} = {rb.method}; same data, budget and seed):")
    print(table_markdown(out.table))
    from medvl.redact import redact_uri
    print(f"MLflow: parent run {out.parent_run_id} ({redact_uri(out.tracking_uri)}); runs {out.run_ids[0]} and "
          f"{out.run_ids[1]} nested under it; table in its artifacts (compare/table.md)")
    return 0
