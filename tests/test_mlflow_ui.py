"""Browser test: a small sweep logged to a real `mlflow server`, rendered by headless Chromium.

    .venv/bin/python -m pytest tests/test_mlflow_ui.py        # needs Debian's `chromium` (./dev test installs it)

What MLflow 3.17's UI renders (checked against screenshots): the experiment's runs table
(`#/experiments/<id>/runs`) lists the sweep's parent run with an expander button, its nested trial runs
collapsed under it (they count towards "N matching runs" but are not in the DOM until expanded); the parent run's
page (`#/experiments/<id>/runs/<parent>`) lists them under "Child runs"; the compare page
(`#/compare-runs?runs=[...]`) shows the trials side by side with their differing params. Screenshots go to
`test-artifacts/` (gitignored).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
SMALL = str(ROOT / "jobs" / "sweep_digits_small.yaml")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _browse(chrome: str, url: str, screenshot: Path) -> str:
    """The rendered DOM of `url` (after 15 s of virtual time) and a 1400×900 screenshot of it."""
    common = [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
              "--disable-dev-shm-usage", "--no-first-run"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=240).stdout
    subprocess.run([*common, f"--screenshot={screenshot}", "--window-size=1400,900", url], capture_output=True,
                   timeout=240, check=False)
    return dom


@pytest.fixture
def fresh_ray():
    import ray
    if ray.is_initialized():
        ray.shutdown()
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sweep_renders_nested_in_mlflow_ui(digits_corpus, tmp_path, monkeypatch, fresh_ray):
    chrome = _chromium()
    if chrome is None:
        pytest.skip("chromium not found (apt-get install -y chromium; ./dev test installs it)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MEDVL_RUN_ROOT", raising=False)
    from medvl.track.server import start_server, stop_server
    from medvl.tune.spec import load_sweep
    from medvl.tune.sweep import run_sweep

    url, proc = start_server(tmp_path / "mlflow", timeout=120)
    try:
        spec = load_sweep(SMALL, [f"data.corpus={digits_corpus}", f"runtime.run_root={tmp_path / 'runs'}",
                                  f"track.tracking_uri={url}", "track.experiment=ui-sweep", "name=ui-sweep",
                                  "num_samples=2", "train.epochs=1", "train.max_steps=8", "eval.max_rows=120",
                                  "n_startup_trials=1",
                                  # trials with Ray Train workers (1-worker trials train in their actors by
                                  # default): this test also keeps that sweep path covered
                                  "train.launch=workers"])
        out = run_sweep(spec, verbose=0)
        assert out.complete and out.tracking_uri == url
        trials = {r["run_name"]: r["mlflow_run_id"] for r in out.table.to_dict("records")}
        assert len(trials) == 2
        exp, parent = out.experiment_id, out.parent_run_id
        ARTIFACTS.mkdir(exist_ok=True)

        # 1) the runs table: the parent, with an expander for its nested trials
        dom = _browse(chrome, f"{url}/#/experiments/{exp}/runs", ARTIFACTS / "mlflow_ui_sweep_runs.png")
        assert f'href="#/experiments/{exp}/runs/{parent}"' in dom, dom[-2000:]
        assert re.search(r">ui-sweep</span>", dom)
        cell = dom[:dom.index(f'href="#/experiments/{exp}/runs/{parent}"')][-3000:]  # the parent's name cell
        assert re.search(r"<button[^>]*runnamecellrenderer", cell), cell  # its expand/collapse control
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
        m = re.search(r"(\d+) matching runs", text)
        assert m and int(m.group(1)) == 3, text[-500:]  # parent + 2 nested trials
        for name in trials:  # collapsed: children are not rendered as rows yet
            assert f">{name}<" not in dom

        # 2) the parent run's page: "Child runs" lists both trials; best params are shown
        dom = _browse(chrome, f"{url}/#/experiments/{exp}/runs/{parent}", ARTIFACTS / "mlflow_ui_sweep_parent.png")
        assert "Child runs" in dom
        for name, run_id in trials.items():
            assert f">{name}<" in dom and run_id in dom
        assert "best/optim.lr" in dom or "medvl.best_trial" in dom

        # 3) compare the trials side by side
        q = urllib.parse.urlencode({"runs": json.dumps(list(trials.values())), "experiments": json.dumps([exp])})
        dom = _browse(chrome, f"{url}/#/compare-runs?{q}", ARTIFACTS / "mlflow_ui_sweep_compare.png")
        assert "Comparing 2 Runs" in dom
        for name in trials:
            assert f">{name}<" in dom
        assert "optim.lr" in dom and "model.init_logit_scale" in dom
        for png in ("runs", "parent", "compare"):
            assert (ARTIFACTS / f"mlflow_ui_sweep_{png}.png").stat().st_size > 10_000
    finally:
        stop_server(proc)
