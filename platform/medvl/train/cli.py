"""`medvl train RECIPE [key.sub=value ...]` and `medvl eval RECIPE [--checkpoint DIR]`."""
from __future__ import annotations

import argparse
import time

from medvl.config import load_recipe


def _parse(prog: str, argv: list[str], extra=None):
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("recipe", help="YAML recipe in jobs/")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=3e-4")
    if extra:
        extra(p)
    a = p.parse_args(argv)
    return a, load_recipe(a.recipe, a.overrides)


def _ui_hint(uri: str, run_id: str, experiment: str) -> str:
    if uri.startswith("sqlite:"):
        return (f"mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000, "
                f"experiment '{experiment}', run {run_id}")
    return f"open {uri} -> experiment '{experiment}', run {run_id}"


def train_main(argv: list[str]) -> int:
    def extra(p):
        p.add_argument("--allow-recipe-change", action="store_true",
                       help="resume an existing run although its recipe changed (the changes are logged in its "
                            "MLflow run); without it such a resume is refused with the list of changed keys")
    a, recipe = _parse("medvl train", argv, extra)
    if a.allow_recipe_change:
        recipe.runtime.allow_recipe_change = True
    from medvl.train.launcher import run_training
    t0 = time.time()
    job, metrics = run_training(recipe)
    print(f"\nrun '{recipe.run_name}' finished in {time.time() - t0:.0f}s: step {metrics.get('step')}, "
          f"epoch {metrics.get('epoch')}")
    for k in sorted(metrics):
        if k.startswith("val/"):
            print(f"  {k} = {metrics[k]:.4f}")
    print(f"resolved recipe: {job.run_dir / 'recipe.yaml'}")
    print(f"MLflow: {_ui_hint(job.tracking_uri, job.mlflow_run_id, recipe.track.experiment)}")
    if "val/zero_shot_accuracy" in metrics:
        print(f"zero_shot_accuracy={metrics['val/zero_shot_accuracy']:.4f}")
    return 0


def eval_main(argv: list[str]) -> int:
    def extra(p):
        p.add_argument("--checkpoint", help="checkpoint directory (default: the run's newest registered checkpoint "
                                            "that verifies)")
    a, recipe = _parse("medvl eval", argv, extra)
    from pathlib import Path

    from medvl.track import runs
    from medvl.train.checkpoint import CheckpointError, latest_valid_checkpoint
    from medvl.train.launcher import load_model_from_checkpoint
    ckpt = a.checkpoint
    if ckpt is None:
        # only checkpoints Ray Train registered (complete, persisted), never the newest directory on disk
        storage = runs.run_root(recipe) / "ray" / recipe.run_name
        found, bad = latest_valid_checkpoint(storage)
        for name, why in bad:
            print(f"medvl eval: WARNING: skipping checkpoint {name}: {why}")
        if found is None:
            print(f"medvl eval: no registered checkpoint that verifies for run '{recipe.run_name}' under {storage}")
            return 2
        ckpt = str(found)
    try:
        method, model, state = load_model_from_checkpoint(recipe, ckpt)
    except CheckpointError as e:
        print(f"medvl eval: {e}")
        return 2
    evaluate = method.evaluator()
    if evaluate is None:
        print("medvl eval: no held-out rows (data.val_split)")
        return 2
    metrics = evaluate(model, "cpu")
    id_file = runs.run_root(recipe) / "jobs" / recipe.run_name / runs.RUN_ID_FILE
    if id_file.exists():
        logger = runs.RankZeroLogger(runs.tracking_uri(recipe), id_file.read_text().strip(), True)
        logger.log({k.replace("val/", "eval/"): v for k, v in metrics.items()}, step=int(state["step"]))
        logger.flush()
    print(f"checkpoint {Path(ckpt).name} (step {state['step']}):")
    for k, v in sorted(metrics.items()):
        print(f"  {k} = {v:.4f}")
    if "val/zero_shot_accuracy" in metrics:
        print(f"zero_shot_accuracy={metrics['val/zero_shot_accuracy']:.4f}")
    return 0
