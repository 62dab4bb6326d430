"""End-to-end training on real local Ray: worker killed mid-run recovers from the last checkpoint, a re-run
resumes the same run (one MLflow run, never a duplicate), corrupt samples are skipped and counted."""
import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from medvl.config import load_recipe
from medvl.data.corpus import Manifest, ShardWriter, iter_rows, shard_paths, write_manifest
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


def _train_worker_pids():
    """Ray names a busy actor process `ray::RayTrainWorker.<method>` (its process title)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::RayTrainWorker"):
                pids.append(int(d.name))
    return sorted(pids)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_worker_recovers_and_rerun_resumes_same_run(ray_local, digits_corpus, run_root):
    recipe = _recipe(digits_corpus, "fault")
    ckpt_root = Path(run_root) / "ray" / "fault"
    out = {}

    def fit():
        try:
            out["job"], out["metrics"] = run_training(recipe)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    th = threading.Thread(target=fit)
    th.start()
    deadline = time.time() + 300
    from medvl.train.worker import latest_position
    while time.time() < deadline and not latest_position(ckpt_root):  # a checkpoint is registered
        time.sleep(0.5)
    assert latest_position(ckpt_root), "no checkpoint was reported"
    pids = _train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)  # a real worker process dies mid-run
    killed_at = time.time()
    th.join(600)
    assert "error" not in out, out.get("error")
    job, metrics = out["job"], out["metrics"]
    assert metrics["step"] == job.total_steps == 2 * (1437 // 32)
    assert metrics["epoch"] == 2
    resumed = _metric(recipe, job.mlflow_run_id, "train/resumed_from_step")
    assert resumed and resumed[0].value >= 5 and resumed[0].timestamp / 1000 >= killed_at - 1
    print(f"\n[measured] train worker killed -> training again after {resumed[0].timestamp / 1000 - killed_at:.1f}s "
          f"(resumed from step {int(resumed[0].value)})")
    assert set(_train_worker_pids()).isdisjoint(pids)

    # the same recipe and run name again: resumes (nothing left to do), same MLflow run, no duplicate
    job2, metrics2 = run_training(recipe)
    assert job2.mlflow_run_id == job.mlflow_run_id and metrics2["step"] == job.total_steps
    from mlflow.tracking import MlflowClient
    client = MlflowClient(runs.tracking_uri(recipe))
    found = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                               filter_string="tags.mlflow.runName = 'fault'")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    assert "val/zero_shot_accuracy" in found[0].data.metrics
    arts = {a.path for a in client.list_artifacts(job.mlflow_run_id, "plots")}
    assert "plots/loss_curve.png" in arts

    # `medvl eval` re-evaluates the latest checkpoint and logs into the same run
    from medvl.config import dump_yaml
    from medvl.train.cli import eval_main
    rfile = Path(run_root) / "fault.yaml"
    rfile.write_text(dump_yaml(recipe))
    assert eval_main([str(rfile)]) == 0
    assert client.get_metric_history(job.mlflow_run_id, "eval/zero_shot_accuracy")[-1].step == job.total_steps


def _corrupt_corpus(src, dst, n_bad=7):
    """Copy the digits train split and corrupt some image bytes *after* ingest (storage bit rot)."""
    w = ShardWriter(dst, shard_size=400)
    bad = []
    for i, row in enumerate(iter_rows(shard_paths(src, "train"))):
        row["labels"] = dict(row["labels"] or [])
        if i % 150 == 3 and len(bad) < n_bad:
            row["image"] = row["image"][:40]  # truncated PNG
            bad.append(row["sample_id"])
        w.add(row)
    write_manifest(dst, Manifest(source="corrupted copy", shards=w.close(), label_field="digit",
                                 classnames=[str(i) for i in range(10)]))
    return bad


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_corrupt_samples_are_skipped_and_counted(ray_local, digits_corpus, run_root, tmp_path):
    bad = _corrupt_corpus(digits_corpus, tmp_path / "corrupt")
    Image.open(io.BytesIO(next(iter_rows(shard_paths(digits_corpus, "train")))["image"])).load()
    recipe = _recipe(str(tmp_path / "corrupt"), "corrupt", train__epochs=1, train__num_workers=1,
                     data__val_split=None)
    job, metrics = run_training(recipe)
    assert metrics["step"] == job.total_steps  # the epoch completed
    skipped = _metric(recipe, job.mlflow_run_id, "train/skipped_samples")
    assert skipped[-1].value == len(bad) == 7


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
