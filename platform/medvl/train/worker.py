"""`train_fn_per_worker`: the only Ray-aware training code; everything per-step is plain PyTorch (step.py).

Numbered comments mark the Ray Train specifics, as in Ray's own examples.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from medvl.config import recipe_from_dict
from medvl.losses import Dist
from medvl.methods import resolve_method
from medvl.models.factory import unwrap
from medvl.track.runs import RankZeroLogger
from medvl.train.faults import ABORT_KEY, DATA_ENDED_KEY, NonFiniteGuard
from medvl.train.optim import build_optimizer, build_scheduler
from medvl.train.step import StepSettings, train_step

STATE_FILE = "state.pt"
POSITION_FILE = "position.json"


def _save_checkpoint(model, opt, sched, scaler, method, pos: dict) -> str:
    d = tempfile.mkdtemp(prefix="medvl-ckpt-")  # not TemporaryDirectory: Ray may upload asynchronously
    torch.save({"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "method": method.state_dict(), "method_name": method.describe(), **pos},
               os.path.join(d, STATE_FILE))
    with open(os.path.join(d, POSITION_FILE), "w") as f:
        json.dump(pos, f)
    return d


def train_fn_per_worker(config: dict[str, Any]) -> Optional[dict]:
    import ray.train
    import ray.train.torch

    recipe = recipe_from_dict(config["recipe"])
    t = recipe.train
    ctx = ray.train.get_context()  # [1] rank/world from Ray Train
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(t.torch_threads or t.cpus_per_worker)
    torch.manual_seed(t.seed + rank)
    device = ray.train.torch.get_device()  # [2] cuda:<local rank> or cpu

    method = resolve_method(recipe)
    method.bind(Dist(rank, world), device)
    model = method.build_model().to(device)
    opt = build_optimizer(model, recipe.optim)
    total_steps = config["total_steps"]
    sched = build_scheduler(opt, recipe.optim, total_steps)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and t.precision == "fp16" else None
    pos = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "nonfinite_steps": 0}

    ckpt = ray.train.get_checkpoint()  # [3] latest reported checkpoint after a restart / re-run
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        method.load_state_dict(state.get("method") or {})
        pos = {k: state.get(k, v) for k, v in pos.items()}
    resumed_from = pos["step"]
    if rank == 0:
        print(f"medvl: {'resuming from checkpoint at step ' + str(resumed_from) if ckpt else 'starting fresh'} "
              f"(epoch {pos['epoch']}, batch {pos['batch_in_epoch']}), {total_steps} steps in all", flush=True)

    model = ray.train.torch.prepare_model(model)  # [4] DDP (gloo on CPU, nccl on GPU); no-op for 1 worker
    s = StepSettings(recipe.optim.accum_freq, recipe.optim.grad_clip, t.precision, device.type)
    logger = RankZeroLogger(config.get("mlflow_uri"), config.get("mlflow_run_id"), enabled=rank == 0,
                            journal=config.get("metrics_journal"))
    guard = NonFiniteGuard(t.max_nonfinite_steps, pos["nonfinite_steps"])  # [faults] NaN/inf steps, all ranks
    counter = _counter(config)
    evaluate = method.evaluator() if rank == 0 else None
    if rank == 0 and resumed_from:
        logger.log({"train/resumed_from_step": resumed_from}, step=resumed_from)

    steps_per_epoch = config["steps_per_epoch"]
    per_worker_batch = recipe.data.batch_size // world
    shard = ray.train.get_dataset_shard("train")  # [5] this worker's split of the streaming dataset
    batches = shard.iter_torch_batches(
        batch_size=per_worker_batch, drop_last=True, device=device,
        dtypes=method.batch_dtypes(),
        local_shuffle_buffer_size=recipe.data.shuffle_buffer or None,
        local_shuffle_seed=(t.seed + rank + 1000 * pos["epoch"]) if recipe.data.shuffle_buffer else None,
        prefetch_batches=recipe.data.prefetch_batches)

    eval_metrics: dict[str, float] = {}
    last_loss: dict[str, float] = {}
    window = _new_window()
    skip = pos["batch_in_epoch"]  # data position: batches of the current epoch already trained on
    model.train()
    it = iter(batches)
    t_last = time.perf_counter()
    while pos["step"] < total_steps:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        if skip > 0:
            skip -= 1
            t_last = time.perf_counter()
            continue
        wait = time.perf_counter() - t0
        batch = method.prepare_batch(batch, device)
        terms = train_step(method, model, batch, opt, sched, s, scaler)
        pos["step"] += 1
        pos["batch_in_epoch"] += 1
        stop = guard.update(terms.skipped, pos["step"])  # [faults] the same on every rank (all-reduced flag)
        pos["nonfinite_steps"] = guard.total
        if stop:  # every rank at once; rank 0's return value reaches the driver (Result.return_value)
            return _abort(guard.reason(pos["step"]), pos, logger)
        now = time.perf_counter()
        if not terms.skipped:  # a skipped step's NaN never enters the logged means
            for k, v in terms.items():  # detached tensors: summed without a device sync per step
                window["terms"][k] = window["terms"].get(k, 0) + v
            window["n"] += 1
        window["wait"] += wait
        window["time"] += now - t_last
        t_last = now

        epoch_end = pos["batch_in_epoch"] >= steps_per_epoch or pos["step"] >= total_steps
        if rank == 0 and (pos["step"] % t.log_every == 0 or epoch_end):
            n = max(1, window["n"])
            means = {k: float(v) / n for k, v in window["terms"].items()}
            logger.log({
                **{f"train/{k}": v for k, v in means.items()},
                "train/lr": opt.param_groups[0]["lr"],
                **method.train_metrics(unwrap(model)),
                "train/samples_per_s": recipe.data.batch_size * n / max(window["time"], 1e-9),
                "train/data_wait_s": window["wait"] / n,
                "train/skipped_samples": _skipped(counter),
                "train/nonfinite_steps": guard.total,
                "train/epoch": pos["epoch"] + pos["batch_in_epoch"] / steps_per_epoch,
            }, step=pos["step"])
            last_loss = means
            window = _new_window()
        else:
            last_loss = {k: float(v) for k, v in terms.items()}
        if epoch_end:
            pos["epoch"] += 1
            pos["batch_in_epoch"] = 0
            if evaluate is not None:
                eval_metrics = evaluate(unwrap(model), device)
                logger.log(eval_metrics, step=pos["step"])
            _report(model, opt, sched, scaler, method, pos, last_loss, eval_metrics, rank, logger)
            t_last = time.perf_counter()
        elif pos["step"] % t.ckpt_every == 0:
            _report(model, opt, sched, scaler, method, pos, last_loss, eval_metrics, rank, logger)
            t_last = time.perf_counter()

    if pos["batch_in_epoch"] > 0 and pos["step"] > resumed_from:
        # [faults] The stream ended inside an epoch: skipped (corrupt) rows left fewer full batches than the
        # manifest's row count promised. End the epoch here (eval + checkpoint) instead of stopping half-way.
        if rank == 0:
            print(f"medvl: the data ended at step {pos['step']} of {total_steps} (epoch {pos['epoch']}, batch "
                  f"{pos['batch_in_epoch']} of {steps_per_epoch}): skipped rows shortened it; ending the epoch here",
                  flush=True)
            if window["n"]:
                logger.log({f"train/{k}": float(v) / window["n"] for k, v in window["terms"].items()},
                           step=pos["step"])
        pos["epoch"] += 1
        pos["batch_in_epoch"] = 0
        if evaluate is not None:
            eval_metrics = evaluate(unwrap(model), device)
            logger.log(eval_metrics, step=pos["step"])
        _report(model, opt, sched, scaler, method, pos, last_loss, eval_metrics, rank, logger,
                data_ended=True)
    if pos["step"] == resumed_from:  # nothing left to do (re-run of a finished run): report final state once
        if evaluate is not None:
            eval_metrics = evaluate(unwrap(model), device)
        _report(model, opt, sched, scaler, method, pos, {"loss": float("nan")}, eval_metrics, rank, logger,
                with_ckpt=False)
    logger.close()


def _abort(reason: str, pos: dict, logger) -> dict:
    """[faults] A run stopped on purpose: no exception (Ray Train would restart the group from the last checkpoint
    and meet the same NaNs), no checkpoint; the driver raises `TrainingAborted` from this return value."""
    logger.log({"train/nonfinite_steps": pos["nonfinite_steps"]}, step=pos["step"])
    logger.close()
    if logger.enabled:
        print(f"medvl: {reason}", flush=True)
    return {ABORT_KEY: reason, "step": pos["step"], "train/nonfinite_steps": pos["nonfinite_steps"]}


def _new_window() -> dict:
    return {"terms": {}, "n": 0, "wait": 0.0, "time": 0.0}


def _report(model, opt, sched, scaler, method, pos, losses: dict, eval_metrics, rank, logger,
            with_ckpt: bool = True, data_ended: bool = False) -> None:
    import ray.train
    logger.flush()  # the journal is durable before the checkpoint is registered (delivery may lag an outage)
    metrics = {"step": pos["step"], "epoch": pos["epoch"], **{f"train/{k}": v for k, v in losses.items()},
               **eval_metrics}
    if data_ended:
        metrics[DATA_ENDED_KEY] = True
    ckpt_dir = _save_checkpoint(model, opt, sched, scaler, method, dict(pos)) if (rank == 0 and with_ckpt) else None
    # [6] every rank reports; only rank 0 attaches the (DDP-replicated) checkpoint
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None,
                     checkpoint_dir_name=f"checkpoint_step={pos['step']:07d}" if ckpt_dir else None)


def _counter(config: dict):
    name = config.get("counter_name")
    if not name:
        return None
    import ray
    try:
        return ray.get_actor(name, namespace=config.get("counter_namespace"))
    except ValueError:
        return None


def _skipped(counter) -> float:
    if counter is None:
        return 0.0
    import ray
    return float(ray.get(counter.get.remote())[0])


def latest_position(storage_dir: Path) -> Optional[dict]:
    """Data position of the run's latest *registered* checkpoint (the one `get_checkpoint()` will return),
    read from Ray Train's checkpoint-manager snapshot; used by the dataset factory."""
    snap = Path(storage_dir) / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
        return json.loads((Path(storage_dir) / latest["checkpoint_dir_name"] / POSITION_FILE).read_text())
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None
