"""A durable metric journal: every metric is written to a local append-only file before MLflow sees it, and a
delivery cursor records what MLflow has acknowledged. An MLflow outage therefore never stops training and never
loses or duplicates a point.

    <run_root>/jobs/<run>/metrics.jsonl       one line per `log()` call: {"r": run id, "s": step, "t": ms, "m": {...}}
    <run_root>/jobs/<run>/metrics.delivered   byte offset up to which every line is in MLflow
    <run_root>/jobs/<run>/metrics.lock        serialises deliverers (the rank-0 worker, the driver, sync-metrics)

Why this is exactly-once: a line is only skipped once its batch was acknowledged (the cursor moves after
`log_batch` returns), and a batch re-sent after a crash between the acknowledgement and the cursor write carries
the same (key, step, timestamp, value), which MLflow's SQL store treats as the same point (its primary key) and
keeps once. MLflow's own asynchronous logging (`synchronous=False`) is not used: it queues in memory and loses the
queue with the process or after its retries.

    medvl sync-metrics jobs/digits_clip.yaml     # deliver what a run left in its journal (see track/sync.py)
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from medvl.redact import redact_text, redact_uri

log = logging.getLogger(__name__)

JOURNAL_FILE = "metrics.jsonl"
CURSOR_FILE = "metrics.delivered"
LOCK_FILE = "metrics.lock"
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
DELIVERY_INTERVAL_S = 1.0
"""Least time between two deliveries of a logger's journal (`MEDVL_METRIC_INTERVAL_S` overrides; 0 = one delivery
per logged window)."""


class MetricJournal:
    """The append-only journal of one run directory (shared by every process that logs into that run)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cursor_path = self.path.with_name(CURSOR_FILE)
        self.lock_path = self.path.with_name(LOCK_FILE)
        self._fd: Optional[int] = None

    # ------------------------------------------------------------------ writing
    def _open(self) -> int:
        if self._fd is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(fd).st_size
            if size:  # a writer killed mid-line left a fragment: end it, readers skip it
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        os.write(fd, b"\n")
            self._fd = fd
        return self._fd

    def append(self, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: Optional[int] = None) -> None:
        """One line, one `write` (O_APPEND): durable against the process dying (the OS has it); `sync()` makes it
        durable against the machine dying."""
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        line = json.dumps({"r": run_id, "s": int(step), "t": ts, "m": metrics}, separators=(",", ":")) + "\n"
        os.write(self._open(), line.encode())

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ reading
    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def delivered(self) -> int:
        try:
            return int(self.cursor_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def pending_bytes(self) -> int:
        return max(0, self.size() - self.delivered())

    def _set_delivered(self, offset: int) -> None:
        if offset <= self.delivered():
            return  # monotonic: a slower deliverer never moves it back
        tmp = self.cursor_path.with_name(f".{CURSOR_FILE}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(str(offset))
        os.replace(tmp, self.cursor_path)

    def pending(self) -> Iterator[tuple[int, dict]]:
        """(end offset, record) of every complete, undelivered line, in order; unreadable lines are skipped."""
        start = self.delivered()
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            f.seek(start)
            offset = start
            for raw in f:
                if not raw.endswith(b"\n"):
                    return  # a line still being written
                offset += len(raw)
                try:
                    rec = json.loads(raw)
                    if not isinstance(rec, dict) or not isinstance(rec.get("m"), dict):
                        raise ValueError("not a metric record")
                except ValueError:
                    log.warning("%s: skipping an unreadable line ending at byte %d", self.path, offset)
                    continue
                yield offset, rec

    def records(self) -> list[dict]:
        """Every readable record, delivered or not (for tests and reports)."""
        out = []
        if not self.path.exists():
            return out
        for raw in self.path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(raw)
                if isinstance(rec, dict) and isinstance(rec.get("m"), dict):
                    out.append(rec)
        return out

    @contextlib.contextmanager
    def lock(self, blocking: bool = True):
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ delivery
    def deliver(self, send: Callable[[str, list], None], blocking: bool = True) -> int:
        """Send every pending line through `send(run_id, [Metric, ...])` in order (at most 1000 metrics per call),
        moving the cursor after each acknowledged call; returns the number of metrics sent. Raises what `send`
        raises (the cursor then stays before the failed batch)."""
        from mlflow.entities import Metric
        sent = 0
        with self.lock(blocking) as got:
            if not got:
                return 0
            batch: list = []
            batch_run: Optional[str] = None
            batch_end = self.delivered()

            def flush() -> None:
                nonlocal batch, sent
                if batch:
                    send(batch_run, batch)
                    sent += len(batch)
                    batch = []
                self._set_delivered(batch_end)

            for end, rec in self.pending():
                metrics = [Metric(str(k), float(v), int(rec["t"]), int(rec["s"])) for k, v in rec["m"].items()
                           if isinstance(v, (int, float)) and v == v]
                if batch and (rec["r"] != batch_run or len(batch) + len(metrics) > MAX_METRICS_PER_BATCH):
                    flush()
                batch_run = rec["r"]
                batch.extend(metrics)
                batch_end = end
            flush()
        return sent


def make_sender(uri: str, fast: bool = True, timeout_s: float = 15.0) -> Callable[[str, list], None]:
    """`send(run_id, metrics)` for a tracking URI. `fast` (HTTP servers): one attempt per call with a short
    timeout instead of MLflow's 7 retries with exponential backoff (minutes), so the caller's own retry loop
    notices a server that is back within seconds."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    store = client._tracking_client.store
    if not (fast and uri.startswith(("http://", "https://")) and hasattr(store, "get_host_creds")):
        return lambda run_id, metrics: client.log_batch(run_id, metrics=metrics, synchronous=True)

    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.utils.proto_json_utils import message_to_json
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    def send(run_id: str, metrics: list) -> None:
        body = message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in metrics]))
        resp = http_request(store.get_host_creds(), "/api/2.0/mlflow/runs/log-batch", "POST", max_retries=0,
                            backoff_factor=0, timeout=timeout_s, json=json.loads(body))
        verify_rest_response(resp, "/api/2.0/mlflow/runs/log-batch")

    return send


class JournalLogger:
    """Metrics from one process into one MLflow run through the run's journal.

    `log` appends to the journal (no network) and wakes a background thread that delivers pending lines (at most
    once per `min_interval_s`, default `DELIVERY_INTERVAL_S`; `flush` and `close` deliver at once); while
    the server is unreachable the thread retries with backoff (1 s doubling to `max_backoff_s`), warns once, and
    says when the server is back and how much it delivered. Nothing here ever raises into training."""

    def __init__(self, uri: Optional[str], run_id: Optional[str], journal: Optional[str | os.PathLike] = None,
                 enabled: bool = True, max_backoff_s: float = 10.0, name: str = "rank 0",
                 min_interval_s: Optional[float] = None):
        self.enabled = bool(enabled and run_id and uri)
        self.uri, self.run_id, self.name = uri, run_id, name
        self._tmp = None
        if self.enabled and journal is None:  # no run directory: same mechanism, not durable across processes
            self._tmp = tempfile.mkdtemp(prefix="medvl-metrics-")
            journal = Path(self._tmp) / JOURNAL_FILE
        self.journal = MetricJournal(journal) if self.enabled else None
        self.max_backoff_s = max_backoff_s
        self.min_interval_s = float(os.environ.get("MEDVL_METRIC_INTERVAL_S", DELIVERY_INTERVAL_S)) \
            if min_interval_s is None else float(min_interval_s)
        self._now = threading.Event()  # set by flush/close: deliver now, without waiting for the interval
        self.down_since: Optional[float] = None
        self.outages: list[tuple[float, float]] = []
        """(start, end) wall times of the outages this logger saw (for the README's recovery figures)."""
        self.last_error: Optional[str] = None
        self._wake = threading.Event()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        if self.enabled:
            self._send = make_sender(uri)
            self._thread = threading.Thread(target=self._run, name="medvl-metric-delivery", daemon=True)
            self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and float(v) == float(v)}
        if clean:
            self.journal.append(self.run_id, clean, step)
            self._wake.set()

    # ------------------------------------------------------------------ the delivery thread
    def _deliver_once(self) -> bool:
        try:
            self.journal.deliver(self._send)
        except Exception as e:  # noqa: BLE001 - connection errors, 5xx, timeouts: all mean "later"
            self.last_error = redact_text(f"{type(e).__name__}: {e}")[:300]
            if self.down_since is None:
                self.down_since = time.time()
                print(f"medvl: MLflow at {redact_uri(self.uri)} is unreachable ({self.last_error}); {self.name} "
                      f"keeps training and buffers metrics in {self.journal.path}, delivering them when the server "
                      f"is back", file=sys.stderr, flush=True)
            return False
        if self.down_since is not None:
            self.outages.append((self.down_since, time.time()))
            print(f"medvl: MLflow at {redact_uri(self.uri)} is reachable again after {time.time() - self.down_since:.0f}s; "
                  f"buffered metrics delivered", file=sys.stderr, flush=True)
            self.down_since = None
        return True

    def _run(self) -> None:
        backoff = 1.0
        last = float("-inf")
        while not self._stop:
            self._wake.wait(timeout=backoff if self.down_since is not None else None)
            self._wake.clear()
            # Coalesce: at most one delivery per `min_interval_s` while training logs, so that an MLflow call (a
            # database transaction or an HTTP request, milliseconds of Python) does not run after every logged
            # window and take the GIL from the training thread; flush() and close() cut the wait short.
            rest = last + self.min_interval_s - time.monotonic()
            while rest > 0 and not (self._stop or self._now.is_set()):
                self._now.wait(timeout=rest)
                rest = last + self.min_interval_s - time.monotonic()
            if self._stop:
                break
            if self.journal.pending_bytes() == 0:
                continue
            last = time.monotonic()
            if self._deliver_once():
                backoff = 1.0
            else:
                backoff = min(backoff * 2, self.max_backoff_s)

    # ------------------------------------------------------------------ flush / close
    def flush(self, timeout: float = 0.0, wait_if_down: bool = False) -> bool:
        """Make the journal durable (fsync); then wait up to `timeout` s for delivery, but (unless `wait_if_down`)
        not while the server is down: the journal holds the metrics. Returns whether everything is delivered."""
        if not self.enabled:
            return True
        self.journal.sync()
        deadline = time.monotonic() + timeout
        self._now.set()
        self._wake.set()
        try:
            while self.journal.pending_bytes() and time.monotonic() < deadline and \
                    (wait_if_down or self.down_since is None):
                time.sleep(0.05)
        finally:
            self._now.clear()
        return self.journal.pending_bytes() == 0

    def close(self, timeout: float = 10.0) -> bool:
        """Flush, waiting up to `timeout` s even through an outage, then stop the delivery thread."""
        done = self.flush(timeout, wait_if_down=True)
        self._stop = True
        self._now.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=20)
        if not done and self.enabled:
            print(f"medvl: some metrics of run {self.run_id} are not in MLflow yet (server unreachable: "
                  f"{self.last_error}); they are kept in {self.journal.path} and delivered by the driver, the next "
                  f"run of this recipe, or `medvl sync-metrics {self.journal.path.parent}`", file=sys.stderr,
                  flush=True)
        if self.journal is not None:
            self.journal.close()
        return done
