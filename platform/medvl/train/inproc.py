"""In-process training (`train.launch: in_process`): Ray Train V2's local mode, plus what local mode leaves out.

With `ScalingConfig(num_workers=0)` Ray Train runs the training function in the process that calls `fit()`: no
controller actor, no worker group, no per-run imports in new processes (about 10 s per run on a 2-core machine,
`bench/throughput`'s "workers" phase). But in Ray 2.60 local mode's `report()` only keeps the last checkpoint in
memory, and nothing retries a failed run. This module keeps medvl's fault tolerance there:

- `Registry` persists each checkpoint into the run's storage the way Ray Train's controller does
  (`StorageContext.persist_current_checkpoint`), registers it in the same checkpoint-manager snapshot (Ray's own
  `_CheckpointManagerState`, written before old checkpoints are deleted) and rotates `train.keep_checkpoints` by
  registration order, as Ray Train does without a score attribute. `medvl eval`, the worker's `_restore` and a later
  run of the same name with `launch: workers` read them as Ray Train's own.
- `fit()` retries a failed attempt up to `train.max_failures` (-1: forever), each attempt resuming from the last
  registered checkpoint, as Ray Train restarts a worker group.
- The run's Train callbacks (`RunConfig(callbacks=...)`, e.g. a sweep trial's epoch reporter) get `after_report`
  for each report, as the controller would call them.

What it cannot do: a crash of the process itself (SIGKILL, out of memory) ends the run; running the same command
again resumes it from the last registered checkpoint (a sweep's trial: Tune restarts it,
`resources.trial_max_failures`).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


class Registry:
    """The run's checkpoint registry in its Ray Train storage (`<storage_path>/<run name>/`)."""

    def __init__(self, storage_path: str, run_name: str, num_to_keep: Optional[int]):
        from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState
        from ray.train.v2._internal.execution.storage import StorageContext
        self.sc = StorageContext(storage_path=storage_path, experiment_dir_name=run_name)
        self.fs, self.root = self.sc.storage_filesystem, self.sc.experiment_fs_path
        self.keep = num_to_keep
        # Ray's own snapshot model (read and written as Ray Train's checkpoint manager does); its checkpoint
        # results are in registration order, oldest first
        self.state = _CheckpointManagerState(checkpoint_results=[], checkpoint_report_indices=[],
                                             pending_training_results=[], pending_validation_specs=[],
                                             current_report_index=0, validated_checkpoint_dir_names=[],
                                             timed_out_validation_checkpoint_dir_names=[],
                                             failed_validation_checkpoint_dir_names=[])
        try:
            with self.fs.open_input_stream(self.sc.checkpoint_manager_snapshot_path) as f:
                text = f.read().decode()
        except (OSError, FileNotFoundError):
            return
        try:
            parse = getattr(_CheckpointManagerState, "model_validate_json", None) or _CheckpointManagerState.parse_raw
            self.state = parse(text)
        except ValueError as e:  # unreadable: the worker's _restore reports it (no checkpoint to resume from)
            log.warning("could not read %s: %s", self.sc.checkpoint_manager_snapshot_path, e)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def checkpoint(self, name: str):
        import ray.train
        return ray.train.Checkpoint(path=self.path(name), filesystem=self.fs)

    def latest_checkpoint(self):
        latest = self.state.latest_checkpoint_result
        return self.checkpoint(latest.checkpoint_dir_name) if latest else None

    def register(self, local_dir: str, name: str, metrics: dict[str, Any]):
        """Persist `local_dir` as checkpoint `name` of the run, register it, rotate; returns the persisted
        checkpoint."""
        import ray.train
        from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _TrainingResultState
        from ray.train.v2._internal.execution.storage import delete_fs_path
        persisted = self.sc.persist_current_checkpoint(ray.train.Checkpoint.from_directory(local_dir), name)
        st = self.state
        entry = _TrainingResultState(checkpoint_dir_name=name, metrics=dict(metrics))
        st.checkpoint_results.append(entry)
        st.checkpoint_report_indices.append(st.current_report_index)
        st.current_report_index += 1
        st.latest_checkpoint_result = entry
        drop: list[str] = []
        if self.keep is not None and len(st.checkpoint_results) > self.keep:
            k = len(st.checkpoint_results) - self.keep
            drop = [r.checkpoint_dir_name for r in st.checkpoint_results[:k]]
            st.checkpoint_results, st.checkpoint_report_indices = \
                st.checkpoint_results[k:], st.checkpoint_report_indices[k:]
        self._write()  # [faults] the snapshot first: a crash before the deletes leaves no dangling entry
        for old in drop:
            if old != name:
                delete_fs_path(fs=self.fs, fs_path=self.path(old))
        return persisted

    def _write(self) -> None:
        tmp = self.sc.checkpoint_manager_snapshot_path + ".tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(getattr(self.state, "model_dump_json", self.state.json)().encode())
        self.fs.move(tmp, self.sc.checkpoint_manager_snapshot_path)


class Run:
    """The in-process run now inside `fit()` in this process (the training function finds it with `current()`)."""

    def __init__(self, registry: Registry, callbacks: list):
        self.registry = registry
        self.callbacks = callbacks
        self.attempt = 0
        self._closers: list[Callable[[], None]] = []

    def on_failure(self, close: Callable[[], None]) -> None:
        """Something the failed attempt leaves running (the data stream's prefetch thread): closed before a retry."""
        self._closers.append(close)

    def report(self, metrics: dict[str, Any], local_dir: Optional[str], name: Optional[str]) -> None:
        """`ray.train.report` for an in-process run: persist + register the checkpoint, then report to local mode
        (`Result.metrics`) and to the run's callbacks."""
        from ray.train.v2._internal.execution.train_fn_utils import get_train_fn_utils
        ckpt = self.registry.register(local_dir, name, metrics) if local_dir else None
        # the local-mode utils directly: `ray.train.report` refuses to run inside a Tune trial
        get_train_fn_utils().report(metrics, checkpoint=ckpt)
        for cb in self.callbacks:
            hook = getattr(cb, "after_report", None)
            if hook is not None:
                hook(None, [metrics], ckpt)

    def _close_failed(self) -> None:
        closers, self._closers = self._closers, []
        for close in closers:
            try:
                close()
            except Exception as e:  # noqa: BLE001 - best effort: the retry must go on
                log.warning("could not close a failed attempt's %s: %s", close, e)


_current: Optional[Run] = None


def current() -> Optional[Run]:
    return _current


def fit(trainer, storage_path: str, run_name: str, keep: Optional[int], max_failures: int, callbacks: list):
    """`trainer.fit()` of a `num_workers=0` trainer, with medvl's checkpoint registry, retries and callbacks.
    Returns a Ray Train `Result` whose checkpoint is the run's latest registered one (as with Ray Train workers)."""
    from medvl.track.console import verbose
    run = Run(Registry(storage_path, run_name, keep), list(callbacks or []))
    # Ray Data now runs in this process: its INFO lines and "progress bars disabled" warning would land on the
    # user's console, where Ray Train workers keep them in their log files (`medvl -v` shows them)
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    if not verbose():
        data_log.setLevel(logging.ERROR)
    try:
        return _fit(trainer, run, max_failures)
    finally:
        data_log.setLevel(level)


def _fit(trainer, run: Run, max_failures: int):
    global _current
    from ray.train import Result
    failures = 0
    while True:
        _current = run
        try:
            out = trainer.fit()
        except Exception as e:
            run._close_failed()
            if max_failures != -1 and failures >= max_failures:
                raise
            failures += 1
            limit = "unlimited" if max_failures == -1 else str(max_failures)
            print(f"medvl: in-process training attempt failed ({type(e).__name__}: {e}); retrying from the last "
                  f"registered checkpoint (retry {failures} of {limit})", flush=True)
            continue
        finally:
            _current = None
        return Result(metrics=out.metrics, checkpoint=run.registry.latest_checkpoint(), path=run.registry.root,
                      error=None, return_value=getattr(out, "return_value", None))


__all__ = ["Registry", "Run", "current", "fit"]
