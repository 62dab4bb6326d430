"""What a training command shows on the console: a live progress display on a terminal, plain periodic lines
otherwise (`ray job logs`, CI, a file), fed by the run's durable metric journal.

Rank 0 already writes every metric it logs to `<run_root>/jobs/<run>/metrics.jsonl` (`medvl.track.buffer`) before
MLflow sees it. The driver tails that file in a background thread, so the display costs the training step nothing:
no extra collective, no queue, no Ray call on the workers. What it shows:

    epoch 3/10  step 168/560  loss 1.9042  1204 samples/s  ETA 0:00:41
    epoch 3/10  eval  val/zero_shot_accuracy 0.8611  val/i2t_r@1 0.5389  ...

On a terminal (stdout is a TTY) the first kind is a `rich` progress bar that redraws in place and the eval lines
are printed above it. Elsewhere a progress line is printed at most every `MEDVL_PROGRESS_EVERY_S` seconds
(default 10) and at every epoch end. `MEDVL_PROGRESS=0` turns the display off; `MEDVL_PROGRESS=plain` forces the
plain lines on a terminal.

    from medvl.track.console import TrainProgress
    with TrainProgress(journal, run_id, total_steps=560, steps_per_epoch=56, epochs=10, batch_size=64):
        trainer.fit()
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

VERBOSE_ENV = "MEDVL_VERBOSE"
"""Set (to 1) by `medvl -v`: Ray's and MLflow's own output reaches the console as before."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _LibraryRecords:
    """A logging filter: drops records below ERROR that these packages' modules log."""

    def __init__(self, packages: tuple[str, ...]):
        self.parts = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

    def filter(self, record) -> bool:
        import logging
        return record.levelno >= logging.ERROR or not any(p in (record.pathname or "") for p in self.parts)


def quiet_libraries() -> None:
    """Without `-v`: the driver shows medvl's own output, not the INFO/WARNING chatter of the libraries under it
    (MLflow's model-logging and schema notes, Ray Train/Data/Tune's status lines, Python warnings these libraries
    raise about their own internals). Errors still print; `medvl -v` leaves everything as the libraries set it."""
    if verbose():
        return
    import logging
    import warnings
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # tqdm bars of artifact up/downloads
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # mlflow re-sets its loggers' level on import
    for name in ("mlflow", "alembic", "ray.train", "ray.data", "ray.tune", "open_clip", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # open_clip logs through the root logger (`logging.info`/`logging.warning`, e.g. "No pretrained weights
    # loaded ... initialized randomly" for every model medvl builds from scratch): drop those below ERROR
    logging.getLogger().addFilter(_LibraryRecords(("open_clip", "open_clip_train")))
    for mod in ("mlflow", "ray", "open_clip", "timm", "torch", "pydantic", "setuptools", "pkg_resources"):
        warnings.filterwarnings("ignore", module=rf"{mod}(\..*)?$")


def format_duration(seconds: Optional[float]) -> str:
    """H:MM:SS (or `?` when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_number(v: float) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"


def format_progress(epoch: int, epochs: int, step: int, total: int, loss: Optional[float],
                    samples_per_s: Optional[float], eta_s: Optional[float]) -> str:
    """The plain progress line: `epoch 3/10  step 168/560  loss 1.9042  1204 samples/s  ETA 0:00:41`."""
    parts = [f"epoch {epoch}/{epochs}", f"step {step}/{total}",
             f"loss {format_number(loss)}" if loss is not None else "loss -",
             f"{samples_per_s:.0f} samples/s" if samples_per_s is not None else "- samples/s",
             f"ETA {format_duration(eta_s)}"]
    return "  ".join(parts)


def _eval_rank(key: str) -> tuple[int, str]:
    """Headline metrics first: zero-shot accuracy, then recall@1 both ways, AUCs, the rest alphabetically."""
    k = key.lower()
    if k.endswith("zero_shot_accuracy"):
        return 0, key
    if k.endswith(("_r1", "r@1")):
        return 1, key
    if "auc" in k or k.endswith("accuracy"):
        return 2, key
    return 3, key


def format_eval(epoch: int, epochs: int, metrics: dict[str, float], limit: int = 4) -> str:
    """One line of held-out metrics: zero-shot accuracy and recall@1 first, at most `limit` of them (all of them
    are in MLflow)."""
    keys = sorted(metrics, key=_eval_rank)[:limit]
    more = len(metrics) - len(keys)
    body = "  ".join(f"{k} {format_number(float(metrics[k]))}" for k in keys)
    return f"epoch {epoch}/{epochs}  eval  {body}" + (f"  (+{more} more in MLflow)" if more > 0 else "")


class JournalTail:
    """New complete records of one run in a metric journal, from the byte offset it had when tailing began
    (a resumed run's earlier lines are not replayed)."""

    def __init__(self, path: str | os.PathLike, run_id: Optional[str], from_end: bool = True):
        self.path, self.run_id = Path(path), run_id
        self.offset = self.path.stat().st_size if from_end and self.path.exists() else 0
        self._partial = b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for its end
        out = []
        for raw in lines:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("m"), dict) and \
                    (self.run_id is None or rec.get("r") == self.run_id):
                out.append(rec)
        return out


class ProgressState:
    """Turns journal records into display events (pure: the formatting tests drive it without threads)."""

    def __init__(self, total_steps: int, steps_per_epoch: int, epochs: int, batch_size: int,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.spe, self.epochs, self.batch = total_steps, max(1, steps_per_epoch), epochs, batch_size
        self.clock = clock
        self.step = 0
        self.loss: Optional[float] = None
        self.sps: Optional[float] = None
        self._first: Optional[tuple[float, int]] = None  # (time, step) of the first progress seen
        self._last_eval_step = -1

    @property
    def epoch(self) -> int:
        """1-based epoch the current step belongs to (the last step of an epoch still counts to it)."""
        return min(self.epochs, max(1, math.ceil(self.step / self.spe))) if self.step else 1

    def eta(self) -> Optional[float]:
        left = self.total - self.step
        if left <= 0:
            return 0.0
        now = self.clock()
        if self._first is not None and self.step > self._first[1] and now > self._first[0]:
            return left * (now - self._first[0]) / (self.step - self._first[1])  # wall rate: includes evals
        return None  # not from the first window's samples/s: it includes the data pipeline's start

    def feed(self, rec: dict) -> list[tuple[str, str]]:
        """Events for one record: ("progress", line), ("epoch_end", line), ("eval", line), ("info", line)."""
        m, step = rec["m"], int(rec.get("s", 0))
        out: list[tuple[str, str]] = []
        if "train/resumed_from_step" in m:
            out.append(("info", f"resuming from the checkpoint at step {int(m['train/resumed_from_step'])}"))
        if "train/loss" in m or "train/samples_per_s" in m:
            if self._first is None:
                self._first = (self.clock(), step)
            self.step = max(self.step, step)
            self.loss = float(m["train/loss"]) if "train/loss" in m else self.loss
            self.sps = float(m["train/samples_per_s"]) if "train/samples_per_s" in m else self.sps
            kind = "epoch_end" if step % self.spe == 0 or step >= self.total else "progress"
            out.append((kind, self.line()))
        evals = {k: v for k, v in m.items() if k.startswith("val/") and isinstance(v, (int, float))}
        if evals and step != self._last_eval_step:
            self._last_eval_step = step
            self.step = max(self.step, step)
            out.append(("eval", format_eval(self.epoch, self.epochs, evals)))
        return out

    def line(self) -> str:
        return format_progress(self.epoch, self.epochs, self.step, self.total, self.loss, self.sps, self.eta())


def display_mode(stream: Optional[TextIO] = None) -> str:
    """`rich` on a terminal, `plain` elsewhere, `off` with MEDVL_PROGRESS=0."""
    stream = sys.stdout if stream is None else stream
    want = os.environ.get("MEDVL_PROGRESS", "").lower()
    if want in ("0", "off", "false", "no"):
        return "off"
    if want == "plain":
        return "plain"
    try:
        return "rich" if stream.isatty() else "plain"
    except (AttributeError, ValueError):
        return "plain"


class WorkerMessages:
    """medvl's own messages from Ray's worker log files (`medvl: ...` lines: an MLflow outage, a resume, a rank
    that ran out of rows), which `log_to_driver=False` keeps off the console otherwise. Files that exist when it
    starts are read from their end (earlier runs of the session); new files from their start."""

    PREFIX = "medvl: "

    def __init__(self, logs_dir: str | os.PathLike):
        self.dir = Path(logs_dir)
        self.offsets: dict[str, int] = {}
        for f in self._files():
            try:
                self.offsets[str(f)] = f.stat().st_size
            except OSError:  # a file that went away meanwhile
                pass
        self._last: Optional[str] = None

    def _files(self) -> list[Path]:
        try:
            return sorted(self.dir.glob("worker-*.out")) + sorted(self.dir.glob("worker-*.err"))
        except OSError:
            return []

    def read(self) -> list[str]:
        out = []
        for f in self._files():
            key = str(f)
            try:
                size = f.stat().st_size
                start = self.offsets.get(key, 0)
                if size <= start:
                    continue
                with open(f, "rb") as fh:
                    fh.seek(start)
                    chunk = fh.read(size - start)
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1  # whole lines only; the rest is read next time
            self.offsets[key] = start + end
            for raw in chunk[:end].decode(errors="replace").splitlines():
                line = raw.rstrip()
                if line.startswith(self.PREFIX) and line != self._last:
                    self._last = line
                    out.append(line)
        return out


class TrainProgress:
    """Context manager: tails the journal in a daemon thread while the body (`trainer.fit()`) runs, and echoes
    medvl's own messages from the workers' log files (`logs_dir`)."""

    def __init__(self, journal: str | os.PathLike, run_id: Optional[str], total_steps: int, steps_per_epoch: int,
                 epochs: int, batch_size: int, label: str = "", stream: Optional[TextIO] = None,
                 poll_s: float = 0.5, every_s: Optional[float] = None,
                 logs_dir: Optional[str | os.PathLike] = None):
        self.messages = WorkerMessages(logs_dir) if logs_dir else None
        self.tail = JournalTail(journal, run_id)
        self.state = ProgressState(total_steps, steps_per_epoch, epochs, batch_size)
        stream = sys.stdout if stream is None else stream  # at run time: sys.stdout may have been redirected
        self.label, self.stream, self.poll_s = label, stream, poll_s
        self.every_s = float(os.environ.get("MEDVL_PROGRESS_EVERY_S", 10)) if every_s is None else every_s
        self.mode = display_mode(stream)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._rich = self._task = None
        self._last_print = -math.inf

    # ------------------------------------------------------------------ output
    def _print(self, text: str) -> None:
        text = f"[{self.label}] {text}" if self.label else text
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def _handle(self, kind: str, line: str) -> None:
        if self._rich is not None and kind in ("progress", "epoch_end"):
            s = self.state
            self._rich.update(self._task, completed=s.step,
                              description=f"epoch {s.epoch}/{s.epochs}",
                              stats=f"loss {format_number(s.loss) if s.loss is not None else '-'}  "
                                    f"{s.sps or 0:.0f} samples/s")
            return
        if kind == "progress":
            now = time.monotonic()
            if now - self._last_print < self.every_s:
                return
            self._last_print = now
        elif kind == "epoch_end":
            self._last_print = time.monotonic()
        self._print(line)

    def poll(self) -> None:
        if self.messages is not None:
            for line in self.messages.read():
                self._print(line)
        if self.mode == "off":
            return
        for rec in self.tail.read():
            for kind, line in self.state.feed(rec):
                self._handle(kind, line)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the display never takes the training down
                pass

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "TrainProgress":
        if self.mode == "off" and self.messages is None:
            return self
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[stats]}"), TextColumn("ETA"), TimeRemainingColumn(),
                                  transient=False)
            self._rich.start()
            self._task = self._rich.add_task(f"epoch 1/{self.state.epochs}", total=self.state.total, stats="")
        self._thread = threading.Thread(target=self._loop, name="medvl-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.poll()  # what rank 0 wrote last (the final epoch's eval)
        except Exception:  # noqa: BLE001
            pass
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


def sweep_line(counts: dict[str, int], total: int, metric: str, best: Optional[float], best_trial: Optional[str],
               elapsed_s: float) -> str:
    """`trials 3/8 done (1 stopped early, 0 errored), 2 running  best val/zero_shot_accuracy 0.9120 (trial ab12)`."""
    done = counts.get("done", 0) + counts.get("stopped", 0) + counts.get("errored", 0)
    head = (f"trials {done}/{total} done ({counts.get('stopped', 0)} stopped early, {counts.get('errored', 0)} "
            f"errored), {counts.get('running', 0)} running")
    tail = f"best {metric} {format_number(best)} (trial {best_trial})" if best is not None else f"best {metric} -"
    return f"{head}  {tail}  [{format_duration(elapsed_s)}]"


__all__ = ["quiet_libraries", "TrainProgress", "ProgressState", "JournalTail", "format_progress", "format_eval", "format_duration",
           "sweep_line", "display_mode", "verbose", "VERBOSE_ENV"]
