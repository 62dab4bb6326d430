"""Pipelines (`medvl pipeline`, `medvl.pipelines`): cache keys, validation, atomic outputs, locks, reuse, MLflow
runs (fast, no Ray: `test_write` stages run in the pipeline's process), then on a real local Ray cluster: Ray-task
stages, two concurrent `medvl pipeline` processes sharing a stage, a pipeline sweep whose trials share their first
stage, and the digits pipeline (Ray Train -> Ray Data -> Ray task) submitted to a real cluster with `medvl submit`.

    .venv/bin/python -m pytest tests/test_pipelines.py -m "not slow"    # keys, errors, store, locks, reuse: ~1 min
    .venv/bin/python -m pytest tests/test_pipelines.py                  # + Ray: concurrency, sweep, submit
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from medvl_test_stages import WriteKind, builds  # noqa: E402
from test_submit import local_cluster  # noqa: E402,F401  (a real Ray head started by cluster/local/start-head.sh)

from medvl.cli import main as cli  # noqa: E402
from medvl.pipelines import PipelineError, load_pipeline, plan_pipeline, run_pipeline  # noqa: E402
from medvl.pipelines.locks import FileLock, LockTimeout  # noqa: E402
from medvl.pipelines.store import MARKER, FsspecStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS_PIPELINE = ROOT / "jobs" / "pipeline_digits_probe.yaml"


def quiet(_: str) -> None:
    pass


def write(path: Path, stages: dict, **top) -> Path:
    data = {"name": "t", "plugins": ["medvl_test_stages"], **top, "stages": stages}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def abc(tmp_path: Path, kind_a: str = "test_write", sleep_a: float = 0.0, **top) -> Path:
    """a -> b -> c, plus d (independent); every build appended to tmp_path/builds.log."""
    log = str(tmp_path / "builds.log")
    return write(tmp_path / "pipe.yaml", {
        "a": {"kind": kind_a, "value": 1, "log": log, "sleep_s": sleep_a},
        "b": {"kind": "test_write", "inputs": {"src": "a"}, "value": 10, "log": log},
        "c": {"kind": "test_write", "inputs": {"src": "b", "src2": "a"}, "value": 100, "log": log},
        "d": {"kind": "test_write", "value": 1000, "log": log},
    }, **top)


def keys(p) -> dict:
    return {n: pl.key for n, pl in plan_pipeline(p).items()}


def count(log: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in builds(str(log)):
        out[b["stage"]] = out.get(b["stage"], 0) + 1
    return out


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    """One SQLite MLflow store for the module (creating one takes seconds); each test has its own run root."""
    d = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{d / 'mlflow.db'}"


@pytest.fixture
def env(tmp_path, monkeypatch, tracking) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("MEDVL_RUN_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    return root


# --------------------------------------------------------------------------- keys


@pytest.mark.timeout(120)
def test_keys_change_exactly_when_their_inputs_change(tmp_path, env, digits_corpus, monkeypatch):
    corpus = tmp_path / "corpus"
    shutil.copytree(digits_corpus, corpus)  # shards get touched below
    data = tmp_path / "labels.txt"
    data.write_text("abcdef")
    path = abc(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["stages"]["a"].update(data=str(data), corpus=str(corpus))
    path.write_text(yaml.safe_dump(raw))

    def k(*ov):
        return keys(load_pipeline(path, list(ov)))

    k0 = k()
    assert k0["a"] and k0["d"] and k0["b"] is None  # b's key needs a's output id (a is not built yet)
    assert k() == k0  # deterministic
    # what cannot change an output stays out of the key
    assert k("a.sleep_s=5", "track.experiment=x", "cache.stale_lock_s=5", "name=other") == k0
    # the config slice: a stage's own keys change its key, nobody else's
    k1 = k("a.value=2")
    assert k1["a"] != k0["a"] and k1["d"] == k0["d"]
    k2 = k("d.value=7")
    assert k2["d"] != k0["d"] and k2["a"] == k0["a"]
    # a file input: its content (same size, new mtime) changes the key; the same content again restores it
    data.write_text("abcdeX")
    assert k()["a"] != k0["a"] and k()["d"] == k0["d"]
    data.write_text("abcdef")
    assert k() == k0
    # a corpus input: `stat` sees a shard's new mtime; `content` hashes bytes, so a touch changes nothing
    kc = k("cache.corpus_fingerprint=content")
    shard = sorted((corpus / "shards").glob("*.parquet"))[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert k()["a"] != k0["a"]
    assert k("cache.corpus_fingerprint=content") == kc
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert k() == k0
    # the code version a kind declares
    monkeypatch.setattr(WriteKind, "version", "2")
    kv = k()
    assert kv["a"] != k0["a"] and kv["d"] != k0["d"]
    monkeypatch.setattr(WriteKind, "version", "1")

    # upstream: b's key is a function of a's output id (key + build id); reuse keeps it, a rebuild changes it
    p = load_pipeline(path)
    first = {r["stage"]: r["key"] for r in run_pipeline(p, say=quiet).table}
    assert first["a"] == k0["a"] and first["d"] == k0["d"]
    assert keys(p) == first  # all reused now: every key is known and unchanged
    forced = {r["stage"]: r["key"] for r in run_pipeline(p, force=["a"], say=quiet).table}
    assert forced["a"] == first["a"] and forced["d"] == first["d"]  # same inputs, same key (a new build id)
    assert forced["b"] != first["b"] and forced["c"] != first["c"]  # downstream keys changed by themselves
    assert keys(p) == forced
    assert keys(load_pipeline(path, ["d.value=5"]))["b"] == forced["b"]  # d is not upstream of b


@pytest.mark.timeout(120)
def test_train_stage_key_hashes_the_recipe_but_not_run_settings(digits_corpus, env, monkeypatch):
    from medvl.methods.clip import ClipMethod
    ov = [f"clip.data.corpus={digits_corpus}"]

    def key(*more):
        return keys(load_pipeline(DIGITS_PIPELINE, ov + list(more)))["clip"]

    k0 = key()
    assert key("clip.train.log_every=1", "clip.train.ckpt_every=7", "clip.track.experiment=x", "clip.name=y",
               "clip.runtime.num_cpus=3", "clip.train.max_failures=0", "clip.data.decoded_buffer_mb=256",
               "clip.data.decoded_block_mb=8") == k0
    assert key("clip.optim.lr=3e-4") != k0
    assert key("clip.model.init_logit_scale=2.0") != k0
    assert key("probe.C=0.5") == k0  # a later stage's setting
    monkeypatch.setattr(ClipMethod, "version", "2")  # the method's code version is in the train stage's key
    assert key() != k0


# --------------------------------------------------------------------------- validation


BAD = [
    ({"a": {"kind": "test_nope"}}, r"stages\.a\.kind: unknown stage kind 'test_nope' \(registered: .*test_write"),
    ({"a": {"value": 1}}, r"stages\.a\.kind: missing"),
    ({"a": {"kind": "test_write", "inputs": {"src": "b"}}, "b": {"kind": "test_write", "inputs": {"src": "a"}}},
     r"dependency cycle (a -> b -> a|b -> a -> b)"),
    ({"a": {"kind": "test_write", "inputs": {"src": "a"}}}, r"dependency cycle a -> a"),
    ({"a": {"kind": "test_write", "inputs": {"src": "zz"}}}, r"stages\.a\.inputs\.src: no stage named 'zz' \(stages: a\)"),
    ({"a": {"kind": "test_write", "inputs": {"model": "a"}}}, r"stages\.a\.inputs\.model: stage kind 'test_write' has no input 'model'"),
    ({"e": {"kind": "embed"}}, r"stages\.e\.inputs: missing input 'model'"),
    ({"a": {"kind": "test_write"}, "e": {"kind": "embed", "inputs": {"model": "a"}}},
     r"stages\.e\.inputs\.model: stage 'a' is a 'test_write' stage; input 'model' of kind 'embed' takes 'train'"),
    ({"a": {"kind": "test_write", "valu": 1}}, r"stages\.a \(kind test_write\): unknown key valu"),
    ({"a": {"kind": "test_write", "value": "x"}}, r"stages\.a \(kind test_write\): value: expected a number"),
    ({"a": {"kind": "test_write", "files": 0}}, r"stages\.a \(kind test_write\): files must be >= 1"),
    ({"a.b": {"kind": "test_write"}}, r"stages\.a\.b: a stage name is letters"),
    ({"cache": {"kind": "test_write"}}, r"stages\.cache: 'cache' is a pipeline setting"),
    ({"p": {"kind": "linear_probe", "inputs": {"features": "p"}, "C": -1}}, r"stages\.p \(kind linear_probe\): C must be > 0"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stages, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_pipelines_are_named(tmp_path, stages, message):
    with pytest.raises(PipelineError, match=message):
        load_pipeline(write(tmp_path / "p.yaml", stages))


@pytest.mark.timeout(60)
def test_bad_overrides_files_and_flags_are_named(tmp_path, env, capsys):
    path = abc(tmp_path)
    with pytest.raises(PipelineError, match=r"unknown key a\.valu: stage 'a' \(kind test_write\)"):
        load_pipeline(path, ["a.valu=1"])
    with pytest.raises(PipelineError, match=r"unknown key zz\.value: no stage named 'zz' \(stages: a, b, c, d\)"):
        load_pipeline(path, ["zz.value=1"])
    with pytest.raises(PipelineError, match=r"unknown key cache\.lok"):
        load_pipeline(path, ["cache.lok=ray"])
    with pytest.raises(PipelineError, match=r"stages\.a\.base: file 'nope\.yaml' not found"):
        load_pipeline(path, ["a.base=nope.yaml"])
    (tmp_path / "r.yaml").write_text("data: {corpus: x}\noptim: {lr: 1}\n")  # a training recipe
    with pytest.raises(PipelineError, match=r"unknown key data .*is this a training recipe\? run it with `medvl train`"):
        load_pipeline(tmp_path / "r.yaml")
    # a missing input file or corpus: named with its stage and key, before anything runs
    missing = tmp_path / "no-such-file.bin"
    with pytest.raises(PipelineError, match=rf"stages\.a\.data: input file not found: {missing}"):
        plan_pipeline(load_pipeline(path, [f"a.data={missing}"]))
    with pytest.raises(PipelineError, match=rf"stages\.d\.corpus: input corpus {tmp_path}/nocorpus: .*manifest"):
        plan_pipeline(load_pipeline(path, [f"d.corpus={tmp_path / 'nocorpus'}"]))
    with pytest.raises(PipelineError, match=r"--only zz: no stage named 'zz'"):
        plan_pipeline(load_pipeline(path), only=["zz"])
    # through the command line: exit code 2, the message on stderr, nothing run
    assert cli(["pipeline", str(path), f"a.data={missing}"]) == 2
    assert f"stages.a.data: input file not found: {missing}" in capsys.readouterr().err
    assert cli(["pipeline", str(path), "--force", "zz"]) == 2
    assert "--force zz: no stage named 'zz'" in capsys.readouterr().err
    assert not env.exists(), "nothing may be written before the pipeline is valid"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("override, message", [
    ("metric=probe/acc", r"metric: no stage of pipeline 'digits-probe' reports 'probe/acc'; objectives are "
                         r"<stage>/<metric>, one of: .*clip/val/zero_shot_accuracy.*probe/accuracy"),
    ("search_space.probe.Cc={type: uniform, low: 0.1, high: 1}", r"search_space\.probe\.Cc: unknown key probe\.Cc"),
    ("search_space.probe.C.low=0", r"search_space\.probe\.C: loguniform needs low > 0"),
    ("search_space.probe.label_fraction={type: uniform, low: 0.5, high: 2}",
     r"value 2 is not valid for the pipeline: stages\.probe \(kind linear_probe\): label_fraction must be in"),
    ("search_space.clip.train.num_workers={type: int, low: 1, high: 2}", r"stage 'clip' \(train\) sets it itself"),
    ("search_space.cache.lock={type: choice, values: [ray]}", r"a pipeline setting .* cannot be searched"),
    ("search_space.embed.inputs.model={type: choice, values: [clip]}", r"the stage graph is the same"),
    ("scheduler.kind=asha", r"scheduler\.kind: asha stops trials at epoch ends, but a pipeline trial reports"),
    ("resources.workers=2", r"resources\.workers: the base is a pipeline"),
    ("probe.Cc=1", r"unknown key probe\.Cc: neither a sweep key .* nor a pipeline key"),
])
def test_pipeline_sweeps_are_validated_before_any_trial(digits_corpus, override, message):
    import ray

    from medvl.tune.spec import SweepError, load_sweep, validate_sweep
    path = ROOT / "jobs" / "sweep_pipeline_probe.yaml"
    with pytest.raises(SweepError, match=message):
        validate_sweep(load_sweep(path, [f"clip.data.corpus={digits_corpus}", override]))
    assert not ray.is_initialized()
    ok = validate_sweep(load_sweep(path, [f"clip.data.corpus={digits_corpus}", "clip.optim.lr=3e-4"]))
    assert ok.stages["clip"].stage.config.optim.lr == 3e-4 and "probe/accuracy" in ok.metric_names()



@pytest.mark.timeout(60)
def test_a_sweep_trials_pipeline_has_the_keys_of_medvl_pipeline(digits_corpus, tmp_path):
    """A pipeline sweep's trial runs the base pipeline round-tripped through a dict (`pipeline_to_dict`), where a
    float field's default written as an int (`shuffle_buffer_mb: float = 256`) comes back as 256.0: the keys must
    not change, or a sweep rebuilds every stage `medvl pipeline` already built (found on the CLISC sweep)."""
    from medvl.pipelines import pipeline_to_dict
    from medvl.pipelines.fingerprint import canonical
    path = ROOT / "jobs" / "pipeline_digits_probe.yaml"
    p = load_pipeline(path, [f"clip.data.corpus={digits_corpus}", f"cache.root={tmp_path / 'store'}"])
    trial = load_pipeline(data=pipeline_to_dict(p))
    one, two = plan_pipeline(p), plan_pipeline(trial)
    assert one["clip"].key and one["clip"].key == two["clip"].key
    assert canonical({"a": 256, "b": [1.0, 0.5]}) == canonical({"a": 256.0, "b": [1, 0.5]})

# --------------------------------------------------------------------------- running, reusing, --only/--force/--dry-run


@pytest.mark.timeout(180)
def test_reuse_only_force_and_dry_run(tmp_path, env, capsys):
    path = abc(tmp_path)
    log = tmp_path / "builds.log"
    assert cli(["pipeline", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: 4 to build, 0 reused, 0 skipped (nothing was run)" in out
    assert "no output yet (never built)" in out and "input 'src' (a) is built first" in out
    assert not env.exists() and not log.exists()  # a dry run runs nothing, writes nothing (no MLflow either)

    p = load_pipeline(path)
    first = run_pipeline(p, say=quiet)
    assert [r["action"] for r in first.table] == ["built"] * 4
    assert first.metrics["c/value"] == 100 + (10 + 1) + 1  # c reads b (which read a) and a
    assert count(log) == {"a": 1, "b": 1, "c": 1, "d": 1}
    again = run_pipeline(p, say=quiet)
    assert [r["action"] for r in again.table] == ["reused"] * 4 and count(log) == {"a": 1, "b": 1, "c": 1, "d": 1}
    assert again.metrics == first.metrics

    # a new value for b: b and c rebuilt (c's input changed), a and d reused; the dry run says why
    assert cli(["pipeline", str(path), "b.value=5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "config value 10.0 -> 5.0" in out and "dry run: 2 to build, 2 reused" in out
    changed = run_pipeline(load_pipeline(path, ["b.value=5"]), say=quiet)
    assert {r["stage"]: r["action"] for r in changed.table} == {"a": "reused", "b": "built", "c": "built",
                                                                 "d": "reused"}
    # --only b: b alone is rebuilt (a reused as its input), c and d are not run
    only = run_pipeline(p, only=["b"], say=quiet)
    assert {r["stage"]: r["action"] for r in only.table} == {"a": "reused", "b": "built", "c": "skipped",
                                                              "d": "skipped"}
    assert only.table[1]["key"] == first.table[1]["key"]  # same inputs: same key, rebuilt in place
    # ... so c's input is a new build: the next full run rebuilds c by itself
    assert cli(["pipeline", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "input 'src' rebuilt" in out and "dry run: 1 to build, 3 reused" in out
    # --force a: a, and everything below it, rebuilt; d reused
    forced = run_pipeline(p, force=["a"], say=quiet)
    assert {r["stage"]: r["action"] for r in forced.table} == {"a": "built", "b": "built", "c": "built",
                                                                "d": "reused"}
    assert count(log) == {"a": 2, "b": 4, "c": 3, "d": 1}
    # --only on a stage whose input was never built for these settings: an error naming it
    with pytest.raises(PipelineError, match=r"--only c: its upstream stage 'b' has no complete output"):
        run_pipeline(load_pipeline(path, ["b.value=77"]), only=["c"], say=quiet)
    assert cli(["pipeline", str(path), "--only", "c", "--force", "d"]) == 0
    out = capsys.readouterr().out
    assert "(1 built, 2 reused)" in out  # c (--only) runs; d (--force, but not selected with --only) does not
    assert "c/value=" in out and "d/value=" not in out
    # --only with a forced upstream: that upstream is rebuilt first
    both = run_pipeline(p, only=["c"], force=["b"], say=quiet)
    assert {r["stage"]: r["action"] for r in both.table} == {"a": "reused", "b": "built", "c": "built",
                                                              "d": "skipped"}


@pytest.mark.timeout(180)
def test_mlflow_parent_nested_and_reused_runs(tmp_path, env, tracking):
    from mlflow.tracking import MlflowClient
    path = abc(tmp_path, track={"experiment": "pipe-mlflow"})
    p = load_pipeline(path)
    one = run_pipeline(p, say=quiet)
    two = run_pipeline(p, say=quiet)
    c = MlflowClient(tracking)
    parent = c.get_run(one.run_id)
    assert parent.data.tags["medvl.kind"] == "pipeline" and parent.info.status == "FINISHED"
    assert parent.data.metrics["c/value"] == 112 and parent.data.metrics["pipeline/built"] == 4

    def nested(run_id):
        rs = c.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
        return {r.data.tags["medvl.stage"]: r for r in rs}

    built, reused = nested(one.run_id), nested(two.run_id)
    assert set(built) == set(reused) == {"a", "b", "c", "d"}
    for s in "abcd":
        b, r = built[s], reused[s]
        assert b.data.tags["medvl.reused"] == "false" and r.data.tags["medvl.reused"] == "true"
        assert b.info.status == r.info.status == "FINISHED"
        assert r.data.tags["medvl.built_by_run_id"] == b.info.run_id  # the link to the run that built it
        assert r.data.tags["medvl.built_by_pipeline_run_id"] == one.run_id
        assert b.info.run_id in r.data.tags["mlflow.note.content"]
        assert b.data.params["value"] == r.data.params["value"]  # params = the config slice
        assert b.data.metrics["value"] == r.data.metrics["value"]
        assert b.data.tags["medvl.stage_key"] == r.data.tags["medvl.stage_key"]
    assert built["b"].data.params["input.src"].startswith(built["a"].data.tags["medvl.stage_key"] + ":")
    arts = [a.path for a in c.list_artifacts(built["b"].info.run_id, "stage")]
    assert arts == ["stage/marker.json"]
    assert [a.path for a in c.list_artifacts(one.run_id, "config")] == ["config/pipeline.yaml"]


# --------------------------------------------------------------------------- atomic outputs


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_interrupted_stage_is_recomputed_and_complete_one_reused(tmp_path, env, tracking):
    """A real process killed (SIGKILL) while its stage b writes: a stays complete, b's half-written output is never
    published; the next run reuses a, breaks b's stale lock (its holder is gone), cleans up and rebuilds b."""
    path = abc(tmp_path)
    log = tmp_path / "builds.log"
    run_env = {**os.environ, "MEDVL_TEST_CRASH": "b", "MEDVL_RUN_ROOT": str(env), "MLFLOW_TRACKING_URI": tracking}
    r = subprocess.run([sys.executable, "-m", "medvl.cli", "pipeline", str(path)], env=run_env, capture_output=True,
                       text=True, timeout=200)
    assert r.returncode == -9, r.stdout[-2000:] + r.stderr[-2000:]
    stages = env / "stages"
    assert len(list((stages / "a").glob(f"*/{MARKER}"))) == 1  # a is complete
    assert not [d for d in (stages / "b").iterdir() if not d.name.startswith(".") and not d.name.endswith(".lock")]
    half = list((stages / "b").glob(".building-*"))
    assert len(half) == 1 and (half[0] / "part-0.txt").exists() and not (half[0] / MARKER).exists()
    assert list((stages / "b").glob("*.lock")), "the killed build left its lock behind"
    assert count(log) == {"a": 1}

    said: list[str] = []
    out = run_pipeline(load_pipeline(path), say=said.append)
    assert {r["stage"]: r["action"] for r in out.table} == {"a": "reused", "b": "built", "c": "built",
                                                             "d": "built"}
    assert any("broke a stale build lock" in s and "is gone" in s for s in said), said
    assert any("removed the half-written output" in s for s in said), said
    assert count(log)["a"] == 1 and count(log)["b"] == 1
    assert not list((stages / "b").glob(".building-*")) and not list((stages / "b").glob("*.lock"))
    # a marker removed by hand (or an object-store upload that never got its marker): not complete, rebuilt
    (Path(out.table[2]["location"]) / MARKER).unlink()
    again = run_pipeline(load_pipeline(path), say=quiet)
    assert [r["action"] for r in again.table] == ["reused", "reused", "built", "reused"]


@pytest.mark.timeout(120)
def test_output_deleted_behind_its_marker_is_an_error(tmp_path, env, capsys):
    path = abc(tmp_path)
    out = run_pipeline(load_pipeline(path), say=quiet)
    gone = Path(out.table[1]["location"]) / "part-1.txt"
    gone.unlink()
    with pytest.raises(PipelineError, match=rf"stage 'b': output {gone} is listed in its completion marker but "
                                            rf"does not exist .*--force b"):
        plan_pipeline(load_pipeline(path))
    assert cli(["pipeline", str(path)]) == 2
    assert f"output {gone} is listed" in capsys.readouterr().err
    fixed = run_pipeline(load_pipeline(path), force=["b"], say=quiet)
    assert gone.exists() and fixed.table[1]["action"] == "built"


def test_fsspec_store_publishes_the_marker_last():
    """The object-store code path (no rename): files uploaded under the key, the marker last."""
    store = FsspecStore(f"memory://medvl-test-{os.getpid()}/stages")
    local = Path(__import__("tempfile").mkdtemp())
    (local / "sub").mkdir()
    (local / "x.bin").write_bytes(b"12345")
    (local / "sub" / "y.txt").write_text("hi")
    assert store.read_marker("s", "k1") is None
    files = store.upload("s", "k1", local)
    assert files == {"sub/y.txt": 2, "x.bin": 5}
    assert store.read_marker("s", "k1") is None and store.partial("s", "k1"), "no marker: half-written"
    m = store.publish("s", "k1", {"key": "k1", "build_id": "b1", "created": 1.0}, files)
    assert store.read_marker("s", "k1")["files"] == files and not store.partial("s", "k1")
    store.verify("s", "k1", m)
    got = store.local_path("s", "k1", m)  # a reader's local copy
    assert (got / "x.bin").read_bytes() == b"12345" and (got / "sub" / "y.txt").read_text() == "hi"
    assert [h["key"] for h in store.history("s")] == ["k1"]
    store.fs.rm(store._p("s", "k1", "x.bin"))
    with pytest.raises(PipelineError, match=r"output memory://.*/s/k1/x\.bin is listed in its completion marker"):
        store.verify("s", "k1", m)
    store.unpublish("s", "k1")
    assert store.read_marker("s", "k1") is None and not store.partial("s", "k1")
    shutil.rmtree(local)


# --------------------------------------------------------------------------- locks


def _hold(path: str, hold_s: float, out: str) -> None:
    with FileLock(path, "test holder", stale_s=30, poll_s=0.05):
        t0 = time.time()
        time.sleep(hold_s)
        with open(out, "a") as f:
            f.write(f"{os.getpid()} {t0} {time.time()}\n")


@pytest.mark.timeout(120)
def test_file_lock_excludes_other_processes_and_breaks_stale_locks(tmp_path):
    lock = tmp_path / "k.lock"
    spans = tmp_path / "spans"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hold, args=(str(lock), 1.0, str(spans))) for _ in range(3)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(90)
        assert pr.exitcode == 0
    rows = sorted(tuple(map(float, line.split()[1:])) for line in spans.read_text().splitlines())
    assert len(rows) == 3
    assert all(b[0] >= a[1] - 1e-3 for a, b in zip(rows, rows[1:])), f"overlapping holders: {rows}"
    assert not lock.exists()

    # a holder on this host whose process is gone: broken at once
    dead = ctx.Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    from medvl.pipelines.locks import BOOT, HOST
    lock.write_text(json.dumps({"host": HOST, "boot_id": BOOT, "pid": dead.pid, "owner": "x", "started": 0}))
    t0 = time.time()
    with FileLock(lock, "me", stale_s=600) as fl:
        assert time.time() - t0 < 5 and "is gone" in (fl.broke_stale or "")
    # a holder elsewhere that stopped sending heartbeats: broken after stale_lock_s
    lock.write_text(json.dumps({"host": "other-node", "pid": 1, "owner": "y", "started": 0}))
    os.utime(lock, (time.time() - 100, time.time() - 100))
    with FileLock(lock, "me", stale_s=30) as fl:
        assert "no heartbeat for" in fl.broke_stale and "other-node" in fl.broke_stale
    # a live holder elsewhere: wait, then give up after wait_timeout_s naming it
    lock.write_text(json.dumps({"host": "other-node", "pid": 1, "owner": "z", "started": time.time()}))
    waited = []
    with pytest.raises(LockTimeout, match=r"waited 1s for .*pid 1 on other-node"):
        FileLock(lock, "me", stale_s=30, timeout_s=1, poll_s=0.1, on_wait=waited.append).acquire()
    assert waited and waited[0]["owner"] == "z"


# --------------------------------------------------------------------------- on a real local Ray cluster


@pytest.mark.timeout(240)
def test_task_stages_run_as_ray_tasks(tmp_path, env, ray_local):
    path = abc(tmp_path, kind_a="test_task")
    out = run_pipeline(load_pipeline(path), say=quiet)
    assert [r["action"] for r in out.table] == ["built"] * 4
    pids = {b["stage"]: b["pid"] for b in builds(str(tmp_path / "builds.log"))}
    assert pids["a"] != os.getpid() and pids["b"] == os.getpid()  # a ran in a Ray worker, b in this process
    assert out.metrics["c/value"] == 112


def _spawn(path: Path, extra_env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medvl.cli", "pipeline", str(path)], env={**os.environ, **extra_env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("lock", ["file", "ray"])
def test_two_concurrent_runs_build_a_shared_stage_once(tmp_path, tracking, ray_local, lock):
    """Two `medvl pipeline` processes on one real local Ray cluster need the same keys: each key is built once,
    the other process waits for it and reuses it. `file`: O_EXCL lock files in a local cache; `ray`: the named lock
    actor, with the cache behind an fsspec URI (the object-store code path: upload, then the marker)."""
    root = tmp_path / "runs"
    top = {"cache": {"lock": "ray", "root": f"file://{tmp_path / 'store'}"}} if lock == "ray" else {}
    path = abc(tmp_path, kind_a="test_task", sleep_a=8, **top)
    gcs = ray_local.get_runtime_context().gcs_address
    envs = {"RAY_ADDRESS": gcs, "MEDVL_RUN_ROOT": str(root), "MLFLOW_TRACKING_URI": tracking}
    procs = [_spawn(path, envs), _spawn(path, envs)]
    outs = [pr.communicate(timeout=360)[0] for pr in procs]
    for pr, out in zip(procs, outs):
        assert pr.returncode == 0, out[-3000:]
    log = builds(str(tmp_path / "builds.log"))
    assert count(tmp_path / "builds.log") == {"a": 1, "b": 1, "c": 1, "d": 1}, log
    waited = [o for o in outs if "[a] waiting: pipeline run 't' (stage a)" in o]
    assert len(waited) == 1, "one run must have waited for the other's build of a"
    assert "[a] reused" in waited[0] and "built by another run while this one waited" in waited[0]
    if lock == "ray":
        done = list((tmp_path / "store" / "a").glob(f"*/{MARKER}"))
        assert len(done) == 1


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_pipeline_sweep_trials_share_their_first_stage(tmp_path, env, tracking, ray_local):
    """`medvl tune` over a pipeline: 3 trials search b.value; a (a Ray task, 4 s) has the same key in all of them
    and is built once, b is built per trial; the objective is a stage metric."""
    from mlflow.tracking import MlflowClient

    from medvl.tune.spec import load_sweep
    from medvl.tune.sweep import run_sweep
    log = str(tmp_path / "builds.log")
    write(tmp_path / "pipe.yaml", {"a": {"kind": "test_task", "value": 1, "log": log, "sleep_s": 4},
                                   "b": {"kind": "test_write", "inputs": {"src": "a"}, "value": 0, "log": log}},
          track={"experiment": "pipe-sweep"})
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "psweep", "base": "pipe.yaml", "search_space": {"b.value": {"type": "uniform", "low": 0, "high": 1}},
        "metric": "b/value", "mode": "max", "num_samples": 3, "scheduler": {"kind": "none"},
        "truth": "b/files",  # the proxy check's plumbing (CLISC: seg_eval/unet_s3f/dice beside agreement)
        "resources": {"driver_cpus": 1}}))
    out = run_sweep(load_sweep(tmp_path / "sweep.yaml"), verbose=0)
    assert out.complete and out.max_concurrent_trials == 2  # 4 CPUs, 2 per trial (driver + a's task)
    assert count(Path(log)) == {"a": 1, "b": 3}
    df = out.table
    assert list(df["tune_status"]) == ["TERMINATED"] * 3
    # resources.reuse_actors (default): 3 trials, 2 at a time: the third ran in a finished trial's Tune actor
    assert df["trial_pid"].notna().all() and df["trial_pid"].nunique() == 2, list(df["trial_pid"])
    assert all(abs(v - (1 + x)) < 1e-9 for v, x in zip(df["b/value"], df["b.value"]))
    assert out.best["b/value"] == df["b/value"].max()
    c = MlflowClient(tracking)
    for run_id in df["mlflow_run_id"]:  # each trial's run is a pipeline run with its stages nested under it
        trial = c.get_run(run_id)
        assert trial.data.tags["medvl.kind"] == "pipeline"
        assert trial.data.tags["mlflow.parentRunId"] == out.parent_run_id
    stage_runs = c.search_runs([c.get_run(out.parent_run_id).info.experiment_id],
                               filter_string="tags.`medvl.stage` = 'a'")
    assert sorted(r.data.tags["medvl.reused"] for r in stage_runs) == ["false", "true", "true"]
    # `truth`: a column of the trials table, the proxy check and its scatter on the parent run
    parent = c.get_run(out.parent_run_id)
    assert "b/files" in df and parent.data.metrics["proxy/trials"] == 3
    assert parent.data.metrics["proxy/truth_of_best"] == df.loc[df["b/value"].idxmax(), "b/files"]
    assert "sweep/proxy_vs_truth.png" in {a.path for a in c.list_artifacts(out.parent_run_id, "sweep")}


@pytest.mark.timeout(120)
def test_submit_plans_pipelines_and_pipeline_sweeps(tmp_path, digits_corpus, monkeypatch):
    """What `medvl submit` would send (no cluster): `medvl pipeline` with --only/--force, stage paths re-mapped."""
    import shlex

    from medvl.submit import plan_job
    monkeypatch.chdir(ROOT)
    plan = plan_job("jobs/pipeline_digits_probe.yaml", ["probe.C=0.5"], environ={}, submission_id="p1",
                    pipeline_args=["--force", "probe"])
    assert plan.kind == "pipeline" and plan.name == "digits-probe"
    # runs/ is not uploaded: the train stage's corpus (a relative path in jobs/digits_clip.yaml) goes absolute
    assert shlex.split(plan.command) == ["python", "-m", "medvl.cli", "pipeline", "jobs/pipeline_digits_probe.yaml",
                                         "probe.C=0.5", f"clip.data.corpus={ROOT / 'runs' / 'corpora' / 'digits'}",
                                         "--force", "probe"]
    from medvl.config import ConfigError
    with pytest.raises(ConfigError, match=r"--only nope: no stage named 'nope'"):
        plan_job("jobs/pipeline_digits_probe.yaml", [], environ={}, pipeline_args=["--only", "nope"])
    with pytest.raises(PipelineError, match=r"unknown key probe\.Cc"):
        plan_job("jobs/pipeline_digits_probe.yaml", ["probe.Cc=1"], environ={})
    with pytest.raises(ConfigError, match=r"--only / --force apply to pipeline recipes"):
        plan_job("jobs/digits_clip.yaml", [], environ={}, pipeline_args=["--force", "x"])
    # a sweep over the pipeline: validated against the pipeline, stage paths as `<stage>.<key>` overrides
    sweep = plan_job("jobs/sweep_pipeline_probe.yaml", [f"clip.data.corpus={digits_corpus}", "num_samples=2"],
                     environ={}, submission_id="s1")
    assert sweep.kind == "tune" and shlex.split(sweep.command)[3:] == [
        "tune", "jobs/sweep_pipeline_probe.yaml", f"clip.data.corpus={digits_corpus}", "num_samples=2"]
    # a pipeline outside the project is shipped with its stages' base files merged in
    (tmp_path / "base.yaml").write_text("value: 5\n")
    outside = write(tmp_path / "p.yaml", {"a": {"kind": "test_write", "base": "base.yaml", "files": 1}})
    staged = plan_job(str(outside), [], environ={}, submission_id="o1")
    shipped = yaml.safe_load(staged.runtime_env["env_vars"]["MEDVL_SUBMIT_RECIPE"])
    assert shipped["stages"]["a"]["value"] == 5 and "base" not in shipped["stages"]["a"]
    assert load_pipeline(data=shipped).stages["a"].stage.config.value == 5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_submit_the_digits_pipeline_to_a_real_local_cluster(local_cluster, digits_corpus, tmp_path, monkeypatch,
                                                            capsys):
    """The small real pipeline end to end on a cluster, unchanged: CLIP trained on digits (Ray Train) -> both
    splits embedded (Ray Data actor pool) -> a linear probe (Ray task) that learns far beyond chance; MLflow has
    the parent run and its three stage runs; the outputs, on the run root the job was given, are then reused here."""
    from mlflow.tracking import MlflowClient

    from medvl.submit import submit_main
    db = tmp_path / "mlflow.db"
    run_root = tmp_path / "runs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MEDVL_RUN_ROOT", str(run_root))
    ov = [f"clip.data.corpus={digits_corpus}", "clip.train.epochs=1", "clip.train.max_steps=8",
          "clip.data.batch_size=32", "clip.data.decode_tasks=1"]
    rc = submit_main([str(DIGITS_PIPELINE), "--address", local_cluster, "--no-logs", *ov])
    out, err = capsys.readouterr()
    assert rc == 0, f"{out[-4000:]}\n{err[-4000:]}"

    c = MlflowClient(f"sqlite:///{db}")
    exp = c.get_experiment_by_name("medvl-pipelines")
    (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.`medvl.kind` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    acc, chance = parent.data.metrics["probe/accuracy"], parent.data.metrics["probe/chance"]
    assert acc > max(0.5, 3 * chance), (acc, chance)  # frozen features of a CLIP trained 8 steps: far from chance
    assert parent.data.metrics["embed/rows/val"] == 360 and parent.data.metrics["embed/rows/train"] == 1437
    stages = {r.data.tags["medvl.stage"]: r for r in
              c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(stages) == {"clip", "embed", "probe"}
    assert c.get_metric_history(stages["clip"].info.run_id, "train/loss"), "the train stage's run is the training run"
    assert stages["clip"].data.params["optim.lr"] == "0.001"
    # the outputs the job published on shared storage are complete: the same pipeline here reuses all three
    plans = plan_pipeline(load_pipeline(DIGITS_PIPELINE, ov))
    assert [pl.action for pl in plans.values()] == ["reuse"] * 3, {n: pl.reason for n, pl in plans.items()}
