"""Redraw a run's pictures (`medvl.eval.pictures`) at each epoch end and upload them as MLflow artifacts
(`pictures/loss_curves.png`, `pictures/retrieval.png`, `pictures/zero_shot_confusion.png`), off the training path:
rank 0 hands over the data of its evaluation and a daemon thread draws and uploads, the newest epoch winning when
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
        from medvl.eval.pictures import draw_all
        from medvl.track.buffer import MetricJournal
        try:
            t0 = time.perf_counter()
            records = [r for r in (MetricJournal(self.journal).records() if self.journal else [])
                       if r.get("r") in (None, self.run_id)]  # this run's lines only
            with tempfile.TemporaryDirectory() as d:
                made = draw_all(d, records, self.loss_terms, data)
                dt = time.perf_counter() - t0
                if made:
                    from mlflow.tracking import MlflowClient
                    c = MlflowClient(self.uri)
                    c.log_artifacts(self.run_id, d, artifact_path=ARTIFACT_DIR)
                    c.log_metric(self.run_id, "time/pictures_s", dt, step=step)
            self.seconds.append(dt)
        except Exception as e:  # noqa: BLE001 - pictures never fail training
            log.warning("medvl: could not draw or upload the run's pictures at step %d: %s", step, redact_text(e))
