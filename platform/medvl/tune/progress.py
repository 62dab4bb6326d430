"""The console line of a running sweep (`medvl tune`): trials done / running / stopped early / errored and the
best objective so far, printed when it changes (at most every `MEDVL_PROGRESS_EVERY_S` seconds, default 10) and
when the sweep ends. Tune's own status tables are off unless `medvl -v`.

    trials 3/8 done (1 stopped early, 0 errored), 2 running  best val/zero_shot_accuracy 0.9120 (trial ab12)  [0:02:13]
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional

from ray.tune import Callback

from medvl.track.console import display_mode, sweep_line
from medvl.tune.spec import trial_horizon


class SweepProgress(Callback):
    """A Tune callback on the sweep driver (plain data only: Tune pickles callbacks into its experiment state)."""

    def __init__(self, total: int, metric: str, mode: str, horizon: Optional[int] = None):
        self.total, self.metric, self.mode, self.horizon = total, metric, mode, horizon
        self.every_s = float(os.environ.get("MEDVL_PROGRESS_EVERY_S", 10))
        self._t0 = time.time()
        self._last_line = ""
        self._last_print = 0.0

    def summary(self, trials: list) -> tuple[dict[str, int], Optional[float], Optional[str]]:
        counts = {"done": 0, "stopped": 0, "errored": 0, "running": 0, "pending": 0}
        best, best_id = None, None
        for t in trials:
            last = dict(t.last_result or {})
            if t.status == "TERMINATED":  # stopped early = ended before the horizon (as the summary table counts)
                epoch = last.get("epoch")
                h = trial_horizon(self.horizon, t.config)
                early = (epoch < h) if h is not None and epoch is not None \
                    else not last.get("done")
                counts["stopped" if early else "done"] += 1
            elif t.status == "ERROR":
                counts["errored"] += 1
            elif t.status == "RUNNING":
                counts["running"] += 1
            else:
                counts["pending"] += 1
            v = last.get(self.metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                if best is None or (v > best if self.mode == "max" else v < best):
                    best, best_id = float(v), t.trial_id
        return counts, best, best_id

    def _show(self, trials: list, force: bool = False) -> None:
        if display_mode() == "off":
            return
        counts, best, best_id = self.summary(trials)
        line = sweep_line(counts, self.total, self.metric, best, best_id, time.time() - self._t0)
        key = line.rsplit("[", 1)[0]  # without the clock: print on change, or as a heartbeat
        now = time.monotonic()
        if (force and key != self._last_line) or (key != self._last_line and now - self._last_print >= 1) or now - self._last_print >= \
                max(self.every_s, 1) * 6:
            print(f"medvl tune: {line}", file=sys.stdout, flush=True)
            self._last_line, self._last_print = key, now

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self._show(trials)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._show(trials, force=True)


__all__ = ["SweepProgress"]
