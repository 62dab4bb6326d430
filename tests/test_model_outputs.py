"""What a user takes away from a run (issue 17): the MLflow model served by a real `mlflow models serve` process,
the Model Registry entry, `medvl embed` through Ray Data, and the per-epoch pictures, rendered by the MLflow UI.

    .venv/bin/python -m pytest -q tests/test_model_outputs.py

One short training run (1 worker, test-vit-micro, 2 epochs) against a real `mlflow server` serves every test here.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from medvl.config import load_recipe

REGISTERED = "medvl-test-digits"
TEXTS = [f"a photo of the digit {d}." for d in range(10)]


@pytest.fixture(scope="module")
def trained(ray_local, digits_corpus, tmp_path_factory):
    """(recipe, job, server url) of one finished run whose model is registered as REGISTERED."""
    from medvl.track.server import start_server, stop_server
    from medvl.train.launcher import run_training
    tmp = tmp_path_factory.mktemp("outputs")
    url, proc = start_server(tmp / "mlflow", timeout=120)
    os.environ["MLFLOW_TRACKING_URI"] = url
    try:
        recipe = load_recipe(data={
            "name": "outputs", "data": {"corpus": digits_corpus, "batch_size": 64, "shuffle_buffer": 64},
            "model": {"name": "test-vit-micro"}, "optim": {"lr": 2e-3},
            "train": {"epochs": 2, "num_workers": 1, "log_every": 2, "ckpt_every": 100},
            "eval": {"templates": ["a photo of the digit {}."], "max_rows": 120},
            "runtime": {"run_root": str(tmp / "runs")},
            "track": {"experiment": "outputs", "tracking_uri": url, "register_model": REGISTERED}})
        job, metrics = run_training(recipe)
        yield recipe, job, url, metrics
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        stop_server(proc)


def _in_process(recipe, job):
    """medvl's own embedder over the run's final checkpoint (what the evaluation measures)."""
    from medvl.methods.embedding import Embedder
    from medvl.track import runs
    from medvl.train.checkpoint import latest_valid_checkpoint
    from medvl.train.launcher import load_model_from_checkpoint
    found, _ = latest_valid_checkpoint(runs.run_root(recipe) / "ray" / recipe.run_name)
    method, model, _ = load_model_from_checkpoint(recipe, str(found))
    return Embedder(method, model)


def _digit_pngs(corpus: str, n: int) -> list[Path]:
    """`n` of the corpus's source PNGs (`medvl ingest digits` writes them), one per digit class in turn."""
    root = Path(corpus) / "source_images"
    per_class = [sorted((root / str(d)).glob("*.png")) for d in range(10)]
    assert all(per_class), f"no PNGs under {root}/<digit>/"
    return [per_class[i % 10][i // 10] for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, str]:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mlflow_model_is_a_registered_pyfunc_served_over_http_with_medvls_embeddings(trained, digits_corpus,
                                                                                       tmp_path):
    from mlflow.tracking import MlflowClient
    recipe, job, url, _ = trained
    client = MlflowClient(url)

    # the logged model: a pyfunc with a signature and an input example, weights in safetensors (no pickled module)
    import mlflow
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{job.mlflow_run_id}/model", dst_path=str(tmp_path)))
    mlmodel = (local / "MLmodel").read_text()
    assert "python_function" in mlmodel and "signature" in mlmodel and "pytorch" not in mlmodel.split("flavors")[1]
    sig = json.loads(mlflow.models.Model.load(str(local)).signature.to_dict()["inputs"])
    assert [c["name"] for c in sig] == ["image", "text"] and sig[0]["type"] == "binary"
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert {"model.safetensors", "recipe.json"} <= files
    assert not {f for f in files if f.endswith((".pth", ".pt", ".pkl"))}, files  # nothing pickled at all
    # ... registered in the Model Registry, from this run
    versions = client.search_model_versions(f"name = '{REGISTERED}'")
    assert len(versions) == 1 and versions[0].run_id == job.mlflow_run_id

    # a real scoring server in this environment (no conda / virtualenv), queried over HTTP
    port = _free_port()
    # the scoring server is `uvicorn` from this environment: its bin directory on PATH, as in an activated venv
    env = dict(os.environ, MLFLOW_TRACKING_URI=url,
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                             f"runs:/{job.mlflow_run_id}/model", "--env-manager", "local", "-h", "127.0.0.1", "-p",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not come up in 180 s"
            time.sleep(1)
        pngs = [p.read_bytes() for p in _digit_pngs(digits_corpus, 10)]
        rows = [[base64.b64encode(b).decode(), t] for b, t in zip(pngs, TEXTS)]
        rows.append([base64.b64encode(pngs[0]).decode(), None])  # an image without a text
        t0 = time.perf_counter()
        status, body = _post(f"http://127.0.0.1:{port}/invocations",
                             {"dataframe_split": {"columns": ["image", "text"], "data": rows}})
        served_s = time.perf_counter() - t0
        assert status == 200, body[-2000:]
        preds = json.loads(body)["predictions"]
        img = np.asarray([p["image_embedding"] for p in preds[:10]], np.float32)
        txt = np.asarray([p["text_embedding"] for p in preds[:10]], np.float32)
        assert preds[10]["text_embedding"] is None and preds[10]["image_embedding"] is not None

        emb = _in_process(recipe, job)
        np.testing.assert_allclose(img, emb.embed_images(pngs), atol=1e-5)
        np.testing.assert_allclose(txt, emb.embed_texts(TEXTS), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
        # the served model is the trained one: digit i's image is closest to "... digit i." beyond chance (0.1)
        acc = float(np.mean((img @ txt.T).argmax(1) == np.arange(10)))
        print(f"[measured] served 11 rows (10 images + 10 texts) in {served_s:.2f} s; zero-shot on them {acc:.2f}")

        # a row that is not an image: a 4xx answer naming it, the server keeps serving
        status, body = _post(f"http://127.0.0.1:{port}/invocations",
                             {"dataframe_split": {"columns": ["image"],
                                                  "data": [[base64.b64encode(pngs[1]).decode()],
                                                           [base64.b64encode(b"not an image").decode()]]}})
        assert 400 <= status < 500 and "row 1" in body, (status, body[-1000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_medvl_embed_writes_parquet_through_ray_data_and_names_bad_images(trained, digits_corpus, tmp_path,
                                                                           capsys):
    import pyarrow.parquet as pq

    from medvl.cli import main
    recipe, job, url, _ = trained
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    pngs = _digit_pngs(digits_corpus, 6)
    for i, p in enumerate(pngs):
        shutil.copy(p, (images / "sub" if i % 2 else images) / f"img{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a png")
    (images / "empty.png").write_bytes(b"")
    (images / "notes.txt").write_text("not an image extension: not listed")

    out = tmp_path / "emb.parquet"
    assert main(["embed", f"runs:/{job.mlflow_run_id}/model", "--images", str(images), "--out", str(out),
                 "--batch-size", "4"]) == 0
    said = capsys.readouterr().out
    assert "6 of 8 images embedded" in said and "2 images could not be read" in said, said
    assert "broken.png" in said and "empty.png" in said
    table = pq.read_table(out).to_pandas()
    assert len(table) == 8 and set(table.columns) == {"path", "embedding", "error"}
    bad = table[table["error"].notna()]
    assert {Path(p).name for p in bad["path"]} == {"broken.png", "empty.png"} and bad["embedding"].isna().all()

    emb = _in_process(recipe, job)
    good = table[table["error"].isna()].set_index(table[table["error"].isna()]["path"].map(lambda p: Path(p).name))
    want = emb.embed_images([p.read_bytes() for p in pngs])
    got = np.stack([np.asarray(good.loc[f"img{i}.png", "embedding"], np.float32) for i in range(len(pngs))])
    np.testing.assert_allclose(got, want, atol=1e-5)

    # a recipe as MODEL (its newest verified checkpoint): the same embeddings (the actor class, called here
    # directly: the Ray Data path is the one above)
    from medvl.config import dump_yaml
    from medvl.embed import ImageEmbedder, resolve_target
    yml = tmp_path / "recipe.yaml"
    yml.write_text(dump_yaml(recipe))
    got2 = ImageEmbedder(resolve_target(str(yml)))(
        {"bytes": np.asarray([pngs[0].read_bytes(), b"junk"], dtype=object), "path": np.asarray(["a", "b"])})
    np.testing.assert_allclose(np.asarray(got2["embedding"][0], np.float32), want[0], atol=1e-5)
    assert got2["embedding"][1] is None and "not an image" in got2["error"][1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pictures_are_run_artifacts_redrawn_each_epoch(trained, tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image
    recipe, job, url, _ = trained
    client = MlflowClient(url)
    arts = {a.path for a in client.list_artifacts(job.mlflow_run_id, "pictures")}
    assert arts == {"pictures/loss_curves.png", "pictures/retrieval.png", "pictures/zero_shot_confusion.png"}
    out = Path(__file__).resolve().parents[1] / "test-artifacts"  # gitignored: to look at them
    out.mkdir(exist_ok=True)
    for a in sorted(arts):
        p = client.download_artifacts(job.mlflow_run_id, a, str(tmp_path))
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 250, (a, im.size)
        shutil.copy(p, out / f"run_{Path(a).name}")
    times = client.get_metric_history(job.mlflow_run_id, "time/pictures_s")
    assert len(times) == recipe.train.epochs  # redrawn after each epoch's evaluation
    steps = client.get_metric_history(job.mlflow_run_id, "train/loss")
    print(f"[measured] pictures: {np.mean([t.value for t in times]):.2f} s per epoch drawn off the training path "
          f"({len(times)} epochs; max {max(t.value for t in times):.2f} s; {len(steps)} loss points)")


def test_a_failing_picture_never_fails_training(tmp_path, caplog, monkeypatch):
    """Drawing or uploading that fails is a warning: no exception reaches the training loop."""
    from medvl.track import pictures
    from medvl.track.pictures import EpochPictures
    # draw in this process (under Ray it is a Ray task, whose environment lacks the no-retry setting below; its
    # failure reaches the same except clause as a RayTaskError)
    monkeypatch.setattr(pictures, "_off_process", lambda fn, args: fn(*args))

    def evaluate():
        pass

    def broken():
        raise RuntimeError("picture data broke")
    evaluate.pictures = broken
    journal = tmp_path / "metrics.jsonl"
    journal.write_text(json.dumps({"r": "no-such-run", "s": 1, "t": 0, "m": {"train/loss": 2.0}}) + "\n")
    pics = EpochPictures("http://127.0.0.1:9", "no-such-run", journal, ())  # nothing listens on port 9
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        pics.submit(1, evaluate)
        pics.close(timeout=60)
    finally:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    text = caplog.text
    assert "picture data broke" in text and "could not draw or upload" in text
    assert pics.seconds == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mlflow_ui_lists_the_run_pictures(trained):
    from test_mlflow_ui import ARTIFACTS, _browse, _chromium
    chrome = _chromium()
    if chrome is None:
        pytest.skip("chromium not found (apt-get install -y chromium; ./dev test installs it)")
    recipe, job, url, _ = trained
    from mlflow.tracking import MlflowClient
    exp = MlflowClient(url).get_run(job.mlflow_run_id).info.experiment_id
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "mlflow_ui_run_pictures.png"
    dom = _browse(chrome, f"{url}/#/experiments/{exp}/runs/{job.mlflow_run_id}/artifacts/pictures/retrieval.png",
                  shot)
    for name in ("pictures", "loss_curves.png", "retrieval.png", "zero_shot_confusion.png"):
        assert name in dom, (name, dom[-3000:])
    assert shot.stat().st_size > 10_000


def test_register_model_key_is_validated():
    from medvl.config import ConfigError
    base = {"data": {"corpus": "x"}}
    assert load_recipe(data=base).track.register_model is None  # default: nothing registered
    assert load_recipe(data={**base, "track": {"register_model": "cxr/clip-base v2"}}).track.register_model
    with pytest.raises(ConfigError, match=r"track\.register_model"):
        load_recipe(data={**base, "track": {"register_model": "bad'name"}})
    with pytest.raises(ConfigError, match=r"track\.register_model needs track\.log_model"):
        load_recipe(data={**base, "track": {"register_model": "m", "log_model": False}})
