"""End-to-end training on real local Ray: everything a run logs reads back from a real MLflow server; SigLIP trains
on 2 workers. (Killed workers and drivers, re-runs, corrupt samples and checkpoints: tests/test_resume.py.)"""
import pytest

from medvl.config import load_recipe
from medvl.track import runs
from medvl.train.launcher import run_training


def _recipe(corpus, name, **over):
    base = {"name": name, "data": {"corpus": corpus, "batch_size": 32, "shuffle_buffer": 64},
            "model": {"name": "test-vit-micro"},
            "train": {"epochs": 2, "num_workers": 2, "log_every": 2, "ckpt_every": 5, "max_failures": 3},
            "eval": {"templates": ["a photo of the digit {}."]}, "track": {"experiment": "tests"}}
    for k, v in over.items():
        sect, key = k.split("__")
        base.setdefault(sect, {})[key] = v
    return load_recipe(data=base)


def _metric(recipe, run_id, key):
    from mlflow.tracking import MlflowClient
    return sorted(MlflowClient(runs.tracking_uri(recipe)).get_metric_history(run_id, key), key=lambda m: m.step)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_run_reads_back_from_real_mlflow_server(ray_local, digits_corpus, run_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from medvl.track.server import start_server, stop_server
    url, proc = start_server(tmp_path / "mlflow")
    try:
        recipe = _recipe(digits_corpus, "server-readback", train__epochs=1, train__num_workers=2,
                         track__tracking_uri=url, optim__lr=2e-3)
        job, metrics = run_training(recipe)
        client = MlflowClient(url)
        run = client.get_run(job.mlflow_run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == "server-readback"
        assert run.data.params["optim.lr"] == "0.002" and run.data.params["model.name"] == "test-vit-micro"
        loss = client.get_metric_history(run.info.run_id, "train/loss")
        assert len(loss) >= 10 and loss[-1].step == job.total_steps
        for key in ("train/lr", "train/logit_scale", "train/samples_per_s", "train/data_wait_s",
                    "train/skipped_samples", "val/zero_shot_accuracy", "val/i2t_r1", "val/t2i_r10"):
            assert key in run.data.metrics, key
        arts = {a.path for d in ("config", "plots", "dataset/training") for a in client.list_artifacts(run.info.run_id, d)}
        assert {"config/recipe.yaml", "plots/loss_curve.png", "dataset/training/manifest.json"} <= arts
        assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest
        models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
        assert any(m.source_run_id == run.info.run_id for m in models)
        # the towers in open_clip's own format too (tests/test_export.py loads such a directory in plain open_clip)
        assert {a.path for a in client.list_artifacts(run.info.run_id, "open_clip")} == {
            "open_clip/open_clip_config.json", "open_clip/open_clip_model.safetensors"}
    finally:
        stop_server(proc)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_siglip_loss_trains_on_two_workers(ray_local, digits_corpus, run_root):
    import math
    recipe = _recipe(digits_corpus, "siglip", loss__kind="siglip", train__max_steps=12, data__val_split=None)
    job, metrics = run_training(recipe)
    losses = [m.value for m in _metric(recipe, job.mlflow_run_id, "train/loss")]
    assert metrics["step"] == 12 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    # the worker group started no DatasetManager: medvl passes no `datasets=`, and Ray's DatasetsCallback would
    # start one (a Python process per job that serves nothing; medvl.train.pg_cleaner.MedvlTorchTrainer drops it)
    import ray._private.state
    started = [a["ActorClassName"] for a in ray._private.state.actors().values()]
    assert started.count("RayTrainWorker") >= 2 and "DatasetManager" not in started, sorted(set(started))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_max_steps_on_an_epoch_boundary_still_ends_the_epoch(ray_local, digits_corpus, run_root):
    """`train.max_steps` equal to the steps of an epoch: the run ends with that epoch's evaluation and final report
    (it used to leave the loop before the epoch-end branch, with no final report at all)."""
    per_epoch = 1437 // 64
    recipe = _recipe(digits_corpus, "max-at-epoch", data__batch_size=64, train__num_workers=1,
                     train__max_steps=per_epoch, train__ckpt_every=1000)
    job, metrics = run_training(recipe)
    assert metrics["step"] == job.total_steps == per_epoch and metrics["epoch"] == 1
    assert "val/zero_shot_accuracy" in metrics
    assert [m.step for m in _metric(recipe, job.mlflow_run_id, "val/zero_shot_accuracy")] == [per_epoch]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_eval_at_end_only(ray_local, digits_corpus, run_root):
    """`eval.every_epoch: false` + `eval.at_end: true`: no evaluation at epoch 1's end, one at the end of training
    (here `train.max_steps`, mid-epoch 2); `every_epoch: false` alone evaluates never (the methods' declared
    metrics follow)."""
    from medvl.methods import resolve_method
    per_epoch = 1437 // 64
    recipe = _recipe(digits_corpus, "eval-at-end", data__batch_size=64, train__num_workers=1,
                     train__max_steps=per_epoch + 6, train__ckpt_every=1000,
                     eval__every_epoch=False, eval__at_end=True)
    assert "val/zero_shot_accuracy" in resolve_method(recipe).metric_names()
    job, metrics = run_training(recipe)
    assert metrics["step"] == per_epoch + 6 and "val/zero_shot_accuracy" in metrics
    assert [m.step for m in _metric(recipe, job.mlflow_run_id, "val/zero_shot_accuracy")] == [per_epoch + 6]
    never = _recipe(digits_corpus, "eval-never", eval__every_epoch=False)
    assert "val/zero_shot_accuracy" not in resolve_method(never).metric_names()
