"""Start-up timeline of a training job: where the seconds before the first step go.

The driver marks when its interpreter started (from /proc), when `run_training` was entered (imports done), when
Ray was ready and when the job was prepared (MLflow run, corpus plan, trainer); it passes those marks to the
workers in the train config. Rank 0 marks when the train function started (Ray Train's controller and worker
group are up), when the model, optimizer and any checkpoint were ready, when the first batch arrived (Ray Data's
stream) and when the first step finished. It then logs each phase's seconds as MLflow metrics `startup/<phase>_s`
(plus `startup/total_s`) and prints one `medvl: start-up ...` line, which the console echoes:

    medvl: start-up 48.3 s to the first step: imports 5.1, ray 7.9, job 2.2, workers 14.0, model 3.1, data 13.8,
    first_step 2.2

A worker group that Ray Train restarts inside the same `fit()` (after a worker failure) reports only its own
phases (`restart_*`): the driver's marks belong to the first attempt. `bench/throughput` prints the timeline of
its medvl run.
"""
from __future__ import annotations

import os
import time
from typing import Optional

DRIVER_PHASES = ("imports", "ray", "job")
WORKER_PHASES = ("workers", "model", "data", "first_step")
PHASE_HELP = {
    "imports": "interpreter start and imports, up to run_training",
    "ray": "embedded Ray start (or connecting to a cluster)",
    "job": "MLflow run, corpus plan, trainer construction",
    "workers": "Ray Train controller, placement group, worker group, process group",
    "model": "worker imports, method, model, optimizer, checkpoint restore, DDP",
    "data": "Ray Data stream: plan, decode tasks, the first batch",
    "first_step": "the first optimizer step",
}
def process_start_time() -> Optional[float]:
    """Unix time this process started (Linux /proc; None elsewhere).

    Computed as now minus the process's age on the kernel's boot clock, not from `btime` in /proc/stat plus the
    start tick: both give the same instant while the wall clock is steady, but after a wall-clock step (NTP, a VM
    restored from a snapshot) only "now minus age" stays on the clock that the later `time.time()` marks use.
    """
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        started_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 (starttime), counted after the name
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
        now = time.time()
    except (OSError, ValueError, IndexError):
        return None
    age = uptime_s - started_s
    return now - age if age >= 0 else None


_driver_timelines = 0
"""How many driver timelines this process has made (only the first counts the process's start-up)."""


class Timeline:
    """Named time marks in order; `phases()` turns consecutive marks into durations."""

    def __init__(self, marks: Optional[dict[str, float]] = None, token: Optional[str] = None):
        self.marks: dict[str, float] = dict(marks or {})
        self.token = token
        """Identifies one `fit()`: rank 0 leaves a marker under it, so a restarted worker group knows."""

    def mark(self, name: str, at: Optional[float] = None) -> None:
        self.marks.setdefault(name, time.time() if at is None else at)

    @classmethod
    def for_driver(cls, token: str) -> "Timeline":
        """The first training of a process counts from the process's start (interpreter + imports); a later one
        (a pipeline's next train stage, a second `run_training` call) from now: its imports were paid before."""
        global _driver_timelines
        _driver_timelines += 1
        start = process_start_time() if _driver_timelines == 1 else None
        return cls({"start": start or time.time()}, token)

    def phases(self, names: tuple[str, ...]) -> dict[str, float]:
        """Seconds of each named phase: from the previous mark (in `names` order, after `start`) to its own."""
        out, prev = {}, self.marks.get("start")
        for name in names:
            t = self.marks.get(name)
            if t is None:
                continue
            if prev is not None:
                out[name] = max(0.0, t - prev)
            prev = t
        return out


def summary(phases: dict[str, float], restart: bool = False) -> str:
    total = sum(phases.values())
    what = "restart" if restart else "start-up"
    return (f"medvl: {what} {total:.1f} s to the first step: "
            + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))


def metrics(phases: dict[str, float], restart: bool = False) -> dict[str, float]:
    prefix = "startup/restart_" if restart else "startup/"
    out = {f"{prefix}{k}_s": round(v, 3) for k, v in phases.items()}
    out[f"{prefix}total_s"] = round(sum(phases.values()), 3)
    return out
