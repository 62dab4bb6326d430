"""CLIPin (`medvl.methods.clipin`): the EMA formula and schedule, no gradient into the target, L_inter / L_intra on a
hand-computed example, the checkpoint round trip against an uninterrupted run, the learnable-lambda clamp, config
errors, the second-view decoder, target equality (and one-process equivalence) on 2 Ray Train workers, and short
training runs over CLIP and CXR-CLIP with every term finite and logged.

    PYTHONPATH=$PWD/platform RAY_AUTH_MODE=disabled .venv/bin/python -m pytest -q tests/test_clipin.py
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import medvl_test_plugins  # noqa: F401  (registers test_image_only)
from medvl.config import ConfigError, OptimConfig, load_recipe
from medvl.data.decode import decode_rows
from medvl.losses import Dist
from medvl.methods import resolve_method
from medvl.methods.clipin import TwoViewDecoder, clipin_terms, ema_update
from medvl.train.optim import build_optimizer, build_scheduler
from medvl.train.step import StepSettings, train_step

ROOT = Path(__file__).resolve().parents[1]
BASE = {"method": "clip", "data": {"corpus": "x", "batch_size": 8}, "model": {"name": "test-vit-micro"},
        "train": {"num_workers": 1}, "optim": {"warmup_steps": 0, "grad_clip": None},
        "clipin": {"enabled": True, "nc_width": 64}}


def _recipe(**clipin) -> dict:
    return {**BASE, "clipin": {**BASE["clipin"], **clipin}}


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "image2": torch.randn(n, 3, 32, 32, generator=g),
            "text": torch.randint(1, 400, (n, 16), generator=g), "text2": torch.randint(1, 400, (n, 16), generator=g)}


def _setup(data, seed=0, lr=1e-3):
    torch.manual_seed(seed)
    m = resolve_method(load_recipe(data=data))
    model = m.build_model()
    opt = build_optimizer(model, OptimConfig(lr=lr, warmup_steps=0))
    sched = build_scheduler(opt, OptimConfig(warmup_steps=0), 100)
    return m, model, opt, sched


def _step(m, model, opt, sched, batch, accum=1):
    return train_step(m, model, {k: v.clone() for k, v in batch.items()}, opt, sched,
                      StepSettings(accum_freq=accum, grad_clip=None))


# --------------------------------------------------------------------------- EMA


def test_ema_formula_and_cosine_schedule():
    m, model, opt, sched = _setup(_recipe())
    target = m._ensure_target(model)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with torch.no_grad():  # move the online weights away from the target
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    online = {k: v.clone() for k, v in model.state_dict().items()}
    ema_update(target, model, 0.9)
    for name, mod in (("inner", target.inner), ("pre", target.pre), ("nc", target.nc)):
        for k, v in mod.named_parameters():
            want = 0.9 * before[f"{name}.{k}"] + 0.1 * online[f"{name}.{k}"]
            torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-7, msg=f"{name}.{k}")
        ob = dict(getattr(model, name).named_buffers())
        for k, v in mod.named_buffers():  # BatchNorm statistics (and masks): copied
            assert torch.equal(v, ob[k]), k
    # the trainer's hook: after_step applies the configured momentum
    before = {k: v.clone() for k, v in target.state_dict().items()}
    m.after_step(model)
    p = "inner.clip.visual.proj"
    torch.testing.assert_close(target.state_dict()[p], 0.95 * before[p] + 0.05 * model.state_dict()[p])
    # cosine: from m at step 0 to 1 at step K, (1 + m) / 2 half way
    mc = resolve_method(load_recipe(data=_recipe(momentum_schedule="cosine", momentum_steps=100)))
    assert mc.momentum(0) == pytest.approx(0.95) and mc.momentum(50) == pytest.approx(0.975)
    assert mc.momentum(100) == pytest.approx(1.0) and mc.momentum(500) == pytest.approx(1.0)


def test_no_gradient_reaches_the_target_and_it_moves_only_in_after_step():
    m, model, opt, sched = _setup(_recipe())
    b = _batch()
    out = m.forward(model, {k: v.clone() for k, v in b.items()})
    assert not out["clipin_z_image"].requires_grad and not out["clipin_z_text"].requires_grad
    assert out["clipin_p_inter_image"].requires_grad
    target = m.target
    assert all(not p.requires_grad for p in target.parameters())
    ids = {id(p) for p in target.parameters()}
    assert not ids & {id(p) for g in opt.param_groups for p in g["params"]}  # not optimised
    assert not ids & {id(p) for p in model.parameters()}  # not inside the (DDP-wrapped) module
    snap = {k: v.clone() for k, v in target.state_dict().items()}
    m.loss(out)["loss"].backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(torch.equal(v, snap[k]) for k, v in target.state_dict().items())  # forward/backward: unchanged
    _step(m, model, opt, sched, b, accum=2)  # accumulation runs forward twice per micro-batch: one EMA update
    assert m.steps == 1
    for k, v in target.inner.named_parameters():
        want = 0.95 * snap[f"inner.{k}"] + 0.05 * dict(model.inner.named_parameters())[k].detach()
        torch.testing.assert_close(v, want, msg=k)


# --------------------------------------------------------------------------- loss


def _at(*angles, r=1.0):
    return torch.tensor([[r * math.cos(a), r * math.sin(a)] for a in angles])


def test_inter_and_intra_on_a_hand_computed_example():
    """Two rows, 2-D vectors of arbitrary norms: cos = cos(angle difference).
    inter = 1/2 [mean_rows(2 - 2 cos(p_inter_image, z_text)) + mean_rows(2 - 2 cos(p_inter_text, z_image))]."""
    pi = math.pi
    out = {"clipin_p_inter_image": _at(0, 0, r=3.0), "clipin_z_text": _at(pi / 3, pi / 2, r=0.5),
           "clipin_p_inter_text": _at(0, pi, r=2.0), "clipin_z_image": _at(pi / 2, pi, r=7.0),
           "clipin_p_intra_image": _at(pi / 2, 0), "clipin_p_intra_text": _at(pi / 3, pi / 2)}
    # inter: image->text rows: cos 0.5, 0 -> (1 + 2)/2 = 1.5; text->image rows: cos 0, 1 -> (2 + 0)/2 = 1
    # intra: image rows vs z_image: cos 1, -1 -> (0 + 4)/2 = 2; text rows vs z_text: cos 1, 1 -> 0
    inter, intra = clipin_terms(out)
    assert float(inter) == pytest.approx((1.5 + 1.0) / 2, abs=1e-6)
    assert float(intra) == pytest.approx((2.0 + 0.0) / 2, abs=1e-6)
    # the total: L_inter + lambda_intra L_intra + lambda_clip L_clip, the method's loss under "contrastive"
    m = resolve_method(load_recipe(data=_recipe(lambda_intra=0.25, lambda_clip=3.0)))
    g = torch.Generator().manual_seed(0)
    feats = {"image_features": torch.nn.functional.normalize(torch.randn(2, 4, generator=g), dim=-1),
             "text_features": torch.nn.functional.normalize(torch.randn(2, 4, generator=g), dim=-1),
             "logit_scale": torch.tensor(10.0)}
    terms = m.loss({**out, **feats})
    clip = m.inner.loss(dict(feats))["loss"]
    assert float(terms["contrastive"]) == pytest.approx(float(clip))
    assert float(terms["loss"]) == pytest.approx(1.25 + 0.25 * 1.0 + 3.0 * float(clip), rel=1e-6)
    assert set(terms) == {"loss", "contrastive", "inter", "intra"} and m.loss_terms() == ("contrastive", "inter",
                                                                                          "intra")


def test_accumulation_matches_the_full_batch_for_clipin_terms():
    """Per-sample predictions/targets are feature_keys: the accumulated loss equals the full-batch loss (the
    predictor BatchNorm sees micro-batches, so gradients differ slightly, as for any BN under accumulation)."""
    m1, model1, o1, s1 = _setup(_recipe())
    m2, model2, o2, s2 = _setup(_recipe())
    t1 = _step(m1, model1, o1, s1, _batch(), accum=1)
    t2 = _step(m2, model2, o2, s2, _batch(), accum=2)
    assert set(t1) == set(t2) == {"loss", "contrastive", "inter", "intra"}
    assert float(t1["contrastive"]) == pytest.approx(float(t2["contrastive"]), rel=1e-5)


def test_clipin_step_under_cpu_bf16_autocast():
    """The GPU AMP path's dtypes on CPU: target branch, predictors and the global-batch BatchNorm under bf16."""
    from stepcheck import assert_bf16_autocast_step
    assert_bf16_autocast_step(_recipe(), _batch())


# --------------------------------------------------------------------------- checkpoint round trip


def test_checkpoint_round_trip_equals_an_uninterrupted_run(tmp_path):
    """k steps, checkpoint (medvl.train.checkpoint), restore into a fresh model + method (other random init), m more
    steps on the same fixed batches -> online and target weights identical to k + m uninterrupted steps."""
    from medvl.train.checkpoint import load_checkpoint, write_checkpoint
    k, n = 3, 3
    data = _recipe(learnable_lambdas=True)
    batches = [_batch(seed=10 + i) for i in range(k + n)]
    ma, model_a, oa, sa = _setup(data)
    for b in batches:
        _step(ma, model_a, oa, sa, b)
    mb, model_b, ob, sb = _setup(data)
    for b in batches[:k]:
        _step(mb, model_b, ob, sb, b)
    write_checkpoint(tmp_path / "ck", {"model": model_b.state_dict(), "optimizer": ob.state_dict(),
                                       "scheduler": sb.state_dict(), "method": mb.state_dict()}, {"step": k})
    mc, model_c, oc, sc = _setup(data, seed=123)
    state = load_checkpoint(tmp_path / "ck")
    model_c.load_state_dict(state["model"])
    oc.load_state_dict(state["optimizer"])
    sc.load_state_dict(state["scheduler"])
    mc.load_state_dict(state["method"])
    assert mc.steps == k and mc.synced
    for b in batches[k:]:
        _step(mc, model_c, oc, sc, b)
    for (na, pa), (nc, pc) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert na == nc and torch.equal(pa, pc), na
    for (na, pa), (nc, pc) in zip(ma.target.state_dict().items(), mc.target.state_dict().items()):
        assert na == nc and torch.equal(pa, pc), na
    assert ma.steps == mc.steps == k + n


# --------------------------------------------------------------------------- learnable lambdas


@pytest.mark.timeout(300)
def test_learnable_lambdas_stay_clamped_and_the_contrastive_term_stays_alive():
    """Descent only lowers a positive loss weight (the reference's drift to 0): 40 steps with a large lambda
    learning rate drive both lambdas onto the lower clamp, never below it, and lambda_clip * L_clip stays >= 10%
    of the total loss at every step."""
    lo = 0.5
    m, model, _, _ = _setup(_recipe(learnable_lambdas=True, lambda_range=[lo, 20.0]))
    lam = [model.lambda_intra, model.lambda_clip]
    rest = [p for p in model.parameters() if all(p is not q for q in lam)]
    opt = torch.optim.AdamW([{"params": rest, "lr": 1e-3}, {"params": lam, "lr": 0.05, "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    seen = []
    for i in range(40):  # fresh rows every step, as in training (the contrastive term cannot be memorised away)
        t = _step(m, model, opt, sched, _batch(seed=100 + i))
        li, lc = float(model.lambda_intra.detach()), float(model.lambda_clip.detach())
        assert li >= lo and lc >= lo, (i, li, lc)
        share = float(t["contrastive"]) * lc / float(t["loss"])
        seen.append((li, lc, share))
        assert math.isfinite(float(t["loss"])) and share >= 0.10, (i, seen[-1])
    assert seen[-1][0] == lo and seen[-1][1] == lo, seen[-5:]  # the clamp, not the init, holds them
    assert m.train_metrics(model)["train/clipin_lambda_clip"] == lo


# --------------------------------------------------------------------------- bad input


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"clipin: method 'test_image_only' has no contrastive image-text head"):
        resolve_method(load_recipe(data={**_recipe(), "method": "test_image_only",
                                         "plugins": ["medvl_test_plugins"]}))
    with pytest.raises(ConfigError, match=r"clipin\.nc_width: 8192 gives CLIPin heads of .*clipin\.max_head_ratio"):
        resolve_method(load_recipe(data=_recipe(nc_width=8192))).build_model()
    with pytest.raises(ConfigError, match=r"clipin\.nc_width must be >= 1"):
        load_recipe(data=_recipe(nc_width=0))
    with pytest.raises(ConfigError, match=r"clipin\.lambda_range"):
        load_recipe(data=_recipe(lambda_range=[2.0, 1.0]))
    with pytest.raises(ConfigError, match=r"clipin\.momentum must be in \[0, 1\)"):
        load_recipe(data=_recipe(momentum=1.0))
    with pytest.raises(ConfigError, match=r"clipin\.momentum_steps"):
        resolve_method(load_recipe(data=_recipe(momentum_schedule="cosine")))
    with pytest.raises(ConfigError, match=r"clipin: the model of method 'pmc_clip' .* offers no pre-projection"):
        resolve_method(load_recipe(data={**_recipe(), "method": "pmc_clip"})).build_model()


# --------------------------------------------------------------------------- the second view


def _png(seed: int) -> bytes:
    from PIL import Image
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_two_view_decoder_second_view_differs_and_is_reproducible():
    m = resolve_method(load_recipe(data=_recipe(text_views="second")))
    dec = m.decoder(train=True)
    assert isinstance(dec, TwoViewDecoder) and set(dec.output_dtypes()) == {"image", "image2", "text", "text2"}
    assert set(m.batch_dtypes()) == {"image", "image2", "text", "text2"}
    assert not isinstance(m.decoder(train=False), TwoViewDecoder)  # evaluation: the method's own decoder
    batch = {"sample_id": np.array(["a", "b"], dtype=object), "image": np.array([_png(0), _png(1)], dtype=object),
             "image_uri": np.array([None, None], dtype=object),
             "texts": np.array([np.array([f"caption {i} of a" for i in range(8)], dtype=object),
                                np.array(["only caption of b"], dtype=object)], dtype=object)}
    a = decode_rows(dec, batch, seed=0, epoch=0)
    b = decode_rows(dec, batch, seed=0, epoch=0)
    c = decode_rows(dec, batch, seed=0, epoch=1)
    assert a["image"].shape == a["image2"].shape and a["image2"].dtype == np.uint8
    for k in a:
        assert np.array_equal(a[k], b[k]), k  # reproducible per (seed, epoch, sample)
    assert not np.array_equal(a["image"], a["image2"])  # view 2 is another augmentation
    assert not np.array_equal(a["image2"], c["image2"])  # and a new one next epoch
    assert np.array_equal(a["text"][1], a["text2"][1])  # one caption: the same text
    # the image file is decoded once per row: only the augmentation runs twice
    import medvl.data.decode as decode_mod
    opened = []
    real = decode_mod._open_image
    try:
        decode_mod._open_image = lambda row: opened.append(row["sample_id"]) or real(row)
        d = decode_rows(dec, batch, seed=0, epoch=0)
    finally:
        decode_mod._open_image = real
    assert sorted(opened) == ["a", "b"] and all(np.array_equal(d[k], a[k]) for k in a)
    # cxr_clip already has two views: its own decoder is used
    mc = resolve_method(load_recipe(data={**_recipe(), "method": "cxr_clip"}))
    assert set(mc.batch_dtypes()) == {"image", "image2", "text", "text2"}


# --------------------------------------------------------------------------- 2 workers


def _dist_worker(config):
    import ray.train
    import ray.train.torch

    from medvl.models.factory import unwrap
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different initial weights per rank: DDP broadcasts rank 0's, the target follows
    m = resolve_method(load_recipe(data=config["recipe"]))
    m.bind(Dist(rank, world), torch.device("cpu"))
    model = ray.train.torch.prepare_model(m.build_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for i in range(config["steps"]):
        b = {k: v[rank * 4:(rank + 1) * 4] for k, v in _batch(seed=20 + i).items()}
        train_step(m, model, b, opt, sched, StepSettings(grad_clip=None))
    torch.save(({k: v.clone() for k, v in unwrap(model).state_dict().items()},
                {k: v.clone() for k, v in m.target.state_dict().items()}), f"{config['out']}/rank{rank}.pt")
    ray.train.report({"done": 1})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_workers_targets_bit_identical_and_equal_to_one_process(ray_local, tmp_path):
    """2 Ray Train workers (DDP, 4 rows each, global-batch BatchNorm in the heads), 4 steps: the target weights are
    bit-identical on both ranks, and online + target weights match one process on the 8 concatenated rows."""
    import ray.train
    from ray.train.torch import TorchTrainer
    steps = 4
    data = _recipe(learnable_lambdas=True)
    TorchTrainer(_dist_worker, train_loop_config={"out": str(tmp_path), "recipe": data, "steps": steps},
                 scaling_config=ray.train.ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="clipin")).fit()
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2))
    for k in r0[1]:
        assert torch.equal(r0[1][k], r1[1][k]), k
    for k in r0[0]:
        assert torch.equal(r0[0][k], r1[0][k]), k
    torch.manual_seed(0)
    m = resolve_method(load_recipe(data=data))
    model = m.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for i in range(steps):
        train_step(m, model, _batch(seed=20 + i), opt, sched, StepSettings(grad_clip=None))
    for got, want in ((r0[0], model.state_dict()), (r0[1], m.target.state_dict())):
        for k in want:
            if k.endswith("num_batches_tracked"):
                continue
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda s: f"{k}: {s}")


# --------------------------------------------------------------------------- composing with real recipes


def _short_run(recipe_file: str, corpus: str, name: str, *extra: str):
    from medvl.train.launcher import run_training
    r = load_recipe(ROOT / "jobs" / recipe_file, [
        f"data.corpus={corpus}", "train.max_steps=20", "train.num_workers=1", "train.log_every=4",
        "track.log_model=false", "eval.max_rows=120", "eval.linear_probe=true", "eval.probe_train_rows=200",
        "track.experiment=tests-clipin", f"track.run_name={name}", *extra])
    job, metrics = run_training(r)
    return job, metrics, resolve_method(r).metric_names()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("recipe,extra,terms", [
    ("clipin_digits.yaml", ("clipin.learnable_lambdas=true",), ()),
    ("cxr_clip_digits.yaml", ("clipin.enabled=true", "clipin.nc_width=512", "clipin.text_views=second",
                              "eval.every_epoch=false"), ("clip", "icl", "tcl")),
])
def test_composes_with_clip_and_cxr_clip(ray_local, digits_corpus, run_root, recipe, extra, terms):
    """20 steps (ending mid-epoch: one evaluation) through the real trainer (Ray Data stream, Ray Train worker,
    MLflow): every loss term (the method's own, CLIPin's, the total) finite and logged, the lambdas and momentum
    logged; over CLIP the evaluation reports exactly its metric names, online and target (cxr_clip's evaluation is
    left off to keep CI short)."""
    from mlflow.tracking import MlflowClient
    job, metrics, names = _short_run(recipe, digits_corpus, f"clipin-{recipe.split('.')[0]}", *extra)
    assert metrics["step"] == 20
    logged = MlflowClient(job.tracking_uri).get_run(job.mlflow_run_id).data.metrics
    for t in ("loss", "contrastive", "inter", "intra", *terms):
        assert math.isfinite(metrics[f"train/{t}"]) and math.isfinite(logged[f"train/{t}"]), (t, metrics)
    for k in ("train/clipin_lambda_intra", "train/clipin_lambda_clip", "train/clipin_momentum"):
        assert math.isfinite(logged[k]), (k, logged)
    if names:
        assert {"val/linear_probe_accuracy", "val/target_linear_probe_accuracy", "val/zero_shot_accuracy",
                "val/target_zero_shot_accuracy"} <= names
        assert {k for k in metrics if k.startswith("val/")} == names
        assert all(math.isfinite(metrics[n]) for n in names)
