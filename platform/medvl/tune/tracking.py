"""MLflow side of a sweep: the parent run, closing stopped trials' child runs, and the end-of-sweep summary.

- Parent run: one per sweep, in the base recipe's experiment, tagged `medvl.sweep=<name>`; its id is kept in
  `<run_root>/sweeps/<name>/mlflow_parent_run_id`, so a resumed sweep logs into the same run.
- Children: each trial's job run carries `mlflow.parentRunId` (set by `prepare_job`), so the MLflow UI nests
  them under the parent. `SweepCallback` (a Tune callback on the driver) closes a child that a scheduler stopped
  (status KILLED; `finalize` never ran in the killed trial actor) and records trial start/end times.
- Summary: a table of all trials (`results.csv` + `mlflow.log_table`), the best trial's params (`best/<key>`)
  and objective, and Optuna's optimisation-history and parameter-importance plots as PNG artifacts.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml
from ray.tune import Callback

from medvl.config import Recipe
from medvl.redact import redact_text, uri_secret
from medvl.track import runs
from medvl.tune.spec import trial_horizon
from medvl.tune.trial import release_skip_counter, trial_run_name

log = logging.getLogger(__name__)

PARENT_ID_FILE = "mlflow_parent_run_id"
EVENTS_FILE = "trial_events.jsonl"
RESULTS_FILE = "results.csv"


# --------------------------------------------------------------------------- parent run


def start_or_resume_parent(name: str, spec_dict: dict, recipe: Recipe, uri: str, sweep_dir: Path) -> str:
    """Create the sweep's parent run, or reopen the one an earlier session of this sweep created."""
    client = runs._client(uri)
    resumed = runs.reopen_run(client, sweep_dir / PARENT_ID_FILE)  # None on another tracking server: a new parent
    if resumed:
        return resumed
    exp_id = runs.ensure_experiment(uri, recipe.track.experiment, runs.run_root(recipe))
    run = client.create_run(exp_id, run_name=name, tags={
        "mlflow.runName": name, "medvl.sweep": name, "medvl.kind": "sweep", "medvl.recipe": recipe.name,
        "mlflow.note.content": f"Hyperparameter sweep `{name}`: {spec_dict['num_samples']} trials, objective "
                               f"{spec_dict['mode']} `{spec_dict['metric']}`; trials are the nested runs."})
    run_id = run.info.run_id
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PARENT_ID_FILE).write_text(run_id)
    from mlflow.entities import Param
    params = {"sweep.metric": spec_dict["metric"], "sweep.mode": spec_dict["mode"],
              "sweep.num_samples": spec_dict["num_samples"], "sweep.seed": spec_dict["seed"],
              "sweep.scheduler": json.dumps(spec_dict["scheduler"]), "sweep.base": spec_dict["base"]}
    params.update({f"space.{k}": json.dumps(v) for k, v in spec_dict["search_space"].items()})
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "sweep.yaml").write_text(yaml.safe_dump(spec_dict, sort_keys=False))
        from medvl.tune.spec import is_pipeline_sweep
        if is_pipeline_sweep(recipe):
            from medvl.pipelines import dump_pipeline
            (Path(d) / "base_pipeline.yaml").write_text(dump_pipeline(recipe))
        else:
            (Path(d) / "base_recipe.yaml").write_text(runs.safe_yaml(recipe))
        client.log_artifacts(run_id, d, artifact_path="config")
    return run_id


def child_runs(uri: str, parent_run_id: str) -> dict[str, Any]:
    """Child runs of the sweep by trial id."""
    client = runs._client(uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                               max_results=5000)
    return {r.data.tags.get("medvl.trial_id", r.info.run_name): r for r in found}


def close_dangling_children(uri: str, parent_run_id: str, status: str = "KILLED", reason: str = "") -> int:
    """Set every child still RUNNING to `status` (after the Tuner returned, no trial is alive)."""
    client = runs._client(uri)
    n = 0
    for r in child_runs(uri, parent_run_id).values():
        if r.info.status == "RUNNING":
            if reason:
                client.set_tag(r.info.run_id, "medvl.end_reason", reason)
            client.set_terminated(r.info.run_id, status=status)
            release_skip_counter(r.info.run_id, uri)
            n += 1
    return n


# --------------------------------------------------------------------------- Tune callback (driver side)


class SweepCallback(Callback):
    """Records trial start/end times and closes the MLflow child runs of trials a scheduler stopped.

    Pickled into the Tune experiment state (`Tuner.restore` brings it back), so it holds only plain data."""

    def __init__(self, sweep: str, sweep_dir: str, run_root: str, tracking_uri: str, parent_run_id: str):
        self.sweep, self.sweep_dir, self.run_root = sweep, sweep_dir, run_root
        # pickled into the sweep's state on disk: a URI with a password is looked up in the environment instead
        self._uri = None if uri_secret(tracking_uri) else tracking_uri
        self.parent_run_id = parent_run_id

    @property
    def tracking_uri(self) -> str:
        return getattr(self, "_uri", None) or self.__dict__.get("tracking_uri") or os.environ["MLFLOW_TRACKING_URI"]

    def _event(self, trial, event: str, **extra) -> None:
        rec = {"trial_id": trial.trial_id, "event": event, "t": time.time(), **extra}
        with open(Path(self.sweep_dir) / EVENTS_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _run_id(self, trial) -> Optional[str]:
        f = Path(self.run_root) / "jobs" / trial_run_name(self.sweep, trial.trial_id) / runs.RUN_ID_FILE
        return f.read_text().strip() if f.exists() else None

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._event(trial, "start")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = dict(trial.last_result or {})
        self._event(trial, "complete", epoch=last.get("epoch"))
        self._close(trial, "KILLED", last, "stopped by the scheduler")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        """The trial's driver failed (e.g. its node was lost) and Tune restarts it; it resumes from its checkpoint."""
        self._event(trial, "recover")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._event(trial, "error")
        self._close(trial, "FAILED", dict(trial.last_result or {}), "trial error")

    def _close(self, trial, status: str, last: dict, reason: str) -> None:
        run_id = self._run_id(trial)
        if not run_id:
            return
        try:
            client = runs._client(self.tracking_uri)
            if client.get_run(run_id).info.status != "RUNNING":
                return  # finalize() closed it: the trial ran to its end
            client.set_tag(run_id, "medvl.end_reason", reason)
            if status == "KILLED":
                client.set_tag(run_id, "medvl.stopped_early", "true")
                client.set_tag(run_id, "medvl.stopped_at_epoch", str(last.get("epoch")))
                with tempfile.TemporaryDirectory() as d:
                    plot = runs.plot_loss_curve(self.tracking_uri, run_id, Path(d) / "loss_curve.png")
                    if plot:
                        client.log_artifact(run_id, str(plot), artifact_path="plots")
            summary = {k: last[k] for k in ("step", "epoch") if k in last}
            runs.finish_run(self.tracking_uri, run_id, status, summary)
            release_skip_counter(run_id, self.tracking_uri)
        except Exception as e:  # noqa: BLE001 - never break the Tune loop over bookkeeping
            log.warning("could not close MLflow run %s of trial %s: %s", run_id, trial.trial_id, redact_text(e))


def trial_times(sweep_dir: Path) -> dict[str, dict[str, float]]:
    """{trial_id: {"start": t, "end": t}} from the callback's event log (first start, last end)."""
    out: dict[str, dict[str, float]] = {}
    p = sweep_dir / EVENTS_FILE
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        t = out.setdefault(e["trial_id"], {})
        if e["event"] == "start":
            t.setdefault("start", e["t"])
        elif e["event"] == "recover":
            t["recovered"] = t.get("recovered", 0) + 1
        else:
            t["end"] = e["t"]
    return out


# --------------------------------------------------------------------------- summary


def trial_state(trial) -> str:
    """Tune's status, except that a trial Tune stopped because the sweep was interrupted (status TERMINATED but
    no final `done` result: it neither finished nor was stopped by the scheduler) is INTERRUPTED."""
    if trial.status == "TERMINATED" and not (trial.last_result or {}).get("done"):
        return "INTERRUPTED"
    return trial.status


def trials_table(trials: list, space_keys: list[str], metric: str | list[str], horizon: int, uri: str,
                 parent_run_id: str, sweep_dir: Path):
    """One row per Tune trial (`ResultGrid`'s trials): id, MLflow child run, statuses, sampled params,
    objective(s), epochs trained, whether the scheduler stopped it, trial start/end times, and the process id of
    the Tune actor that ran it (`trial_pid`: trials that share one ran in a reused actor, `resources.reuse_actors`)."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    import pandas as pd
    children = child_runs(uri, parent_run_id)
    times = trial_times(sweep_dir)
    client = runs._client(uri)
    rows = []
    for trial in trials:
        m = dict(trial.last_result or {})
        tid = trial.trial_id
        cfg = dict(trial.config or {})
        child = children.get(tid)
        t = times.get(tid, {})
        epoch = m.get("epoch")
        rows.append({
            "trial_id": tid, "run_name": child.info.run_name if child else None,
            "mlflow_run_id": child.info.run_id if child else None,
            "tune_status": trial_state(trial), "mlflow_status": child.info.status if child else None,
            "error": trial_state(trial) == "ERROR",
            **{k: cfg.get(k) for k in space_keys},
            **{k: m.get(k) for k in metrics}, "epoch": epoch, "step": m.get("step"),
            "stopped_early": bool(trial_state(trial) == "TERMINATED" and epoch is not None
                                  and epoch < trial_horizon(horizon, cfg)),
            "trial_start": t.get("start"), "trial_end": t.get("end"),
            "trial_wall_s": (t["end"] - t["start"]) if "start" in t and "end" in t else None,
            "trial_pid": m.get("pid"),
            **_incidents(client, trial, child, int(t.get("recovered", 0))),
        })
    return pd.DataFrame(rows)


def _incidents(client, trial, child, recovered: int = 0) -> dict[str, Any]:
    """What went wrong in a trial: how often Tune restarted its driver (a lost node), how often its workers resumed
    from a checkpoint after a failure (a lost node, a killed worker, or the sweep being resumed), and the error that
    ended it."""
    resumed: list = []
    if child is not None:
        try:
            resumed = sorted(client.get_metric_history(child.info.run_id, "train/resumed_from_step"),
                             key=lambda m: m.timestamp)
        except Exception:  # noqa: BLE001
            resumed = []
    error = None
    if trial_state(trial) == "ERROR":
        try:
            lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
            error = redact_text(lines[-1])[:300] if lines else "unknown error"
        except Exception:  # noqa: BLE001 - no error file
            error = "unknown error (no error file)"
    notes = []
    if recovered:
        notes.append(f"its driver was lost and Tune restarted it {recovered}x")
    if resumed:
        notes.append(f"resumed from a checkpoint {len(resumed)}x (step "
                     f"{', '.join(str(int(m.value)) for m in resumed)})")
    if error:
        notes.append(f"failed: {error}")
    return {"restarts": len(resumed), "driver_restarts": recovered, "error_message": error,
            "incidents": "; ".join(notes) or None}


def best_row(df, metric: str, mode: str) -> Optional[dict]:
    if not len(df):
        return None
    ok = df[(df["tune_status"] == "TERMINATED")
            & df[metric].map(lambda v: isinstance(v, (int, float)) and math.isfinite(v))]
    if not len(ok):
        return None
    idx = ok[metric].idxmax() if mode == "max" else ok[metric].idxmin()
    return ok.loc[idx].to_dict()


def rebuild_study(df, space, metric: str | list[str], mode: str | list[str]):
    """An Optuna study holding the trials' params and objective values (for the visualisation functions); with
    several metrics a multi-objective study (one direction each)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metrics = [metric] if isinstance(metric, str) else list(metric)
    modes = [mode] if isinstance(mode, str) else list(mode)
    directions = ["maximize" if m == "max" else "minimize" for m in modes]
    study = optuna.create_study(directions=directions) if len(metrics) > 1 else \
        optuna.create_study(direction=directions[0])
    dists = space.distributions()
    for _, r in df.sort_values("trial_start", na_position="last").iterrows():
        vals = [r.get(k) for k in metrics]
        if r.get("tune_status") != "TERMINATED" or any(_missing(v) or not math.isfinite(float(v)) for v in vals):
            continue
        params = {k: r[k] for k in dists if k in r and not _missing(r[k])}
        params = {k: (int(v_) if isinstance(dists[k], optuna.distributions.IntDistribution) else v_)
                  for k, v_ in params.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  values=[float(v) for v in vals]))
    return study


def pareto_ids(df, metrics: list[str], modes: list[str]) -> set[str]:
    """Trial ids on the Pareto front of the finished trials: no other finished trial is at least as good in every
    objective and better in one."""
    pts = []
    for r in df.to_dict("records"):
        vals = [r.get(k) for k in metrics]
        if r.get("tune_status") == "TERMINATED" and not any(_missing(v) or not math.isfinite(float(v)) for v in vals):
            pts.append((r["trial_id"], [float(v) if m == "max" else -float(v) for v, m in zip(vals, modes)]))

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))
    return {tid for tid, v in pts if not any(dominates(w, v) for t2, w in pts if t2 != tid)}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def save_plots(study, out_dir: Path, target_name: str | list[str] = "Objective Value") -> dict[str, str]:
    """Optimisation history + parameter importances as PNGs (of the first objective), and for a multi-objective
    study the Pareto front; returns {name: path or 'skipped: reason'}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    names = [target_name] if isinstance(target_name, str) else list(target_name)
    multi = len(study.directions) > 1
    first = {"target": (lambda t: t.values[0]), "target_name": names[0]} if multi else {"target_name": names[0]}
    out: dict[str, str] = {}
    plots = {"optimization_history": lambda st: ovm.plot_optimization_history(st, **first),
             "param_importances": lambda st: ovm.plot_param_importances(st, **first)}
    if multi:
        plots["pareto_front"] = lambda st: ovm.plot_pareto_front(st, target_names=names[:len(st.directions)])
    for name, fn in plots.items():
        if name == "param_importances":
            n = len(study.trials)
            if n < 2:
                out[name] = f"skipped: needs >= 2 completed trials (have {n})"
                continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            p = out_dir / f"{name}.png"
            fig.savefig(p, dpi=100)
            plt.close(fig)
            out[name] = str(p)
        except Exception as e:  # noqa: BLE001 - e.g. importance of a single parameter / constant objective
            out[name] = f"skipped: {type(e).__name__}: {e}"
    return out


def _log_param_once(client, run_id: str, key: str, value: Any) -> None:
    """MLflow params are immutable: an identical re-log is fine, a changed value goes to a tag instead."""
    try:
        client.log_param(run_id, key, value)
    except Exception:  # noqa: BLE001
        client.set_tag(run_id, key, str(value))


def proxy_check(df, metric: str, mode: str, truth: str, truth_mode: str) -> dict[str, float]:
    """How well a label-free objective ranks the finished trials by a ground-truth metric (evaluation only):
    Spearman over the trials with both values, the truth of the trial the objective picks, the best truth."""
    from scipy.stats import spearmanr
    ok = df[[metric, truth]].apply(lambda c: c.map(lambda v: not _missing(v))).all(axis=1) if len(df) else []
    d = df[ok] if len(df) else df
    out = {"proxy/trials": float(len(d))}
    if not len(d):
        return out
    x, y = d[metric].astype(float), d[truth].astype(float)
    pick = int(x.values.argmax() if mode == "max" else x.values.argmin())
    out["proxy/truth_of_best"] = float(y.values[pick])
    out["proxy/best_truth"] = float(y.max() if truth_mode == "max" else y.min())
    if len(d) >= 3 and x.nunique() > 1 and y.nunique() > 1:
        out["proxy/spearman"] = float(spearmanr(x, y).statistic)
    return out


def proxy_picture(df, metric: str, truth: str, path: Path, stats: dict[str, float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = df[[metric, truth, "trial_id"]].dropna()
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    ax.scatter(d[metric].astype(float), d[truth].astype(float), s=18)
    for _, r in d.iterrows():
        ax.annotate(str(r["trial_id"])[-5:], (float(r[metric]), float(r[truth])), fontsize=5)
    rho = stats.get("proxy/spearman")
    ax.set_title(f"objective vs ground truth over {len(d)} trials"
                 + (f" (Spearman {rho:.2f})" if rho is not None else ""), fontsize=7)
    ax.set_xlabel(f"{metric} (the objective, label-free)", fontsize=7)
    ax.set_ylabel(f"{truth} (ground truth, evaluation only)", fontsize=7)
    ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_summary(uri: str, parent_run_id: str, df, best: Optional[dict], space, metric: str | list[str],
                mode: str | list[str], sweep_dir: Path, complete: bool,
                truth: Optional[tuple[str, str]] = None) -> dict[str, str]:
    """Write results.csv and log table, best params/metric (the first objective's) and the Optuna plots to the
    parent run; with several objectives also the Pareto front (plot, `pareto` column, tag); with a `truth`
    (metric, mode) the proxy check (`proxy_check`, `sweep/proxy_vs_truth.png`)."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    modes = [mode] if isinstance(mode, str) else list(mode)
    metric = metrics[0]
    client = runs._client(uri)
    if len(metrics) > 1 and len(df):
        front = pareto_ids(df, metrics, modes)
        df = df.assign(pareto=df["trial_id"].isin(front))
        client.set_tag(parent_run_id, "medvl.pareto_trials", ",".join(sorted(front)) or "none")
    csv = sweep_dir / RESULTS_FILE
    df.to_csv(csv, index=False)
    client.log_artifact(parent_run_id, str(csv), artifact_path="sweep")
    table = df.astype(object).where(df.notna(), None)
    client.log_table(parent_run_id, data=table, artifact_file="sweep/trials_table.json")
    done = df[~df["error"]] if len(df) else df
    client.log_metric(parent_run_id, "sweep/trials", float(len(df)))
    client.log_metric(parent_run_id, "sweep/stopped_early", float(done["stopped_early"].sum()) if len(df) else 0.0)
    client.log_metric(parent_run_id, "sweep/errors", float(df["error"].sum()) if len(df) else 0.0)
    plots: dict[str, str] = {}
    if best is not None:
        for k in space.params:
            v = best.get(k)
            if not _missing(v):
                _log_param_once(client, parent_run_id, f"best/{k}", v)
        _log_param_once(client, parent_run_id, "best/trial_id", best["trial_id"])
        client.log_metric(parent_run_id, f"best/{metric}", float(best[metric]))
        client.set_tag(parent_run_id, "medvl.best_trial", best["trial_id"])
        if best.get("mlflow_run_id"):
            client.set_tag(parent_run_id, "medvl.best_run_id", best["mlflow_run_id"])
        study = rebuild_study(df, space, metrics, modes)
        with tempfile.TemporaryDirectory() as d:
            plots = save_plots(study, Path(d), target_name=metrics)
            for name, p in plots.items():
                if not p.startswith("skipped"):
                    client.log_artifact(parent_run_id, p, artifact_path="optuna")
                else:
                    client.set_tag(parent_run_id, f"medvl.plot.{name}", p[:5000])
    if truth is not None and len(df):
        done_ = df[~df["error"]]
        stats = proxy_check(done_, metric, modes[0], truth[0], truth[1])
        for k, v in stats.items():
            client.log_metric(parent_run_id, k, v)
        pic = sweep_dir / "proxy_vs_truth.png"
        proxy_picture(done_, metric, truth[0], pic, stats)
        client.log_artifact(parent_run_id, str(pic), artifact_path="sweep")
        plots["proxy_vs_truth"] = str(pic)
    incidents = [f"trial {r['trial_id']}: {r['incidents']}" for r in df.to_dict("records") if r.get("incidents")] \
        if len(df) and "incidents" in df else []
    client.set_tag(parent_run_id, "medvl.incidents", redact_text("\n".join(incidents) or "none")[:5000])
    client.set_tag(parent_run_id, "medvl.complete", str(complete).lower())
    return plots
