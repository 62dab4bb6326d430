"""MLflow runs for training jobs: one run per job (reused on resume), params = resolved config, rank-0 metrics,
artifacts (config, loss curve, corpus manifest as dataset lineage), the final model.

Tracking URI: the recipe's `track.tracking_uri`, else $MLFLOW_TRACKING_URI, else a local SQLite store inside the
run root (`<run_root>/mlflow.db`, artifacts in `<run_root>/mlartifacts`).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from medvl.config import Recipe, dump_yaml, flatten, to_dict

RUN_ID_FILE = "mlflow_run_id"


def run_root(recipe: Recipe) -> Path:
    return Path(os.environ.get("MEDVL_RUN_ROOT") or recipe.runtime.run_root).expanduser().resolve()


def tracking_uri(recipe: Recipe) -> str:
    uri = recipe.track.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = run_root(recipe)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str, artifact_root: Optional[Path] = None) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    loc = None
    if uri.startswith("sqlite:") and artifact_root is not None:
        loc = (artifact_root / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=loc)


def start_or_resume_run(recipe: Recipe, run_dir: Path, parent_run_id: Optional[str] = None,
                        tags: Optional[dict[str, str]] = None) -> str:
    """Create the job's MLflow run, or return the one a previous attempt of this run name created."""
    uri = tracking_uri(recipe)
    client = _client(uri)
    id_file = run_dir / RUN_ID_FILE
    if id_file.exists():
        run_id = id_file.read_text().strip()
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                client.update_run(run_id, status="RUNNING")
                client.set_tag(run_id, "medvl.resumed", "true")
                return run_id
        except Exception:  # noqa: BLE001 - a different tracking server: start a new run
            pass
    exp_id = ensure_experiment(uri, recipe.track.experiment, run_root(recipe))
    all_tags = {"mlflow.runName": recipe.run_name, "medvl.method": recipe.method, "medvl.recipe": recipe.name}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update(tags or {})
    run = client.create_run(exp_id, run_name=recipe.run_name, tags=all_tags)
    run_id = run.info.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    log_recipe(client, run_id, recipe)
    return run_id


def log_recipe(client, run_id: str, recipe: Recipe) -> None:
    from mlflow.entities import Param
    params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
              for k, v in flatten(to_dict(recipe)).items()]
    for i in range(0, len(params), 90):
        client.log_batch(run_id, params=params[i:i + 90])
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "recipe.yaml"
        p.write_text(dump_yaml(recipe))
        client.log_artifact(run_id, str(p), artifact_path="config")


def log_recipe_change(uri: str, run_id: str, recipe: Recipe, changes: dict[str, tuple[Any, Any]],
                      run_dir: Path) -> int:
    """A resumed run continues with a changed recipe (allowed explicitly): its params keep the values it started
    with (MLflow params are immutable), so the change is recorded next to them: tags `medvl.recipe_changes`
    (how many times) and `medvl.recipe_change.<n>` (`key: old -> new; ...`), the artifacts
    `config/recipe_change_<n>.json` and `config/recipe_<n>.yaml`, and the previous `recipe.yaml` kept in the
    job directory as `recipe.before_change_<n>.yaml`."""
    client = _client(uri)
    run = client.get_run(run_id)
    n = int(run.data.tags.get("medvl.recipe_changes", "0")) + 1
    text = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    client.set_tag(run_id, "medvl.recipe_changes", str(n))
    client.set_tag(run_id, f"medvl.recipe_change.{n}", text[:5000])
    old = run_dir / "recipe.yaml"
    if old.exists():
        old.rename(run_dir / f"recipe.before_change_{n}.yaml")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / f"recipe_change_{n}.json").write_text(json.dumps(
            {k: {"old": a, "new": b} for k, (a, b) in changes.items()}, indent=1, default=str))
        (Path(d) / f"recipe_{n}.yaml").write_text(dump_yaml(recipe))
        client.log_artifacts(run_id, d, artifact_path="config")
    return n


def log_dataset(run_id: str, uri: str, corpus: str, split: str, context: str) -> None:
    """Corpus lineage: the manifest file as an artifact, and the corpus (its shard table) as an MLflow dataset
    input with a digest, source path, schema and row counts shown on the run page."""
    from dataclasses import asdict

    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    from medvl.data.corpus import load_manifest, manifest_path
    mp = manifest_path(corpus)
    manifest = load_manifest(corpus)
    client = _client(uri)
    client.log_artifact(run_id, str(mp), artifact_path=f"dataset/{context}")
    shards = pd.DataFrame([asdict(s) for s in manifest.shards if s.split == split])
    name = f"{mp.parent.name}:{split}"
    ds = mlflow.data.from_pandas(shards, source=str(mp.parent.resolve()), name=name)
    client.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(),
                                                     tags=[InputTag("mlflow.data.context", context)])])


class RankZeroLogger:
    """Metric logging from the rank-0 train worker into the job's existing run (no-op elsewhere).

    `log` only queues: a background thread writes the queued metrics with `log_batch`, so a slow tracking
    store (a remote server, SQLite under load) never stalls a training step. `flush()` waits until everything
    queued is written (the worker calls it before each checkpoint report and at the end), so a checkpoint never
    runs ahead of the metrics logged before it. A failed write is retried at the next flush, then reported."""

    def __init__(self, uri: Optional[str], run_id: Optional[str], enabled: bool):
        import queue
        import threading
        self.enabled = enabled and bool(run_id)
        self.run_id = run_id
        self.client = _client(uri) if self.enabled else None
        self._queue: "queue.Queue" = queue.Queue()
        self._error: Optional[BaseException] = None
        self._thread = None
        if self.enabled:
            self._thread = threading.Thread(target=self._drain, name="medvl-mlflow-logger", daemon=True)
            self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v == v]
        if batch:
            self._queue.put(batch)

    def _drain(self) -> None:
        pending: list = []
        while True:
            item = self._queue.get()
            if item is not None:
                pending.extend(item)
            if pending and (item is None or self._queue.empty()):
                try:
                    while pending:  # at most 1000 metrics per log_batch; a retry never re-sends a written chunk
                        self.client.log_batch(self.run_id, metrics=pending[:1000])
                        pending = pending[1000:]
                    self._error = None
                except Exception as e:  # noqa: BLE001 - keep the metrics and retry with the next batch
                    self._error = e
            self._queue.task_done()

    def flush(self) -> None:
        """Block until every queued metric is written; raises if the tracking store keeps failing."""
        if not self.enabled:
            return
        self._queue.put(None)  # forces a write attempt of whatever is pending
        self._queue.join()
        if self._error is not None:
            self._queue.put(None)  # one retry
            self._queue.join()
            if self._error is not None:
                raise RuntimeError(f"MLflow: could not log metrics to run {self.run_id}: {self._error}")


def plot_loss_curve(uri: str, run_id: str, out: Path) -> Optional[Path]:
    client = _client(uri)
    hist = client.get_metric_history(run_id, "train/loss")
    if not hist:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hist = sorted(hist, key=lambda m: m.step)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([m.step for m in hist], [m.value for m in hist])
    ax[0].set_xlabel("step"), ax[0].set_ylabel("train/loss"), ax[0].set_title("training loss")
    acc = sorted(client.get_metric_history(run_id, "val/zero_shot_accuracy"), key=lambda m: m.step)
    if acc:
        ax[1].plot([m.step for m in acc], [m.value for m in acc], marker="o")
        ax[1].set_ylim(0, 1), ax[1].set_title("held-out zero-shot accuracy")
    ax[1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def finish_run(uri: str, run_id: str, status: str = "FINISHED", summary: Optional[dict[str, Any]] = None) -> None:
    client = _client(uri)
    if summary:
        for k, v in summary.items():
            client.set_tag(run_id, f"medvl.{k}", str(v))
    client.set_terminated(run_id, status=status)
