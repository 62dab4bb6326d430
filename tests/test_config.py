import glob
import platform as std_platform
from pathlib import Path

import pytest

from medvl.config import ConfigError, Recipe, RuntimeConfig, apply_overrides, flatten, load_recipe, parse_override, \
    peek_runtime, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_platform_folder_is_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert std_platform.system()  # the standard library module, not our source folder


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_named(tmp_path):
    p = _write(tmp_path, "data: {corpus: x}\noptim: {lr: 1e-3, lrr: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown key optim\.lrr"):
        load_recipe(p)


def test_wrong_type_is_named(tmp_path):
    p = _write(tmp_path, "data: {corpus: x, batch_size: many}\n")
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected an integer"):
        load_recipe(p)
    p = _write(tmp_path, "data: {corpus: x}\nloss: {kind: triplet}\n")
    with pytest.raises(ConfigError, match=r"loss\.kind: must be one of"):
        load_recipe(p)


def test_overrides_parse_and_validate(tmp_path):
    p = _write(tmp_path, "data: {corpus: x}\n")
    r = load_recipe(p, ["optim.lr=3e-4", "train.num_workers=4", "data.batch_size=128", "eval.templates=['a {}']"])
    assert r.optim.lr == 3e-4 and r.train.num_workers == 4 and r.eval.templates == ["a {}"]
    with pytest.raises(ConfigError, match=r"unknown key optim\.learning_rate"):
        load_recipe(p, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="divisible"):
        load_recipe(p, ["data.batch_size=63"])
    assert load_recipe(p, ["train.num_workers=1", "train.launch=in_process"]).train.launch == "in_process"
    with pytest.raises(ConfigError, match=r"train\.launch: in_process .* needs train\.num_workers: 1 \(got 2\)"):
        load_recipe(p, ["train.launch=in_process"])
    with pytest.raises(ConfigError, match=r"train\.launch: must be one of"):
        load_recipe(p, ["train.launch=local"])


def test_peek_runtime_reads_only_the_runtime_section(tmp_path):
    """`medvl train` starts Ray from the recipe's runtime section while the rest loads (medvl.train.cli): the
    section and its `runtime.*` overrides as `load_recipe` reads them, other keys (even wrong ones) ignored, None
    when the section itself is wrong (load_recipe then reports it)."""
    p = _write(tmp_path, "data: {corpus: x}\nruntime: {num_cpus: 3, ray_address: 'ray://h:10001'}\noptim: {lrr: 2}\n")
    assert peek_runtime(p, ["runtime.num_cpus=6", "optim.lr=1e-3", "nonsense"]) == RuntimeConfig(
        num_cpus=6, ray_address="ray://h:10001")
    assert peek_runtime(_write(tmp_path, "data: {corpus: x}\n")) == RuntimeConfig()
    full = load_recipe(_write(tmp_path, "data: {corpus: x}\nruntime: {num_cpus: 3}\n"), ["runtime.run_root=/r"])
    assert peek_runtime(tmp_path / "r.yaml", ["runtime.run_root=/r"]) == full.runtime
    assert peek_runtime(_write(tmp_path, "runtime: {num_cpus: many}\n")) is None
    assert peek_runtime(_write(tmp_path, "runtime: {cpus: 2}\n")) is None
    assert peek_runtime(tmp_path / "missing.yaml") is None
    assert peek_runtime(data={"runtime": {"num_cpus": 3}}, overrides=["runtime.num_cpus=5"]).num_cpus == 5


def test_recipes_pipelines_and_sweeps_parse_overrides_alike(tmp_path):
    """One parser (`medvl.config.parse_override`) for every command's `key=value` overrides: YAML values, an
    empty value is "", the first "=" splits, and a missing "=" is an error worded for the command."""
    from medvl.pipelines.recipe import _parse_overrides
    from medvl.tune.spec import SweepError, apply_sweep_overrides
    assert parse_override(" optim.lr =0.001") == ("optim.lr", 0.001)
    assert parse_override("name=") == ("name", "")
    assert parse_override("track.experiment=a=b") == ("track.experiment", "a=b")
    assert parse_override("data.corpus=[1, 2]") == ("data.corpus", [1, 2])
    assert peek_runtime(data={}, overrides=["runtime.num_cpus=4", "runtime"]) == RuntimeConfig(num_cpus=4)
    assert apply_overrides({}, ["optim.lr=0.5"])["optim"]["lr"] == 0.5
    assert apply_sweep_overrides({}, ["num_samples=3", "optim.lr=0.5"]) == {
        "num_samples": 3, "overrides": {"optim.lr": 0.5}}
    with pytest.raises(ConfigError, match=r"override 'optim\.lr' must look like key\.sub=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"must look like <stage>\.<key>=value or <section>\.<key>=value"):
        _parse_overrides(["train.epochs"])
    with pytest.raises(SweepError, match=r"override 'num_samples' must look like key=value or key\.sub=value"):
        apply_sweep_overrides({}, ["num_samples"])


def test_round_trip_dict_flat():
    r = Recipe()
    r.data.corpus = "x"
    d = to_dict(r)
    assert load_recipe(data=d) == r
    flat = flatten(d)
    assert flat["optim.lr"] == r.optim.lr
    assert apply_overrides(d, {"optim.lr": 0.5})["optim"]["lr"] == 0.5


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "jobs" / "*.yaml"))))
def test_every_job_recipe_loads(path, request):
    import yaml
    raw = yaml.safe_load(Path(path).read_text())
    if "search_space" in raw:
        # a sweep spec: its search space and objective are checked against its base recipe, whose corpus must
        # exist (the objective depends on the corpus having labels): the real digits corpus, ingested here
        from medvl.tune.spec import load_sweep, validate_sweep
        corpus = request.getfixturevalue("digits_corpus")
        r = validate_sweep(load_sweep(path, corpus_overrides(path, corpus)))
        assert r.name
        return
    if "stages" in raw:  # a pipeline: every stage's config validated against its kind; its train stages' corpora
        from medvl.pipelines import load_pipeline, plan_pipeline
        corpus = request.getfixturevalue("digits_corpus")
        extra = local_data_overrides(raw, request.getfixturevalue("tmp_path"))
        p = load_pipeline(path, corpus_overrides(path, corpus) + extra)
        assert p.name and p.stages
        plan_pipeline(p)  # fingerprints every input: the corpus exists, the graph plans
        return
    r = load_recipe(path)
    assert r.name and r.data.corpus


def local_data_overrides(raw: dict, tmp: Path) -> list[str]:
    """Pipeline stages reading local data a CI machine lacks (CLISC's `cases` folder, CLIP and SAM checkpoints):
    pointed at a one-case BraTS-style folder / a stand-in file written here (the plan only fingerprints them)."""
    import nibabel as nib
    import numpy as np
    out = []
    for n, e in (raw.get("stages") or {}).items():
        for key in ("cases", "clip_model"):
            if key in e:
                case = tmp / "cases" / "Case_000"
                if not case.is_dir():
                    case.mkdir(parents=True)
                    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)),
                             str(case / "Case_000_flair.nii.gz"))
                out.append(f"{n}.{key}={tmp / 'cases'}")
        if (e.get("segmenter") or {}).get("checkpoint"):  # a SAM checkpoint file (CLISC part 2): a stand-in
            ckpt = tmp / "sam_checkpoint.pth"
            ckpt.write_bytes(b"stand-in")
            out.append(f"{n}.segmenter.checkpoint={ckpt}")
    return out


def corpus_overrides(path: str, corpus: str) -> list[str]:
    """`data.corpus=<corpus>` for a recipe or a sweep over a recipe; `<stage>.data.corpus=...` for each train stage
    of a pipeline (or of a sweep's base pipeline)."""
    import yaml
    raw = yaml.safe_load(Path(path).read_text())
    target = raw
    if "search_space" in raw:
        base = Path(path).parent / raw["base"]
        target = yaml.safe_load(base.read_text()) if base.is_file() else {}
    if "stages" in target:  # train stages' data.corpus; other kinds' own `corpus` key (pair, subset), unless bound
        return ([f"{n}.data.corpus={corpus}" for n, e in target["stages"].items() if e.get("kind") == "train"]
                + [f"{n}.corpus={corpus}" for n, e in target["stages"].items()
                   if e.get("kind") != "train" and "corpus" in e and "corpus" not in (e.get("inputs") or {})])
    return [f"data.corpus={corpus}"]
