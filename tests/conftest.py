"""Shared fixtures: real local Ray clusters, the real digits corpus, isolated run roots."""
from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")

import pytest  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PLATFORM_DIR = os.path.join(os.path.dirname(TESTS_DIR), "platform")
# This checkout's medvl (also when the venv's editable install points at another checkout, e.g. a git worktree),
# in this process, in Ray workers and in subprocesses; and the test-only plug-ins (tests/medvl_test_plugins.py)
import sys  # noqa: E402

sys.path[:0] = [PLATFORM_DIR, TESTS_DIR]
os.environ["PYTHONPATH"] = os.pathsep.join([PLATFORM_DIR, TESTS_DIR] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


@pytest.fixture(scope="session")
def digits_corpus(tmp_path_factory) -> str:
    """scikit-learn's handwritten digits ingested through `medvl ingest digits` (the demo corpus)."""
    from medvl.data.ingest import ingest_digits
    out = tmp_path_factory.mktemp("corpora") / "digits"
    ingest_digits(str(out))
    return str(out)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster for one test module (4 logical CPUs on this 2-core machine)."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    # The workers inherit this process's environment: RAY_AUTH_MODE, and PYTHONPATH (Ray workers unpickle train
    # functions defined in test modules by module name). No job runtime_env, so Ray's prestarted workers are used.
    from medvl.raynode import init_local
    init_local(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


# The longest test files first (about 2-8 minutes each on the 2-core CI machine), then the rest in name order:
# `./dev test` runs two files at a time (pytest-xdist, --dist loadfile, in this order), and a long file started
# last would leave the other process idle at the end. Only the order of files changes; a file's tests keep theirs.
LONG_FILES_FIRST = ["test_resume.py", "test_tune.py", "test_clisc_stages.py", "test_cluster_faults.py",
                    "test_pipelines.py", "test_tracking_outage.py", "test_submit.py", "test_pmc_clip.py",
                    "test_console.py", "test_cxr_clip.py", "test_clipin.py", "test_faults.py", "test_train.py",
                    "test_mlflow_ui.py", "test_clisc_seg_stages.py", "test_clip_it.py", "test_model_outputs.py",
                    "test_methods.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: same-file tests keep their order


@pytest.fixture
def run_root(tmp_path, monkeypatch) -> str:
    root = tmp_path / "runs"
    monkeypatch.setenv("MEDVL_RUN_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return str(root)


# --------------------------------------------------------------------------- measured figures in the summary
# Tests that measure something the README reports (recovery times, ...) print a line starting with "[measured]";
# those lines are collected from the captured output and repeated at the end of the run, so CI logs carry them.
_MEASURED: list[str] = []


def pytest_runtest_logreport(report):
    if report.when == "call":
        for line in (report.capstdout or "").splitlines():
            if line.startswith("[measured]"):
                _MEASURED.append(f"{line} ({report.nodeid.split('::')[-1]})")


def pytest_terminal_summary(terminalreporter):
    if _MEASURED:
        terminalreporter.section("measured")
        for line in _MEASURED:
            terminalreporter.write_line(line)
