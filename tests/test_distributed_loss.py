"""open_clip's ClipLoss(local_loss, gather_with_grad) over 2 real Ray Train workers (gloo) equals the loss and
gradients of one process on the concatenated batch."""
import pytest
import torch

from medvl.config import LossConfig, ModelConfig, OptimConfig
from medvl.losses import build_loss, compute_loss
from medvl.models.factory import create_model
from medvl.train.optim import build_optimizer

MODEL = ModelConfig(name="test-vit-micro")


def _batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 400, (n, 16), generator=g)


def _model():
    torch.manual_seed(0)
    return create_model(MODEL)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(config):
    import ray.train
    import ray.train.torch
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    device = ray.train.torch.get_device()  # the CPU here (gloo); a GPU under use_gpu (NCCL, tests/test_gpu.py)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 math, as on the CPU
    model = ray.train.torch.prepare_model(_model())  # moves the model to `device`
    images, texts = (x.to(device) for x in _batch())
    half = len(images) // world
    sl = slice(rank * half, (rank + 1) * half)
    loss_fn = build_loss(LossConfig(kind="clip", local_loss=config["local"], gather_with_grad=True), rank, world)
    loss = compute_loss(loss_fn, model(images[sl], texts[sl]))
    loss.backward()  # DDP all-reduces (averages) the gradients
    grads = {n: g.cpu() for n, g in _grads(model.module if hasattr(model, "module") else model).items()}
    torch.save({"loss": loss.item(), "grads": grads, "device": str(device)},
               f"{config['out']}/rank{rank}.pt")
    ray.train.report({"loss": loss.item()})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("local", [True, False])
def test_two_worker_gathered_loss_equals_full_batch(ray_local, tmp_path, local):
    import ray.train
    from ray.train.torch import TorchTrainer
    TorchTrainer(_worker, train_loop_config={"out": str(tmp_path), "local": local},
                 scaling_config=ray.train.ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="gather")).fit()
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")

    ref = _model()
    images, texts = _batch()
    full = compute_loss(build_loss(LossConfig(kind="clip")), ref(images, texts))
    full.backward()
    ref_grads = _grads(ref)

    assert (r0["loss"] + r1["loss"]) / 2 == pytest.approx(full.item(), rel=1e-5)
    assert set(r0["grads"]) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(r0["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(r1["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_weight_decay_groups_exclude_norms_biases_logit_scale():
    model = _model()
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    no_decay, decay = opt.param_groups
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.1
    ids = {id(p) for p in decay["params"]}
    named = dict(model.named_parameters())
    assert id(named["logit_scale"]) not in ids
    assert all(id(p) not in ids for n, p in named.items() if p.ndim < 2 or "ln" in n)
    assert id(named["visual.conv1.weight"]) in ids
