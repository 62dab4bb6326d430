"""`medvl train RECIPE [key.sub=value ...]`, `medvl eval RECIPE [--checkpoint DIR]` and
`medvl sync-metrics RECIPE|RUN_DIR [--wait S]` (deliver what a run's metric journal holds after an MLflow outage,
and finish a run whose end the outage deferred), and
`medvl transfer RECIPE --npz FILE.npz` (MedMNIST-format classification transfer)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from medvl.config import load_recipe


def _parse(prog: str, argv: list[str], extra=None, start_ray: bool = False):
    """The parsed arguments and the recipe; with `start_ray`, the recipe loads while Ray starts (the command
    needs Ray next: see medvl.train.launcher.load_while_ray_starts)."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("recipe", help="YAML recipe in jobs/")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=3e-4")
    if extra:
        extra(p)
    a = p.parse_args(argv)
    from medvl.config import ConfigError, load_yaml
    if "stages" in load_yaml(a.recipe):
        raise ConfigError(f"{a.recipe} is a pipeline (it has `stages:`); run it with `medvl pipeline {a.recipe}`")
    if not start_ray:
        return a, load_recipe(a.recipe, a.overrides)
    from medvl.config import peek_runtime
    from medvl.train.launcher import load_while_ray_starts
    return a, load_while_ray_starts(lambda: load_recipe(a.recipe, a.overrides), peek_runtime(a.recipe, a.overrides))


def _ui_hint(uri: str, run_id: str, experiment: str) -> str:
    from medvl.redact import redact_uri
    if uri.startswith("sqlite:"):
        return (f"mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000, "
                f"experiment '{experiment}', run {run_id}")
    return f"open {redact_uri(uri)} -> experiment '{experiment}', run {run_id}"


def train_main(argv: list[str]) -> int:
    def extra(p):
        p.add_argument("--allow-recipe-change", action="store_true",
                       help="resume an existing run although its recipe changed (the changes are logged in its "
                            "MLflow run); without it such a resume is refused with the list of changed keys")
    a, recipe = _parse("medvl train", argv, extra, start_ray=True)
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
    run_dir = runs.run_root(recipe) / "jobs" / recipe.run_name
    id_file = run_dir / runs.RUN_ID_FILE
    if id_file.exists():
        logger = runs.RankZeroLogger(runs.tracking_uri(recipe), id_file.read_text().strip(), True,
                                     journal=runs.journal_path(run_dir))
        logger.log({k.replace("val/", "eval/"): v for k, v in metrics.items()}, step=int(state["step"]))
        logger.close(timeout=recipe.track.outage_wait_s)
    print(f"checkpoint {Path(ckpt).name} (step {state['step']}):")
    for k, v in sorted(metrics.items()):
        print(f"  {k} = {v:.4f}")
    if "val/zero_shot_accuracy" in metrics:
        print(f"zero_shot_accuracy={metrics['val/zero_shot_accuracy']:.4f}")
    return 0


def sync_main(argv: list[str]) -> int:
    """`medvl sync-metrics RECIPE|RUN_DIR`: deliver buffered metrics; finish a deferred finalize."""
    from pathlib import Path

    from medvl.config import load_recipe, recipe_from_dict
    from medvl.redact import redact_uri
    from medvl.track import runs
    from medvl.train import faults
    p = argparse.ArgumentParser(prog="medvl sync-metrics", description=sync_main.__doc__)
    p.add_argument("target", help="the run's recipe (with the same overrides) or its run directory "
                                  "(<run_root>/jobs/<run name>)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (as given to medvl train)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for an unreachable server")
    a = p.parse_args(argv)
    target = Path(a.target)
    if target.is_dir():  # <run_root>/jobs/<run>: the recipe it ran with is next to the run id
        import yaml
        run_dir = target.resolve()
        recipe = recipe_from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text())) \
            if (run_dir / "recipe.yaml").exists() else None
        uri = (recipe.track.tracking_uri if recipe is not None else None) or os.environ.get("MLFLOW_TRACKING_URI") \
            or f"sqlite:///{run_dir.parent.parent / 'mlflow.db'}"
    else:
        recipe = load_recipe(target, a.overrides)
        run_dir = runs.run_root(recipe) / "jobs" / recipe.run_name
        uri = runs.tracking_uri(recipe)
    if not (run_dir / runs.RUN_ID_FILE).exists():
        print(f"medvl sync-metrics: {run_dir} is not a medvl run directory (no {runs.RUN_ID_FILE})")
        return 2
    try:
        runs.wait_for_tracking(uri, a.wait, "to sync metrics")
        n = runs.sync_journal(run_dir, uri, a.wait)
        done = faults.complete_finalize(recipe, run_dir, uri)
    except runs.TrackingUnavailable as e:
        print(f"medvl sync-metrics: {e}")
        return 1
    run_id = (run_dir / runs.RUN_ID_FILE).read_text().strip()
    print(f"medvl sync-metrics: delivered {n} buffered metrics to run {run_id} at {redact_uri(uri)}"
          + (f"; finished the run ({done['status']})" if done else "") + "; nothing is pending")
    return 0
def transfer_main(argv: list[str]) -> int:
    """`medvl transfer RECIPE --npz FILE.npz [...]`: MedMNIST-format classification transfer (linear probe and
    fine-tuning; accuracy and AUC on the test split) of the run's trained image tower, logged to its MLflow run."""
    def extra(p):
        p.add_argument("--npz", required=True, action="append", help="MedMNIST-format .npz (repeatable)")
        p.add_argument("--checkpoint", help="checkpoint directory (default: the run's latest)")
        p.add_argument("--mode", choices=["probe", "finetune", "both"], default="both")
        p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
        p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate of the tower (head: 10x)")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--label-fraction", type=float, default=1.0, help="share of train labels the probe uses")
    a, recipe = _parse("medvl transfer", argv, extra)
    import torch

    from medvl.eval.medmnist import load_medmnist
    from medvl.eval.transfer import medmnist_transfer
    from medvl.models.factory import image_norm, model_arch
    from medvl.track import runs
    from medvl.train.launcher import load_model_from_checkpoint
    ckpt = a.checkpoint or _latest_checkpoint(recipe)
    if ckpt is None:
        print(f"medvl transfer: no checkpoint for run '{recipe.run_name}' under {runs.run_root(recipe)}")
        return 2
    datasets = [load_medmnist(p) for p in a.npz]  # bad files fail before any model is loaded
    _, model, state = load_model_from_checkpoint(recipe, ckpt)
    size = model_arch(recipe.model).get("vision_cfg", {}).get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    device = "cuda" if recipe.train.use_gpu and torch.cuda.is_available() else "cpu"
    modes = ("probe", "finetune") if a.mode == "both" else (a.mode,)
    metrics: dict[str, float] = {}
    for data in datasets:
        metrics.update(medmnist_transfer(model, data, size, image_norm(recipe.model), device, modes=modes,
                                         epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                                         label_fraction=a.label_fraction, seed=recipe.train.seed))
    id_file = runs.run_root(recipe) / "jobs" / recipe.run_name / runs.RUN_ID_FILE
    if id_file.exists():
        logger = runs.RankZeroLogger(runs.tracking_uri(recipe), id_file.read_text().strip(), True)
        logger.log(metrics, step=int(state["step"]))
        logger.flush()
    print(f"checkpoint {Path(ckpt).name} (step {state['step']}):")
    for k, v in sorted(metrics.items()):
        print(f"  {k} = {v:.4f}")
    return 0


def _latest_checkpoint(recipe):
    from medvl.track import runs
    from medvl.train import checkpoint as ck
    latest, _ = ck.latest_valid_checkpoint(runs.run_root(recipe) / "ray" / recipe.run_name)  # registered, verified
    return str(latest) if latest is not None else None
