"""`train_fn_per_worker`: the only Ray-aware training code; everything per-step is plain PyTorch (step.py).

Numbered comments mark the Ray Train specifics, as in Ray's own examples. What this function guarantees (the
README's "Reliability" section says how each is tested):

* **Exact data position.** Each rank streams its own part of every epoch in an order that is a pure function of
  (seed, epoch, world size, rank) (`medvl.data.stream.StreamPlan`), and keeps its position (epoch, window, offset
  = the next unseen row). Every checkpoint holds every rank's position and RNG states; a restarted or re-run job
  continues at exactly the next unseen row, with the same model, optimizer, scheduler and RNG state.
* **Complete epochs.** All ranks take the same number of steps: before each step the ranks agree (one-integer
  MIN all-reduce) that each has a full batch, so a rank whose corrupt rows outran its reserve ends the epoch
  for everyone instead of hanging or silently ending the run. Every epoch ends with its evaluation, checkpoint
  and report; the final report carries the step actually reached.
* **Safe checkpoints.** Written atomically with checksums, verified before use, loaded with
  `weights_only=True`; a corrupt latest checkpoint falls back to the newest registered one that verifies,
  with a warning (and an MLflow tag) naming it. The scratch copy is deleted once Ray has persisted it.
* **Logged means.** `train/loss` and every loss term are the mean over ranks; `train/skipped_samples` is the sum.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from medvl.config import recipe_from_dict
from medvl.data.stream import BatchPrefetcher, EpochBatcher, StreamPlan, StreamStart, meta_and_batch, \
    rank_stream
from medvl.losses import Dist
from medvl.methods import resolve_method
from medvl.models.factory import unwrap
from medvl.track.pictures import EpochPictures
from medvl.track.runs import RankZeroLogger
from medvl.track.timeline import DRIVER_PHASES, WORKER_PHASES, Timeline
from medvl.track.timeline import metrics as startup_metrics
from medvl.track.timeline import summary as startup_summary
from medvl.train import checkpoint as ck
from medvl.train import inproc
from medvl.train.faults import ABORT_KEY, NonFiniteGuard
from medvl.train.optim import build_optimizer, build_scheduler
from medvl.train.step import StepSettings, train_step

STATE_FILE = ck.STATE_FILE
POSITION_FILE = ck.POSITION_FILE


@dataclass
class Progress:
    """Where training stands. `step`, `epoch`, `step_in_epoch` are the same on every rank; `window`/`offset`
    (the next unseen row of this rank's plan of `epoch`) and `skipped` are this rank's."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    window: int = 0
    offset: int = 0
    skipped: int = 0
    nonfinite_steps: int = 0


class _Dist:
    """The collectives the loop needs (no-ops on one worker). `cpu` is a gloo group (the default group on CPU;
    a separate one next to NCCL on GPUs) for the per-step agreement and the checkpoint gathers."""

    def __init__(self, world: int, device: torch.device):
        self.world, self.device = world, device
        self.cpu = None
        if world > 1:
            import torch.distributed as dist
            self.cpu = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def all_have(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        import torch.distributed as dist
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu)
        return bool(t.item())

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.cpu)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu)
        return box[0]


def train_fn_per_worker(config: dict[str, Any]) -> Optional[dict]:
    import ray.data
    import ray.train
    import ray.train.torch

    startup = Timeline((config.get("timeline") or {}).get("marks"))
    startup.mark("workers")
    recipe = recipe_from_dict(config["recipe"])
    t, d = recipe.train, recipe.data
    # train.launch: in_process = the one rank, in this process (Ray Train's local mode; in a sweep trial's actor,
    # where Ray refuses `ray.train.*` calls, so this function makes none of them then: see medvl.train.inproc)
    run = inproc.current() if config.get("in_process") else None
    if run is not None:
        rank, world = 0, 1
    else:
        ctx = ray.train.get_context()  # [1] rank/world from Ray Train
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(t.torch_threads or t.cpus_per_worker)
    ck.seed_everything(t.seed + rank)
    # [2] cuda:<local rank> or cpu; in process: the GPU the caller sees (a sweep trial's actor holds one)
    device = (torch.device("cuda", torch.cuda.current_device()) if t.use_gpu else torch.device("cpu")) \
        if run is not None else ray.train.torch.get_device()
    coll = _Dist(world, device)

    method = resolve_method(recipe)
    method.bind(Dist(rank, world), device)
    model = method.build_model().to(device)
    # Rank 0 decodes the held-out set in a background thread while training starts, instead of making the
    # other ranks wait for it in their first collective.
    evaluator = _Background(method.evaluator) if rank == 0 else None
    opt = build_optimizer(model, recipe.optim)
    total_steps = config["total_steps"]
    sched = build_scheduler(opt, recipe.optim, total_steps)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and t.precision == "fp16" else None
    plan = StreamPlan.from_dict(config["plan"])
    steps_per_epoch = config["steps_per_epoch"]
    per_rank = d.batch_size // world
    logger = RankZeroLogger(config.get("mlflow_uri"), config.get("mlflow_run_id"), enabled=rank == 0,
                            journal=config.get("metrics_journal"))
    if run is not None:  # a failed in-process attempt's metric delivery thread stops before the retry starts its own
        run.on_failure(lambda: logger.close(timeout=5.0))
    storage = _Storage(config.get("storage_dir"), run)
    # [pictures] loss curves, retrieval panel, zero-shot confusion: redrawn after each evaluation in a daemon thread
    pictures = EpochPictures(logger.uri, logger.run_id, logger.journal.path, method.loss_terms()) \
        if rank == 0 and logger.enabled and recipe.track.pictures else None
    if rank == 0:
        ck.clean_scratch(recipe.runtime.scratch_dir, recipe.run_name, config.get("storage_dir") or "")

    # [3] the latest registered checkpoint after a restart / re-run (verified; a corrupt one falls back)
    prog, resumed = Progress(), False
    state = _restore(run.registry.latest_checkpoint() if run else ray.train.get_checkpoint(), storage, coll, rank,
                     logger)
    if state is not None:
        resumed = True
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        method.load_state_dict(state.get("method") or {})
        prog = _resume_position(state, plan, rank, world, per_rank)
        rngs = state.get("rng") or []
        if len(rngs) == world:
            ck.restore_rng(rngs[rank])
    resumed_from = prog.step
    guard = NonFiniteGuard(t.max_nonfinite_steps, prog.nonfinite_steps)  # [faults] NaN/inf steps, all ranks
    if rank == 0:
        print(f"medvl: {'resuming from checkpoint at step ' + str(resumed_from) if resumed else 'starting fresh'} "
              f"(epoch {prog.epoch}, step {prog.step_in_epoch} of {steps_per_epoch} in it), "
              f"{total_steps} steps planned", flush=True)
        if resumed:
            logger.log({"train/resumed_from_step": resumed_from}, step=resumed_from)

    if run is None:  # in process: one rank, already on its device
        model = ray.train.torch.prepare_model(model)  # [4] DDP (gloo on CPU, nccl on GPU); no-op for 1 worker
    startup.mark("model")
    s = StepSettings(recipe.optim.accum_freq, recipe.optim.grad_clip, t.precision, device.type)
    dtypes = method.batch_dtypes()
    audit = _Audit(config.get("audit_dir"), rank)
    max_steps = t.max_steps or None

    def finished() -> bool:
        return prog.epoch >= t.epochs or (max_steps is not None and prog.step >= max_steps)

    eval_metrics: dict[str, float] = {}
    last_loss: dict[str, float] = {}
    if finished():  # a re-run of a finished run: report the final state once, change nothing
        if evaluator is not None and evaluator.get() is not None:
            eval_metrics = evaluator.get()(unwrap(model), device)
        _report(model, opt, sched, scaler, method, prog, {"loss": float("nan")}, eval_metrics, coll, rank,
                logger, recipe, plan, storage, with_ckpt=False, done=True, run=run)
        logger.close()
        return None

    # [5] this rank's own stream: its plan from its position on, decoded in Ray Data tasks, order preserved
    data_ctx = ray.data.DataContext.get_current()
    # set here, not copied from the driver: medvl's trainer starts no DatasetsCallback (see medvl.train.pg_cleaner)
    data_ctx.enable_progress_bars = data_ctx.print_on_execution_start = data_ctx.enable_auto_log_stats = False
    stream = rank_stream(plan, method.decoder(train=True), rank=rank,
                         start=StreamStart(prog.epoch, prog.window, prog.offset), epochs=t.epochs,
                         decode_tasks=-(-d.decode_tasks // world), decode_batch_size=d.decode_batch_size,
                         counter=tuple(config["counter"]) if config.get("counter") else None,
                         buffer_mb=d.decoded_buffer_mb, block_mb=d.decoded_block_mb)
    blocks = stream.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=d.prefetch_batches)
    pin = device.type == "cuda"

    def to_torch(batch: dict[str, np.ndarray]) -> tuple[dict, dict]:
        meta, arrays = meta_and_batch(batch)
        # blocks may be read-only views of the object store: copy those, methods may edit a batch in place
        out = {k: torch.as_tensor(v if v.flags.writeable else np.array(v), dtype=dtypes.get(k)) for k, v in
               arrays.items()}
        return meta, ({k: v.pin_memory() for k, v in out.items()} if pin else out)

    batcher = BatchPrefetcher(EpochBatcher(iter(blocks), per_rank), range(prog.epoch, t.epochs), to_torch,
                              depth=max(1, d.prefetch_batches))
    if run is not None:  # an in-process attempt that fails leaves no prefetch thread behind for the retry
        run.on_failure(batcher.close)
        if pictures is not None:
            run.on_failure(lambda: pictures.close(timeout=5.0))
    sizes = _window_sizes(plan, prog.epoch, rank)
    cursor = _linear(sizes, prog.window, prog.offset)  # next unseen row of this rank's part, as a row index

    window = _new_window()
    model.train()
    t_last = time.perf_counter()
    while not finished() or prog.step_in_epoch == steps_per_epoch:  # an epoch just completed still ends below
        t0 = time.perf_counter()
        batch = batcher.next_batch(prog.epoch) if prog.step_in_epoch < steps_per_epoch else None
        ran_short = batch is None and prog.step_in_epoch < steps_per_epoch
        go = coll.all_have(batch is not None) if prog.step_in_epoch < steps_per_epoch else False
        if go:
            wait = time.perf_counter() - t0
            meta, tensors = batch
            tensors = method.prepare_batch({k: v.to(device, non_blocking=True) for k, v in tensors.items()},
                                           device)
            first = "first_step" not in startup.marks
            if first:
                startup.mark("data")
            terms = train_step(method, model, tensors, opt, sched, s, scaler)
            if first:
                startup.mark("first_step")
                if rank == 0:
                    _report_startup(startup, (config.get("timeline") or {}).get("token"), storage, logger,
                                    prog.step + 1)
            stop = guard.update(terms.skipped, prog.step + 1)  # [faults] the same on every rank (all-reduced)
            prog.nonfinite_steps = guard.total
            lin = _linear(sizes, int(meta["_window"][-1]), int(meta["_pos"][-1]) + 1)
            prog.skipped += (lin - cursor) - len(meta["_pos"])  # rows passed over but not delivered
            cursor = lin
            prog.window, prog.offset = _split_linear(sizes, cursor)
            prog.step += 1
            prog.step_in_epoch += 1
            audit.write(prog, meta["_sid"], terms)
            if stop:  # every rank at once; rank 0's return value reaches the driver (Result.return_value)
                batcher.close()
                return _abort(guard.reason(prog.step), prog, logger)
            now = time.perf_counter()
            if not terms.skipped:  # a skipped step's NaN never enters the logged means
                for k, v in terms.items():  # detached tensors: summed without a device sync per step
                    window["terms"][k] = window["terms"].get(k, 0) + v
                window["n"] += 1
            else:
                window["bad"] = window.get("bad", 0) + 1
            window["wait"] += wait
            window["time"] += now - t_last
            t_last = now
            if prog.step % t.log_every == 0:
                if evaluator is not None:
                    evaluator.check()
                last_loss = _log_window(window, prog, steps_per_epoch, coll, logger, opt, method, model, recipe)
                window = _new_window()
            if prog.step_in_epoch == steps_per_epoch:
                continue  # the epoch-end branch below evaluates, checkpoints and reports
            if max_steps is not None and prog.step >= max_steps:  # the run ends mid-epoch: eval + final report
                last_loss = _log_window(window, prog, steps_per_epoch, coll, logger, opt, method, model,
                                        recipe) or last_loss
                eval_metrics = _evaluate(evaluator, model, device, logger, prog, eval_metrics, pictures)
                _report(model, opt, sched, scaler, method, prog, last_loss, eval_metrics, coll, rank, logger,
                        recipe, plan, storage, done=True, run=run)
                break
            if prog.step % t.ckpt_every == 0:
                _report(model, opt, sched, scaler, method, prog, last_loss, eval_metrics, coll, rank, logger,
                        recipe, plan, storage, run=run)
                t_last = time.perf_counter()
            continue

        # ---- the epoch ends on every rank: planned steps done, or some rank has no full batch left
        if ran_short:  # this rank read its whole part: every row it did not get was skipped
            prog.skipped += (sizes[-1] if sizes else 0) - cursor - batcher.short_rows
        if prog.step_in_epoch < steps_per_epoch and rank == 0:
            print(f"medvl: epoch {prog.epoch} ends after {prog.step_in_epoch} of {steps_per_epoch} steps: a rank "
                  f"ran out of rows (corrupt rows beyond its reserve)", flush=True)
        last_loss = _log_window(window, prog, steps_per_epoch, coll, logger, opt, method, model, recipe) \
            or last_loss
        window = _new_window()
        prog.epoch += 1
        prog.step_in_epoch = 0
        prog.window = prog.offset = 0
        sizes = _window_sizes(plan, prog.epoch, rank) if prog.epoch < t.epochs else []
        cursor = 0
        if recipe.eval.every_epoch or finished():  # eval.at_end: only after the last epoch
            eval_metrics = _evaluate(evaluator, model, device, logger, prog, eval_metrics, pictures)
        _report(model, opt, sched, scaler, method, prog, last_loss, eval_metrics, coll, rank, logger, recipe,
                plan, storage, done=finished(), run=run)
        t_last = time.perf_counter()
    batcher.close()
    if pictures is not None:
        pictures.close(timeout=20.0)
    logger.close()
    return None


def _abort(reason: str, prog: Progress, logger) -> dict:
    """[faults] A run stopped on purpose: no exception (Ray Train would restart the group from the last checkpoint
    and meet the same NaNs), no checkpoint; the driver raises `TrainingAborted` from this return value."""
    logger.log({"train/nonfinite_steps": prog.nonfinite_steps}, step=prog.step)
    logger.close()
    if logger.enabled:
        print(f"medvl: {reason}", flush=True)
    return {ABORT_KEY: reason, "step": prog.step, "train/nonfinite_steps": prog.nonfinite_steps}


# --------------------------------------------------------------------------- helpers of the loop


class _Background:
    """A value computed in a daemon thread; `get()` waits for it (and re-raises its error)."""

    def __init__(self, fn):
        import concurrent.futures
        self._ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="medvl-eval-setup")
        self._fut = self._ex.submit(fn)
        self._ex.shutdown(wait=False)

    def get(self):
        return self._fut.result()

    def check(self) -> None:
        """Raise now if building it failed (not only at the end of the first epoch)."""
        if self._fut.done() and self._fut.exception() is not None:
            raise self._fut.exception()


def _evaluate(evaluator: Optional[_Background], model, device, logger, prog: Progress, last: dict,
              pictures: Optional[EpochPictures] = None) -> dict:
    evaluate = evaluator.get() if evaluator is not None else None
    m = last
    if evaluate is not None:
        m = evaluate(unwrap(model), device)
        logger.log(m, step=prog.step)
    if pictures is not None:  # loss curves also for runs without held-out data
        pictures.submit(prog.step, evaluate)
    return m


def _new_window() -> dict:
    return {"terms": {}, "n": 0, "wait": 0.0, "time": 0.0}


def _log_window(window: dict, prog: Progress, steps_per_epoch: int, coll: _Dist, logger, opt, method, model,
                recipe) -> dict[str, float]:
    """Log the steps since the last log: loss terms averaged over ranks, skipped rows summed (a collective:
    every rank calls it at the same steps). Returns the mean terms ({} when there was no step)."""
    n = window["n"]
    if n == 0 and not window.get("bad"):
        return {}
    if n == 0:  # every step of the window was skipped (non-finite): no loss point, but the counters still move
        vals = coll.sum(torch.tensor([float(prog.skipped)]))
        logger.log({"train/skipped_samples": float(vals[0]), "train/nonfinite_steps": prog.nonfinite_steps,
                    "train/lr": opt.param_groups[0]["lr"],
                    "train/epoch": prog.epoch + prog.step_in_epoch / max(1, steps_per_epoch)}, step=prog.step)
        return {}
    keys = sorted(window["terms"])
    vals = torch.stack([torch.as_tensor(window["terms"][k], dtype=torch.float32).detach().reshape(()).cpu()
                        for k in keys] + [torch.tensor(float(prog.skipped))])
    vals = coll.sum(vals)
    means = {k: float(vals[i]) / (n * coll.world) for i, k in enumerate(keys)}
    logger.log({
        **{f"train/{k}": v for k, v in means.items()},
        "train/lr": opt.param_groups[0]["lr"],
        **(method.train_metrics(unwrap(model)) if logger.enabled else {}),
        "train/samples_per_s": recipe.data.batch_size * n / max(window["time"], 1e-9),
        "train/data_wait_s": window["wait"] / n,
        "train/skipped_samples": float(vals[-1]),
        "train/nonfinite_steps": prog.nonfinite_steps,
        "train/epoch": prog.epoch + prog.step_in_epoch / max(1, steps_per_epoch),
    }, step=prog.step)
    return means


def _window_sizes(plan: StreamPlan, epoch: int, rank: int) -> list[int]:
    """Cumulative row counts at the end of each window of this rank's part of `epoch`."""
    out, acc = [], 0
    for w in plan.windows(epoch, rank):
        acc += w.rows
        out.append(acc)
    return out


def _linear(cum: list[int], window: int, offset: int) -> int:
    return (cum[window - 1] if window > 0 and cum else 0) + offset


def _split_linear(cum: list[int], lin: int) -> tuple[int, int]:
    start = 0
    for i, end in enumerate(cum):
        if lin < end:
            return i, lin - start
        start = end
    return len(cum), 0


def _resume_position(state: dict, plan: StreamPlan, rank: int, world: int, per_rank: int) -> Progress:
    """This rank's progress from a checkpoint: exact when the data plan is unchanged; after a change of world
    size, corpus or shuffle settings (refused unless the recipe change was allowed) the epoch continues at the
    same fraction of every rank's part, which may repeat or leave out some of its rows (warned)."""
    p = Progress(step=int(state["step"]), epoch=int(state["epoch"]),
                 step_in_epoch=int(state.get("step_in_epoch", state.get("batch_in_epoch", 0))),
                 nonfinite_steps=int(state.get("nonfinite_steps", 0)))
    positions = state.get("positions") or []
    if state.get("plan") == plan.fingerprint() and len(positions) == world:
        mine = positions[rank]
        p.window, p.offset, p.skipped = int(mine["window"]), int(mine["offset"]), int(mine["skipped"])
        return p
    if rank == 0:
        p.skipped = sum(int(x.get("skipped", 0)) for x in positions)
    if p.step_in_epoch:
        warnings.warn(f"the checkpoint was taken with another data plan (world size {state.get('world_size')}, "
                      f"or a changed corpus or shuffle setting): epoch {p.epoch} continues after "
                      f"{p.step_in_epoch} steps at the same point of this plan, so some of its rows may be seen "
                      f"twice or not at all", stacklevel=2)
        p.window, p.offset = _split_linear(_window_sizes(plan, p.epoch, rank), p.step_in_epoch * per_rank)
    return p


def _report_startup(startup: Timeline, token: Optional[str], storage: "_Storage", logger, step: int) -> None:
    """Rank 0, after its first step: the start-up phases as `startup/*` metrics and one console line. A worker
    group restarted inside the same fit() finds the marker of the first report and reports its own phases only
    (the driver's marks belong to the first attempt)."""
    marker = f"startup-{token}" if token else None
    try:
        restart = bool(marker) and storage.exists(marker)
    except Exception:  # noqa: BLE001 - bookkeeping never fails a training step
        restart = False
    if restart:
        startup = Timeline({"start": startup.marks["workers"], **{k: startup.marks[k] for k in WORKER_PHASES
                                                                  if k in startup.marks and k != "workers"}})
    phases = startup.phases(("model", "data", "first_step") if restart else DRIVER_PHASES + WORKER_PHASES)
    print(startup_summary(phases, restart), flush=True)
    logger.log(startup_metrics(phases, restart), step=step)
    if marker and not restart:
        try:
            storage.touch(marker)
        except Exception:  # noqa: BLE001
            pass


class _Storage:
    """The run's checkpoint storage as Ray Train sees it (local path or a pyarrow filesystem)."""

    def __init__(self, local_dir: Optional[str], run: Optional["inproc.Run"] = None):
        self.key = local_dir or ""  # identifies the run's storage (scratch directory names)
        self.fs = self.root = None
        if run is not None:  # in-process: the storage medvl's own registry persists into
            self.fs, self.root, self._sc = run.registry.fs, run.registry.root, run.registry.sc
            return
        try:
            import ray.train
            sc = ray.train.get_context().get_storage()  # DeveloperAPI: works for local and cloud storage
            self.fs, self.root, self._sc = sc.storage_filesystem, sc.experiment_fs_path, sc
        except Exception:  # noqa: BLE001 - fall back to the local directory the driver passed
            self._sc = None
            if local_dir:
                import pyarrow.fs
                self.fs, self.root = pyarrow.fs.LocalFileSystem(), local_dir

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def touch(self, name: str) -> None:
        if self.fs is not None:
            with self.fs.open_output_stream(self.path(name)) as f:
                f.write(b"")

    def exists(self, name: str) -> bool:
        if self.fs is None:
            return False
        import pyarrow.fs
        return self.fs.get_file_info(self.path(name)).type != pyarrow.fs.FileType.NotFound

    def registered(self) -> list[ck.Registered]:
        if self.fs is None:
            return []
        try:
            with self.fs.open_input_stream(self.path(ck.SNAPSHOT_FILE)) as f:
                return ck.read_snapshot(f.read().decode())
        except (OSError, FileNotFoundError):
            return []

    def checkpoint(self, name: str):
        import ray.train
        return ray.train.Checkpoint(path=self.path(name), filesystem=self.fs)


def _restore(latest, storage: _Storage, coll: _Dist, rank: int, logger) -> Optional[dict]:
    """Load the checkpoint to resume from: Ray's latest if it verifies, else the newest registered checkpoint that
    does (rank 0 decides, every rank loads the same one)."""
    choice = None
    if rank == 0 and latest is not None:
        cands = [(Path(latest.path).name, latest)]
        for r in storage.registered():
            if r.name != cands[0][0]:
                cands.append((r.name, storage.checkpoint(r.name)))
        name, _, bad = ck.choose_checkpoint((n, c.as_directory) for n, c in cands)
        if bad:
            msg = "; ".join(f"{n}: {why}" for n, why in bad)
            if name is None:
                raise ck.CheckpointError(f"no registered checkpoint of this run verifies ({msg}); to start over, "
                                         f"remove the run's storage directory or use another track.run_name")
            text = f"medvl: WARNING: skipping corrupt checkpoint(s) {msg}; resuming from {name}"
            print(text, flush=True)
            warnings.warn(text, stacklevel=2)
            logger.set_tag("medvl.checkpoint_fallback", f"{', '.join(n for n, _ in bad)} corrupt -> resumed from {name}")
        choice = name
    choice = coll.broadcast(choice)
    if choice is None:
        return None
    ckpt = latest if latest is not None and Path(latest.path).name == choice else storage.checkpoint(choice)
    with ckpt.as_directory() as local:  # on the CPU: load_state_dict copies to the parameters' device
        return ck.load_checkpoint(local, map_location="cpu")


def _report(model, opt, sched, scaler, method, prog: Progress, losses: dict, eval_metrics: dict, coll: _Dist,
            rank: int, logger, recipe, plan: StreamPlan, storage: _Storage, with_ckpt: bool = True,
            done: bool = False, run: Optional["inproc.Run"] = None) -> None:
    """[6] Every rank reports; rank 0 attaches the checkpoint (the DDP model is replicated) with every rank's
    position and RNG state, gathered here."""
    import ray.train
    logger.flush()  # metrics logged before a checkpoint are written before it is registered
    mine = {"window": prog.window, "offset": prog.offset, "skipped": prog.skipped}
    gathered = coll.gather({"position": mine, "rng": ck.capture_rng()}) if with_ckpt else []
    metrics = {"step": prog.step, "epoch": prog.epoch, **{f"train/{k}": v for k, v in losses.items()},
               **eval_metrics, "final": int(done)}
    scratch, name = None, None
    if rank == 0 and with_ckpt:
        position = {"step": prog.step, "epoch": prog.epoch, "step_in_epoch": prog.step_in_epoch,
                    "nonfinite_steps": prog.nonfinite_steps,
                    "world_size": coll.world, "plan": plan.fingerprint(),
                    "positions": [g["position"] for g in gathered]}
        state = {"format": ck.FORMAT, "version": ck.VERSION, "model": unwrap(model).state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "scaler": scaler.state_dict() if scaler else None, "method": method.state_dict(),
                 "method_name": method.describe(), "rng": [g["rng"] for g in gathered], **position}
        scratch = ck.new_scratch_dir(recipe.runtime.scratch_dir, recipe.run_name, storage.key)
        ck.write_checkpoint(scratch, state, position)
        name = ck.checkpoint_dir_name(prog.step, storage.exists)
    try:
        if run is not None:  # in-process: medvl persists and registers it (see medvl.train.inproc)
            run.report(metrics, str(scratch) if scratch else None, name)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(scratch)) if scratch
                             else None, checkpoint_dir_name=name)
    finally:
        if scratch is not None:  # SYNC upload: Ray has persisted it (or failed) when report returns
            shutil.rmtree(scratch, ignore_errors=True)


class _Audit:
    """Audit mode (`MEDVL_AUDIT_SAMPLES=<dir>` on the driver): every rank appends the sample-id hashes of each
    step it trains, and its local loss, to `<dir>/rank<r>.jsonl` (one line per step, with this attempt's id
    `<pid>-<ns>`), so tests can compare an interrupted run with an uninterrupted one step by step."""

    def __init__(self, directory: Optional[str], rank: int):
        self.f = None
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.f = open(Path(directory) / f"rank{rank}.jsonl", "a", buffering=1)
            self.attempt = f"{os.getpid()}-{time.time_ns()}"

    def write(self, prog: Progress, sids: np.ndarray, terms: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps({"attempt": self.attempt, "step": prog.step, "epoch": prog.epoch,
                                     "sids": [int(x) for x in sids], "loss": float(terms["loss"])}) + "\n")


def latest_position(storage_dir: Path) -> Optional[dict]:
    """Data position of the run's latest *registered* checkpoint (the one `get_checkpoint()` will return),
    read from Ray Train's checkpoint-manager snapshot."""
    regs = ck.registered_checkpoints(storage_dir)
    return ck.position_of(Path(storage_dir) / regs[0].name) if regs else None


__all__ = ["train_fn_per_worker", "latest_position", "Progress", "STATE_FILE", "POSITION_FILE"]
