"""MLflow runs of a pipeline: one parent run per pipeline run, one nested run per stage.

- Parent (`medvl.kind=pipeline`): params = each stage's kind and key; artifacts = the resolved pipeline
  (`config/pipeline.yaml`) and the stage table (`pipeline/stages.json`: action, key, output location, metrics);
  metrics = every stage's metrics as `<stage>/<metric>` (so pipeline runs and sweep trials compare in one view).
- A built stage (`medvl.kind=stage`, `medvl.reused=false`): params = its config slice (flat dotted keys) and its
  upstream output ids (`input.<role>`); metrics = what it reported; artifacts = its completion marker
  (`stage/marker.json`) and whatever the stage logged. A `train` stage's run is the training run itself (params =
  the recipe, with every training curve), nested under the pipeline run.
- A reused stage: a short nested run with the same params and metrics, tagged `medvl.reused=true`,
  `medvl.built_by_run_id=<the run that built the output>` (and that run's pipeline run), with a note linking to
  it; nothing is recomputed.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

from medvl.pipelines.recipe import Pipeline, StageNode, dump_pipeline
from medvl.track import runs


def _params(d: dict[str, Any]) -> list:
    from mlflow.entities import Param
    return [Param(k[:250], (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000]) for k, v in d.items()]


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    ps = _params(params)
    for i in range(0, len(ps), 90):
        client.log_batch(run_id, params=ps[i:i + 90])


def _log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric
    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    for i in range(0, len(ms), 900):
        client.log_batch(run_id, metrics=ms[i:i + 900])


def _log_json(client, run_id: str, data: Any, name: str, artifact_path: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_text(json.dumps(data, indent=1, default=str))
        client.log_artifact(run_id, str(p), artifact_path=artifact_path)


def run_link(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def start_pipeline_run(uri: str, p: Pipeline, run_name: str, parent_run_id: Optional[str],
                       tags: Optional[dict[str, str]], plans: dict) -> tuple[str, str]:
    """Create the pipeline's parent run; returns (run id, experiment id)."""
    client = runs._client(uri)
    exp_id = runs.ensure_experiment(uri, p.track.experiment, runs.run_root(p))
    stages = ", ".join(f"{n} ({pl.kind}: {pl.action})" for n, pl in plans.items())
    all_tags = {"mlflow.runName": run_name, "medvl.kind": "pipeline", "medvl.pipeline": p.name,
                "mlflow.note.content": f"Pipeline `{p.name}`{': ' + p.description if p.description else ''}. "
                                       f"Stages (nested runs): {stages}."}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update(tags or {})
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    rid = run.info.run_id
    params = {"pipeline.name": p.name, "pipeline.source": p.source or "-"}
    for n, pl in plans.items():
        params[f"stage.{n}.kind"] = pl.kind
    _log_params(client, rid, params)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "pipeline.yaml").write_text(dump_pipeline(p))
        client.log_artifact(rid, str(Path(d) / "pipeline.yaml"), artifact_path="config")
    return rid, exp_id


def stage_tags(p: Pipeline, node: StageNode, key: str, pipeline_run_id: str, reused: bool) -> dict[str, str]:
    return {"medvl.kind": "stage", "medvl.stage": node.name, "medvl.stage_kind": node.kind,
            "medvl.stage_key": key, "medvl.pipeline": p.name, "medvl.pipeline_run_id": pipeline_run_id,
            "medvl.reused": str(reused).lower()}


def stage_params(node: StageNode, config: dict, upstream: dict[str, str]) -> dict[str, Any]:
    return {**config, **{f"input.{k}": v for k, v in upstream.items()}}


def start_stage_run(uri: str, exp_id: str, pipeline_run_id: str, p: Pipeline, node: StageNode, key: str,
                    config: dict, upstream: dict[str, str]) -> str:
    client = runs._client(uri)
    tags = {"mlflow.runName": node.name, "mlflow.parentRunId": pipeline_run_id,
            **stage_tags(p, node, key, pipeline_run_id, False)}
    rid = client.create_run(exp_id, run_name=node.name, tags=tags).info.run_id
    _log_params(client, rid, stage_params(node, config, upstream))
    return rid


def finish_stage_run(uri: str, run_id: str, marker: dict, location: str, metrics: Optional[dict[str, float]],
                     status: str = "FINISHED") -> None:
    """Metrics (unless the stage logged its own curves: `metrics=None`), the marker, the output location."""
    client = runs._client(uri)
    if metrics:
        _log_metrics(client, run_id, metrics)
    client.set_tag(run_id, "medvl.build_id", marker.get("build_id", ""))
    client.set_tag(run_id, "medvl.output", location)
    client.set_tag(run_id, "medvl.stage_seconds", f"{marker.get('duration_s', 0):.1f}")
    _log_json(client, run_id, marker, "marker.json", "stage")
    client.set_terminated(run_id, status=status)


def fail_run(uri: str, run_id: Optional[str], reason: str, status: str = "FAILED") -> None:
    if not run_id:
        return
    try:
        client = runs._client(uri)
        client.set_tag(run_id, "medvl.end_reason", reason[:5000])
        client.set_terminated(run_id, status=status)
    except Exception:  # noqa: BLE001 - never hide the stage's own error behind a tracking error
        pass


def reused_stage_run(uri: str, exp_id: str, pipeline_run_id: str, p: Pipeline, node: StageNode, marker: dict,
                     location: str, waited: bool = False) -> str:
    """A nested run recording that this pipeline run reused an existing output, linking to the run that built it."""
    client = runs._client(uri)
    built = marker.get("mlflow") or {}
    by = built.get("run_id") or ""
    note = (f"Reused the output of stage `{node.name}` (key `{marker.get('key')}`, build `{marker.get('build_id')}`)"
            f" at `{location}`; nothing was recomputed. Built by run "
            + (f"[{by}]({run_link(built.get('experiment_id', exp_id), by)})" if by else "(unknown)")
            + (f" of pipeline run `{built.get('pipeline_run_id')}`" if built.get("pipeline_run_id") else "")
            + (" while this run waited for it." if waited else "."))
    tags = {"mlflow.runName": f"{node.name} (reused)", "mlflow.parentRunId": pipeline_run_id,
            **stage_tags(p, node, marker.get("key", ""), pipeline_run_id, True),
            "medvl.built_by_run_id": by, "medvl.built_by_pipeline_run_id": built.get("pipeline_run_id") or "",
            "medvl.build_id": marker.get("build_id", ""), "medvl.output": location,
            "medvl.waited_for_build": str(waited).lower(), "mlflow.note.content": note}
    rid = client.create_run(exp_id, run_name=f"{node.name} (reused)", tags=tags).info.run_id
    _log_params(client, rid, stage_params(node, marker.get("config") or {}, marker.get("upstream") or {}))
    if marker.get("metrics"):
        _log_metrics(client, rid, marker["metrics"])
    client.set_terminated(rid, status="FINISHED")
    return rid


def finish_pipeline_run(uri: str, run_id: str, table: list[dict], metrics: dict[str, float], status: str) -> None:
    client = runs._client(uri)
    if metrics:
        _log_metrics(client, run_id, metrics)
    _log_metrics(client, run_id, {"pipeline/built": sum(r["action"] == "built" for r in table),
                                  "pipeline/reused": sum(r["action"] == "reused" for r in table)})
    for r in table:
        client.set_tag(run_id, f"medvl.stage.{r['stage']}", f"{r['action']} {r.get('key') or ''}".strip())
    _log_json(client, run_id, table, "stages.json", "pipeline")
    client.set_terminated(run_id, status=status)


__all__ = ["start_pipeline_run", "start_stage_run", "finish_stage_run", "reused_stage_run", "finish_pipeline_run",
           "fail_run", "stage_tags", "run_link"]
