"""Test-only stage kinds (names start with `test_`), loaded by pipeline recipes through `plugins: [medvl_test_stages]`.

`test_write` runs in the pipeline's own process and needs no Ray; `test_task` is the same stage as a Ray task. Both
write `files` small files plus `value.json` (their `value` plus the values of their upstream stages), sleep
`sleep_s` seconds (left out of the key: it changes timing, not output), and append one line per build to the file
`log` names, so a test can count how often a key was really built, by which process, and when.

Fault injection (read from the environment of the process running the stage, so it does not enter the key):
`MEDVL_TEST_CRASH=<stage>` kills that process with SIGKILL after the first file is written (a half-written
output), `MEDVL_TEST_FAIL=<stage>` raises inside the stage.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

from medvl.config import ConfigError
from medvl.pipelines import Input, Stage, StageContext, register_stage


@dataclass
class WriteConfig:
    value: float = 1.0
    """This stage's own value (its reported `value` adds the upstream stages' values)."""
    files: int = 2
    """Number of part files written."""
    sleep_s: float = 0.0
    """Seconds to sleep while building (after the first file); not part of the key."""
    log: str = ""
    """Append `<stage> <key> <build id> <pid> <start> <end>` here after each build."""
    data: Optional[str] = field(default=None, metadata={"input": "file"})
    """An input file (fingerprinted by content); its size is added to the value."""
    corpus: Optional[str] = field(default=None, metadata={"input": "corpus"})
    """An input corpus (fingerprinted); its row count is added to the value."""
    src_dir: Optional[str] = field(default=None, metadata={"path": True})
    """A path an upstream output can be bound to (`inputs: {src_dir: <stage>}`); its value.json is added."""

    def validate(self) -> None:
        if self.files < 1:
            raise ConfigError("files must be >= 1")


class _Write(Stage):
    config_cls = WriteConfig
    inputs = {"src": Input("any upstream stage", required=False), "src2": Input("another one", required=False)}
    ignore_keys = ("sleep_s",)

    def metric_names(self) -> set[str]:
        return {"value", "files"}

    def run(self, ctx: StageContext) -> dict[str, float]:
        c = self.config
        t0 = time.time()
        total = c.value
        for role in ("src", "src2"):
            if role in ctx.inputs:
                total += json.loads((ctx.inputs[role] / "value.json").read_text())["value"]
        if c.src_dir:
            with open(os.path.join(c.src_dir, "value.json")) as f:
                total += json.load(f)["value"]
        if c.data:
            total += os.path.getsize(c.data)
        if c.corpus:
            from medvl.data.corpus import load_manifest
            total += load_manifest(c.corpus).rows()
        for i in range(c.files):
            (ctx.out / f"part-{i}.txt").write_text(f"{ctx.stage} {i} {total}\n" * 100)
            if i == 0:
                if os.environ.get("MEDVL_TEST_CRASH") == ctx.stage:
                    os.kill(os.getpid(), signal.SIGKILL)  # half-way: one file written, no marker
                if os.environ.get("MEDVL_TEST_FAIL") == ctx.stage:
                    raise RuntimeError("injected failure")
                time.sleep(c.sleep_s)
        (ctx.out / "value.json").write_text(json.dumps({"value": total}))
        if c.log:
            line = f"{ctx.stage} {ctx.key} {ctx.build_id} {os.getpid()} {t0:.3f} {time.time():.3f}\n"
            fd = os.open(c.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # one write: lines never interleave
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        return {"value": total, "files": float(c.files)}


@register_stage
class WriteKind(_Write):
    kind = "test_write"
    executor = "driver"
    needs_ray = False


@register_stage
class TaskKind(_Write):
    kind = "test_task"
    executor = "task"


def builds(log: str) -> list[dict]:
    """The build log as records."""
    if not os.path.exists(log):
        return []
    out = []
    for line in open(log).read().splitlines():
        stage, key, build, pid, t0, t1 = line.split()
        out.append({"stage": stage, "key": key, "build_id": build, "pid": int(pid), "start": float(t0),
                    "end": float(t1)})
    return out
