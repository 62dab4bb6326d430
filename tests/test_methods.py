"""The method seam: registry and method sections, the plug-in wrapper, the gather helper and gradient accumulation
(2 real Ray Train workers vs one process on the full batch), decoder determinism, retrieval ties."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

import medvl_test_plugins  # noqa: F401  (registers test_extra_term)
from medvl.config import ConfigError, OptimConfig, field_type, load_recipe, to_dict
from medvl.losses import Dist, contrastive_term
from medvl.methods import Method, register_method, resolve_method
from medvl.methods.clip import ClipDecoder
from medvl.train.optim import build_optimizer, build_scheduler
from medvl.train.step import StepSettings, train_step
from stepcheck import assert_accumulation_matches_full_batch, one_step

BASE = {"data": {"corpus": "x", "batch_size": 8}, "model": {"name": "test-vit-micro"}, "train": {"num_workers": 1},
        "optim": {"warmup_steps": 0, "grad_clip": None}}


def _recipe(**sections):
    return load_recipe(data={**BASE, "plugins": ["medvl_test_plugins"], **sections})


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "text": torch.randint(1, 400, (n, 16), generator=g)}


# --------------------------------------------------------------------------- registry and config


def test_registry_rejects_duplicate_names():
    class Another(Method):
        name = "clip"
    with pytest.raises(ValueError, match="already registered"):
        register_method(Another)


def test_unknown_method_and_foreign_sections_are_named():
    with pytest.raises(ConfigError, match="method: unknown method 'nope'"):
        load_recipe(data={**BASE, "method": "nope"})
    with pytest.raises(ConfigError, match=r"unknown key test_extra_term\.wieght"):
        _recipe(test_extra_term={"wieght": 1})
    with pytest.raises(ConfigError, match=r"test_extra_term\.weight: expected a number"):
        _recipe(test_extra_term={"weight": "heavy"})
    with pytest.raises(ConfigError, match=r"test_extra_term\.weight must be >= 0"):
        _recipe(test_extra_term={"weight": -1})
    with pytest.raises(ConfigError, match=r"plugins: cannot import 'no_such_module'"):
        load_recipe(data={**BASE, "plugins": ["no_such_module"]})


def test_method_section_round_trips_and_overrides():
    r = _recipe(test_extra_term={"weight": 0.25})
    assert r.test_extra_term.weight == 0.25
    d = to_dict(r)
    assert d["test_extra_term"] == {"enabled": True, "weight": 0.25, "hidden": 16}
    assert load_recipe(data=d) == r
    assert field_type("test_extra_term.weight") is float
    r2 = load_recipe(data=d, overrides=["test_extra_term.weight=2.0"])
    assert r2.test_extra_term.weight == 2.0


# --------------------------------------------------------------------------- the wrapper


def test_plugin_wraps_clip_adds_a_term_and_reaches_pre_projection_features():
    r = _recipe(test_extra_term={"weight": 0.5})
    m = resolve_method(r)
    assert m.describe() == "test_extra_term(clip)" and m.loss_terms() == ("aux",)
    from medvl.tune.spec import reported_metrics
    assert {"train/loss", "train/aux"} <= reported_metrics(load_recipe(data={**to_dict(r), "data": {
        **to_dict(r)["data"], "val_split": None}}))
    torch.manual_seed(0)
    model = m.build_model()
    base_params = {n for n, _ in model.inner.named_parameters()}
    opt = build_optimizer(model, OptimConfig(warmup_steps=0))
    sched = build_scheduler(opt, OptimConfig(warmup_steps=0), 10)
    out = m.forward(model, _batch())
    terms = m.loss(out)
    clip_only = m.inner.loss(out)["loss"]
    assert torch.allclose(terms["loss"], clip_only + 0.5 * terms["aux"])
    terms = train_step(m, model, _batch(), opt, sched, StepSettings(grad_clip=None))
    assert set(terms) == {"loss", "aux"} and all(torch.isfinite(v) for v in terms.values())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("head.") for n in grads)  # the extra head trains
    assert {n for n in grads if n.startswith("inner.")} <= {f"inner.{n}" for n in base_params}
    # the head sits before the projection: the trunk gets gradient from the aux term alone
    model.zero_grad()
    m.forward(model, _batch())["aux_image"].sum().backward()
    assert model.inner.clip.visual.conv1.weight.grad.abs().sum() > 0
    assert model.inner.clip.visual.proj.grad is None


def test_towers_reproduce_open_clip_encoders():
    model = resolve_method(load_recipe(data=BASE)).build_model().eval()
    t = model.towers
    b = _batch(4)
    torch.testing.assert_close(t.image_proj(t.image_pre(b["image"])), model.clip.encode_image(b["image"]))
    torch.testing.assert_close(t.text_proj(t.text_pre(b["text"])), model.clip.encode_text(b["text"]))
    assert t.image_pre(b["image"]).shape[-1] == t.image_width


# --------------------------------------------------------------------------- accumulation (1 process)




@pytest.mark.parametrize("plugin", [False, True])
def test_accumulation_matches_full_batch_step(plugin):
    """accum_freq=2 with output caching gives the loss and gradients of one full batch (every term)."""
    data = {**BASE, "plugins": ["medvl_test_plugins"], **({"test_extra_term": {}} if plugin else {})}
    assert_accumulation_matches_full_batch(data, _batch())


# --------------------------------------------------------------------------- 2 Ray Train workers


def _dist_worker(config):
    import ray.train
    import ray.train.torch

    from medvl.models.factory import unwrap
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    dist = Dist(rank, world)
    out = {}
    # (1) the gather helper on plain leaf tensors
    g = torch.Generator().manual_seed(3)
    a_full, b_full = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    sl = slice(rank * 4, (rank + 1) * 4)
    a = torch.nn.functional.normalize(a_full[sl], dim=-1).requires_grad_()
    b = torch.nn.functional.normalize(b_full[sl], dim=-1).requires_grad_()
    loss = contrastive_term(a, b, torch.tensor(5.0), dist)
    loss.backward()
    out["helper"] = (loss.item(), a.grad, b.grad)
    # (2) one accumulated optimizer step per method, DDP over 2 workers, each on its half of the batch
    for name, data in config["recipes"].items():
        torch.manual_seed(0)
        r = load_recipe(data=data)
        m = resolve_method(r)
        m.bind(dist, torch.device("cpu"))
        model = ray.train.torch.prepare_model(m.build_model())
        opt = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0))
        sched = build_scheduler(opt, OptimConfig(warmup_steps=0), 10)
        batch = {k: v[sl] for k, v in _batch().items()}
        terms = train_step(m, model, batch, opt, sched, StepSettings(accum_freq=2, grad_clip=None))
        um = unwrap(model)
        out[name] = ({k: float(v) for k, v in terms.items()},
                     {n: p.grad.clone() for n, p in um.named_parameters() if p.grad is not None},
                     {n: p.detach().clone() for n, p in um.named_parameters()})
    torch.save(out, f"{config['out']}/rank{rank}.pt")
    ray.train.report({"done": 1})


@pytest.mark.timeout(300)
def test_two_workers_gather_helper_and_accumulation_equal_one_process(ray_local, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer
    recipes = {"clip": BASE, "plugin": {**BASE, "plugins": ["medvl_test_plugins"], "test_extra_term": {}}}
    TorchTrainer(_dist_worker, train_loop_config={"out": str(tmp_path), "recipes": recipes},
                 scaling_config=ray.train.ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="seam")).fit()
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2)]

    # gather helper == one process on the concatenated batch (loss mean over ranks, grads of each half)
    g = torch.Generator().manual_seed(3)
    a_full, b_full = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    a = torch.nn.functional.normalize(a_full, dim=-1).requires_grad_()
    b = torch.nn.functional.normalize(b_full, dim=-1).requires_grad_()
    full = contrastive_term(a, b, torch.tensor(5.0))
    full.backward()
    assert (ranks[0]["helper"][0] + ranks[1]["helper"][0]) / 2 == pytest.approx(full.item(), rel=1e-5)
    for r in range(2):  # each rank's local gradient = its rows of the full gradient, x world size (DDP averages)
        torch.testing.assert_close(ranks[r]["helper"][1] / 2, a.grad[r * 4:(r + 1) * 4], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ranks[r]["helper"][2] / 2, b.grad[r * 4:(r + 1) * 4], rtol=1e-4, atol=1e-6)

    for name, data in recipes.items():
        terms, grads = one_step(data, 1, _batch())
        for r in range(2):
            got_terms, got_grads, got_w = ranks[r][name]
            assert got_terms.keys() == {k: 0 for k in terms}.keys()
            assert set(got_grads) == set(grads), name
            for k in grads:
                torch.testing.assert_close(got_grads[k], grads[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {k}: {m}")
        # losses: the mean over ranks of each rank's local loss = the full-batch loss
        for k in terms:
            assert (ranks[0][name][0][k] + ranks[1][name][0][k]) / 2 == pytest.approx(float(terms[k]), rel=1e-5)
        # and both ranks took the same optimizer step
        for k in ranks[0][name][2]:
            torch.testing.assert_close(ranks[0][name][2][k], ranks[1][name][2][k], msg=k)


# --------------------------------------------------------------------------- decoder determinism

_DECODE_SNIPPET = """
import sys, hashlib, numpy as np
from dataclasses import asdict
from medvl.config import ModelConfig
from medvl.data.corpus import iter_rows, shard_paths
from medvl.data.decode import decode_rows
from medvl.methods.clip import ClipDecoder
corpus, epoch = sys.argv[1], int(sys.argv[2])
rows = list(iter_rows(shard_paths(corpus, "train"), columns=["sample_id", "image", "image_uri", "texts"]))[:48]
batch = {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}
dec = ClipDecoder(asdict(ModelConfig(name="test-vit-micro")), train=True)
out = decode_rows(dec, batch, seed=7, epoch=epoch)
print(hashlib.sha256(out["image"].tobytes()).hexdigest(), hashlib.sha256(out["text"].tobytes()).hexdigest())
"""


def test_decoder_randomness_is_a_function_of_seed_epoch_and_sample(digits_corpus):
    def run(epoch):
        return subprocess.run([sys.executable, "-c", _DECODE_SNIPPET, digits_corpus, str(epoch)],
                              capture_output=True, text=True, check=True).stdout.split()
    a, b, c = run(0), run(0), run(1)
    assert a == b  # two processes, same seed and epoch: identical images and captions
    assert a[0] != c[0] and a[1] != c[1]  # another epoch: other crops, other caption picks


def test_decoded_images_are_uint8_and_normalise_like_torchvision(digits_corpus):
    from medvl.config import ModelConfig
    from medvl.data.corpus import iter_rows, shard_paths
    from medvl.data.decode import normalize_images, open_image
    from medvl.models.factory import image_norm, image_transforms
    cfg = ModelConfig(name="digits-vit-tiny")
    row = next(iter_rows(shard_paths(digits_corpus, "val")))
    dec = ClipDecoder(asdict(cfg), train=False)
    dec.setup()
    u8 = dec.image(row)
    assert u8.dtype == np.uint8 and u8.shape == (3, 32, 32)
    ref = image_transforms(cfg)[1](open_image(row))  # open_clip's eval transform, float path
    got = normalize_images(torch.from_numpy(u8)[None], *image_norm(cfg))[0]
    assert torch.equal(got, ref)


# --------------------------------------------------------------------------- retrieval ties


def test_retrieval_ties_count_against_the_model():
    from medvl.eval.retrieval import retrieval_metrics
    ids = torch.tensor([0, 1, 2, 3, 0])
    collapsed = retrieval_metrics(torch.ones(5, 4) / 2, torch.ones(4, 4) / 2, ids, [1, 4])
    assert collapsed["val/i2t_r1"] == 0 and collapsed["val/t2i_r1"] == 0
    assert collapsed["val/i2t_r4"] == 1  # last place among 4 captions is within the top 4
    eye = torch.eye(4)
    perfect = retrieval_metrics(eye[ids], eye, ids, [1])
    assert perfect["val/i2t_r1"] == 1 and perfect["val/t2i_r1"] == 1


# --------------------------------------------------------------------------- the comparison command


def _write_recipe(tmp_path, name, corpus, **extra):
    import yaml
    d = {"name": name, "data": {"corpus": corpus, "batch_size": 32}, "model": {"name": "test-vit-micro"},
         "train": {"epochs": 1, "max_steps": 6, "num_workers": 1, "log_every": 2, "ckpt_every": 100},
         "eval": {"templates": ["a photo of the digit {}."], "max_rows": 64}, "track": {"experiment": "tests-compare"}}
    for k, v in extra.items():
        sect, key = k.split("__")
        d.setdefault(sect, {})[key] = v
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def test_compare_refuses_different_budgets(tmp_path):
    from medvl.train.compare import plan
    a = _write_recipe(tmp_path, "a", "x")
    b = _write_recipe(tmp_path, "b", "x", train__seed=3, train__max_steps=9)
    with pytest.raises(ConfigError, match=r"train\.max_steps \(6 vs 9\); train\.seed \(0 vs 3\)"):
        plan(a, b, [], [], [], None, ("a", "b"))
    with pytest.raises(ConfigError, match="itself"):
        plan(a, None, [], [], [], None, ("a", "b"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_trains_both_sides_nested_under_one_parent(ray_local, digits_corpus, run_root, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from medvl.cli import main
    from medvl.track import runs
    a = _write_recipe(tmp_path, "plain", digits_corpus)
    assert main(["compare", a, "--b", "plugins=[medvl_test_plugins]", "--b", "test_extra_term.weight=0.5",
                 "--label-a", "clip", "--label-b", "extra", "--name", "cmp"]) == 0
    out = capsys.readouterr().out
    assert "| val/zero_shot_accuracy |" in out and "| metric | clip | extra |" in out
    client = MlflowClient(runs.tracking_uri(load_recipe(a)))
    exp = client.get_experiment_by_name("tests-compare").experiment_id
    parent = client.search_runs([exp], filter_string="tags.`medvl.kind` = 'comparison'")[0]
    kids = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(k.info.run_name for k in kids) == ["cmp-clip", "cmp-extra"]
    assert all(k.data.metrics["step"] == 6 if "step" in k.data.metrics else True for k in kids)
    extra = next(k for k in kids if k.info.run_name == "cmp-extra")
    assert "train/aux" in extra.data.metrics and extra.data.params["test_extra_term.weight"] == "0.5"
    assert {"clip/val/zero_shot_accuracy", "extra/val/zero_shot_accuracy"} <= set(parent.data.metrics)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "compare")} == {"compare/table.csv",
                                                                                     "compare/table.md"}
