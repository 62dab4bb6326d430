"""Redraw a run's pictures (`medvl.eval.pictures`) at each epoch end and upload them as MLflow artifacts
(`pictures/loss_curves.png`, `pictures/retrieval.png`, `pictures/zero_shot_confusion.png`), off the training path:
rank 0 hands over the data of its evaluation and a daemon thread has it drawn and uploaded in another
process (a zero-CPU Ray task on the same node: no GIL taken from training), the newest epoch winning when
drawing falls behind. A failure to draw or upload is a warning, never a training error. The seconds each drawing
took are logged as the metric `time/pictures_s` (in the same thread, so they never hold up a step).
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from medvl.redact import redact_text

log = logging.getLogger(__name__)

ARTIFACT_DIR = "pictures"


class EpochPictures:
    def __init__(self, uri: Optional[str], run_id: Optional[str], journal: Optional[Path],
                 loss_terms: Sequence[str]):
        self.uri, self.run_id, self.journal, self.loss_terms = uri, run_id, journal, tuple(loss_terms)
        self.enabled = bool(uri and run_id)
        self._pending: Optional[tuple[int, Optional[dict]]] = None
        self._cv = threading.Condition()
        self._stop = False
        self.seconds: list[float] = []
        self._thread: Optional[threading.Thread] = None

    def submit(self, step: int, evaluate: Optional[Callable] = None) -> None:
        """After an evaluation: redraw with the run's journal so far and the evaluator's picture data."""
        if not self.enabled:
            return
        try:
            get = getattr(evaluate, "pictures", None)
            data = get() if callable(get) else None
        except Exception as e:  # noqa: BLE001 - pictures never fail training
            log.warning("medvl: no picture data from the evaluator: %s", redact_text(e))
            data = None
        with self._cv:
            self._pending = (step, data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="medvl-pictures", daemon=True)
                self._thread.start()
            self._cv.notify()

    def close(self, timeout: float = 60.0) -> None:
        """Draw what is pending, then stop (waits at most `timeout` s)."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._stop:
                    self._cv.wait()
                job, self._pending = self._pending, None
                if job is None:
                    return
            self._draw(*job)

    def _draw(self, step: int, data: Optional[dict[str, Any]]) -> None:
        args = (self.uri, self.run_id, str(self.journal) if self.journal else None, self.loss_terms, step, data)
        try:
            self.seconds.append(_off_process(draw_and_upload, args))
        except SystemExit:  # Ray shut down while the drawing task ran (the run is over): nothing to report
            return
        except Exception as e:  # noqa: BLE001 - pictures never fail training
            log.warning("medvl: could not draw or upload the run's pictures at step %d: %s", step, redact_text(e))


def draw_and_upload(uri: str, run_id: str, journal: Optional[str], loss_terms: Sequence[str], step: int,
                    data: Optional[dict[str, Any]]) -> float:
    """Draw the run's pictures from its journal and the evaluation's data, upload them; returns the seconds."""
    from medvl.eval.pictures import draw_all
    from medvl.track.buffer import MetricJournal
    t0 = time.perf_counter()
    records = [r for r in (MetricJournal(Path(journal)).records() if journal else [])
               if r.get("r") in (None, run_id)]  # this run's lines only
    with tempfile.TemporaryDirectory() as d:
        made = draw_all(d, records, loss_terms, data)
        dt = time.perf_counter() - t0
        if made:
            from mlflow.tracking import MlflowClient
            c = MlflowClient(uri)
            c.log_artifacts(run_id, d, artifact_path=ARTIFACT_DIR)
            c.log_metric(run_id, "time/pictures_s", dt, step=step)
    return dt


_remote_fn = None


def _off_process(fn: Callable, args: tuple) -> Any:
    """Run `fn(*args)` in another process when this one is a Ray worker: a zero-CPU Ray task pinned to this node
    (the journal is a local file), so matplotlib's Python work never takes the GIL from the training thread
    (drawing in a thread of rank 0 slowed bench/throughput's steady state by ~30% on 2 cores). Ray keeps that
    worker process for the next epochs (matplotlib is imported once). Without Ray: in this thread."""
    global _remote_fn
    try:
        import ray
        on_ray = ray.is_initialized()
    except ImportError:
        on_ray = False
    if not on_ray:
        return fn(*args)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    if _remote_fn is None:
        _remote_fn = ray.remote(num_cpus=0, max_retries=0)(fn)
    here = ray.get_runtime_context().get_node_id()
    ref = _remote_fn.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(*args)
    return ray.get(ref)
