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

from medvl.config import Recipe, flatten, to_dict
from medvl.redact import redact_mapping, redact_text, redact_uri, redact_value
from medvl.track.buffer import JOURNAL_FILE, JournalLogger, MetricJournal, make_sender

RUN_ID_FILE = "mlflow_run_id"

# MLflow's fluent API prints "View run ... at: <tracking URI>/#/..." when a run it opened ends (model export), with
# any password the URI carries; medvl prints its own links, redacted.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def run_root(recipe: Recipe) -> Path:
    return Path(os.environ.get("MEDVL_RUN_ROOT") or recipe.runtime.run_root).expanduser().resolve()


def tracking_uri(recipe: Recipe) -> str:
    uri = recipe.track.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = run_root(recipe)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def import_client_modules() -> None:
    """Import what the first MLflow call of a job needs (the client, the default SQLite store: about 1 s on a
    small machine), e.g. in a thread while something else waits."""
    import mlflow.tracking  # noqa: F401
    from mlflow.store.tracking import sqlalchemy_store  # noqa: F401


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


def reopen_run(client, id_file: Path) -> Optional[str]:
    """The run an earlier attempt recorded in `id_file`, set RUNNING again and tagged `medvl.resumed`; None when
    there is no such file or the tracking server does not know the run (deleted, or another server)."""
    if not id_file.exists():
        return None
    run_id = id_file.read_text().strip()
    try:
        run = client.get_run(run_id)
    except Exception as e:  # noqa: BLE001
        if _not_found(e):
            return None
        raise  # an outage or an auth error: never start a second run for the same job
    if run.info.lifecycle_stage != "active":
        return None
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "medvl.resumed", "true")
    return run_id


def start_or_resume_run(recipe: Recipe, run_dir: Path, parent_run_id: Optional[str] = None,
                        tags: Optional[dict[str, str]] = None) -> str:
    """Create the job's MLflow run, or return the one a previous attempt of this run name created."""
    uri = tracking_uri(recipe)
    client = _client(uri)
    resumed = reopen_run(client, run_dir / RUN_ID_FILE)
    if resumed:
        return resumed
    exp_id = ensure_experiment(uri, recipe.track.experiment, run_root(recipe))
    all_tags = {"mlflow.runName": recipe.run_name, "medvl.method": recipe.method, "medvl.recipe": recipe.name}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update(tags or {})
    run = client.create_run(exp_id, run_name=recipe.run_name, tags=all_tags)
    run_id = run.info.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_ID_FILE).write_text(run_id)
    log_recipe(client, run_id, recipe)
    return run_id


def _not_found(e: BaseException) -> bool:
    """MLflow says the run does not exist (another tracking server than the one that created it)."""
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "RESOURCE_DOES_NOT_EXIST" in str(e)


def safe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML with credentials redacted (recipes hold none, see `Recipe.validate`; this is
    the second line of defence for everything medvl writes)."""
    import yaml
    return yaml.safe_dump(redact_mapping(to_dict(recipe)), sort_keys=False)


def log_recipe(client, run_id: str, recipe: Recipe) -> None:
    from mlflow.entities import Param
    params = []
    for k, v in flatten(to_dict(recipe)).items():
        v = redact_value(k, v)
        params.append(Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)))
    for i in range(0, len(params), 90):
        client.log_batch(run_id, params=params[i:i + 90])
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "recipe.yaml"
        p.write_text(safe_yaml(recipe))
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
        (Path(d) / f"recipe_{n}.yaml").write_text(safe_yaml(recipe))
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


class RankZeroLogger(JournalLogger):
    """Metric logging from the rank-0 train worker into the job's existing run (no-op elsewhere).

    Metrics go to the run's durable journal (`<run_root>/jobs/<run>/metrics.jsonl`, see `medvl.track.buffer`) and a
    background thread delivers them, so a slow or unreachable tracking server never stalls or fails a training
    step, and nothing is lost or sent twice. `flush()` makes the journal durable (called before each checkpoint
    report); it never raises."""

    def __init__(self, uri: Optional[str], run_id: Optional[str], enabled: bool,
                 journal: Optional[str | os.PathLike] = None):
        super().__init__(uri, run_id, journal=journal, enabled=enabled)

    def set_tag(self, key: str, value: str) -> None:
        """Set a tag on the run now; best effort (an unreachable server gets a warning, never an exception)."""
        if not self.enabled:
            return
        try:
            _client(self.uri).set_tag(self.run_id, key, redact_text(str(value))[:5000])
        except Exception as e:  # noqa: BLE001 - bookkeeping never fails a training step
            import logging
            logging.getLogger(__name__).warning("could not set tag %s on run %s: %s", key, self.run_id,
                                                redact_text(e))


def journal_path(run_dir: Path) -> Path:
    return Path(run_dir) / JOURNAL_FILE


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
            client.set_tag(run_id, f"medvl.{k}", redact_text(v)[:5000])
    client.set_terminated(run_id, status=status)


# --------------------------------------------------------------------------- tracking-server outages


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer within `track.outage_wait_s` (the message has the URI, redacted)."""


def _probe(uri: str, timeout: float = 5.0) -> Optional[str]:
    """None when the tracking store answers, else why not. HTTP: GET /health; other stores: a cheap query."""
    if uri.startswith(("http://", "https://")):
        import requests
        try:
            r = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
            return None if r.status_code == 200 else f"HTTP {r.status_code} on /health"
        except requests.RequestException as e:
            return f"{type(e).__name__}: {e}"
    try:
        _client(uri).search_experiments(max_results=1)
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def wait_for_tracking(uri: str, wait_s: float, what: str) -> None:
    """Return once the tracking store answers; poll with backoff for up to `wait_s`, printing once that it waits;
    raise TrackingUnavailable (URI redacted) after that."""
    import sys
    import time
    t0 = time.monotonic()
    delay, said = 1.0, False
    while True:
        why = _probe(uri)
        if why is None:
            if said:
                print(f"medvl: MLflow at {redact_uri(uri)} answers again after {time.monotonic() - t0:.0f}s",
                      file=sys.stderr, flush=True)
            return
        left = wait_s - (time.monotonic() - t0)
        if left <= 0:
            raise TrackingUnavailable(f"MLflow tracking server at {redact_uri(uri)} did not answer within "
                                      f"{wait_s:.0f}s (track.outage_wait_s) {what}: {redact_text(why)[:300]}")
        if not said:
            print(f"medvl: MLflow at {redact_uri(uri)} does not answer ({redact_text(why)[:200]}); waiting up to "
                  f"{wait_s:.0f}s {what}", file=sys.stderr, flush=True)
            said = True
        time.sleep(min(delay, left))
        delay = min(delay * 2, 10.0)


def sync_journal(run_dir: Path, uri: str, wait_s: float = 0.0) -> int:
    """Deliver what the run's metric journal still holds (left by a crash, a killed driver or an outage); retries
    for up to `wait_s`. Returns the metrics delivered; raises TrackingUnavailable when the server stays away."""
    import time
    journal = MetricJournal(journal_path(run_dir))
    if journal.pending_bytes() == 0:
        return 0
    send = make_sender(uri)
    t0 = time.monotonic()
    delay, sent = 1.0, 0
    while True:
        try:
            sent += journal.deliver(send)
            return sent
        except Exception as e:  # noqa: BLE001
            if time.monotonic() - t0 >= wait_s:
                raise TrackingUnavailable(f"MLflow at {redact_uri(uri)} unreachable: {journal.pending_bytes()} bytes "
                                          f"of metrics stay in {journal.path} ({redact_text(e)[:300]})") from None
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
