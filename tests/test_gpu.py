"""The GPU paths, marked `gpu`: they run whenever a CUDA device is present (`./dev test -m gpu` runs only them) and
are skipped on a CPU-only machine such as CI's (the CPU tests cover the same code under gloo and CPU bf16 autocast:
tests/stepcheck.py, tests/test_distributed_loss.py).

- every method's step under CUDA AMP, bf16 and fp16 (+ the trainer's GradScaler), on a batch its own decoder made:
  finite, near the fp32 step, fp32 gradients;
- open_clip's gathered ClipLoss over Ray Train workers with NCCL equals one process on the concatenated batch
  (2 workers when the machine has 2 GPUs, else 1);
- a real training run on the GPU (Ray Train, bf16 autocast, pinned host batches copied with non_blocking) learns
  beyond chance, with Ray Train workers and in process (`train.launch: in_process`).
"""
from pathlib import Path

import pytest
import torch

from medvl.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU paths)")]
RECIPES = {"clip": "digits_clip.yaml", "cxr_clip": "cxr_clip_digits.yaml", "pmc_clip": "pmc_clip_digits.yaml",
           "clipin": "clipin_digits.yaml"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_method_step_under_cuda_amp(digits_corpus, name, precision):
    from stepcheck import assert_bf16_autocast_step

    from medvl.methods import resolve_method
    from medvl.methods.base import decoded_batch
    recipe = load_recipe(ROOT / "jobs" / RECIPES[name], [f"data.corpus={digits_corpus}", "data.batch_size=32"])
    batch = decoded_batch(resolve_method(recipe), digits_corpus, 32)
    assert_bf16_autocast_step(lambda: resolve_method(recipe), batch, precision=precision, device="cuda")


@pytest.mark.timeout(300)
def test_gathered_loss_over_nccl_equals_one_process(ray_local, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer
    from test_distributed_loss import _batch, _grads, _model, _worker

    from medvl.config import LossConfig
    from medvl.losses import build_loss, compute_loss
    world = min(2, torch.cuda.device_count())
    TorchTrainer(_worker, train_loop_config={"out": str(tmp_path), "local": True},
                 scaling_config=ray.train.ScalingConfig(num_workers=world, use_gpu=True),
                 run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="gather-nccl")).fit()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert all(r["device"].startswith("cuda") for r in ranks)
    ref = _model()
    images, texts = _batch()
    full = compute_loss(build_loss(LossConfig(kind="clip")), ref(images, texts))
    full.backward()
    ref_grads = _grads(ref)
    assert sum(r["loss"] for r in ranks) / world == pytest.approx(full.item(), rel=1e-4)
    for r in ranks:
        assert set(r["grads"]) == set(ref_grads)
        for name, g in ref_grads.items():  # GPU vs CPU kernels: a little looser than the gloo test
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("launch", ["workers", "in_process"])
def test_training_on_the_gpu_with_bf16_learns(digits_corpus, run_root, launch):
    """With Ray Train workers (2 when there are 2 GPUs), and in process (`train.launch: in_process`: the test's own
    process trains on cuda:0, medvl registers the checkpoints)."""
    from medvl.train.launcher import run_training
    workers = min(2, torch.cuda.device_count()) if launch == "workers" else 1
    recipe = load_recipe(ROOT / "jobs" / "digits_clip.yaml", [
        f"data.corpus={digits_corpus}", f"train.num_workers={workers}", "train.use_gpu=true",
        "train.precision=bf16", "train.epochs=6", "track.log_model=false", "track.experiment=tests-gpu",
        f"train.launch={launch}", f"name=gpu-bf16-{launch}"])
    job, metrics = run_training(recipe)
    assert metrics["step"] == job.total_steps
    assert metrics["val/zero_shot_accuracy"] > 0.5, metrics  # 10 classes: chance is 0.1
