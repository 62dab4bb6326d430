"""Build locks: two runs that need the same stage key build it once; the other waits, then reuses it.

The runner checks for a complete output first (no lock needed to reuse), takes the key's lock only to build,
and checks again once it holds the lock (the run it waited for may have built it meanwhile). Two lock services:

- `FileLock` (`cache.lock: file`; the default for a cache on a local or shared file system): the lock is a file
  `<stage>/<key>.lock` created with `O_CREAT | O_EXCL` (atomic on local file systems and on NFSv3+), holding the
  holder's host, boot id, pid and start time. It works across processes, across separate Ray clusters and across
  nodes that share the file system. While it builds, the holder touches the file every `stale_lock_s / 4`
  seconds.
- `RayLock` (`cache.lock: ray`; the default for an object-store cache, `s3://...`, where files cannot be created
  exclusively): a named, detached Ray actor (`medvl-stage-locks` in namespace `medvl`) keeps the table of held
  keys for everything connected to that Ray cluster (Tune trials, jobs submitted with `medvl submit`, several
  `medvl pipeline` drivers with `RAY_ADDRESS`). Holders send heartbeats; if the actor restarts, the next heartbeat
  of each live holder re-registers its key.

A holder that died leaves a *stale* lock, which a waiter breaks: at once when the holder ran on the same host and
its pid is gone; otherwise when the lock saw no heartbeat for `cache.stale_lock_s` seconds (a dead node, a killed
container). The waiter then cleans the half-written output and builds it itself. Breaking is race-free: the lock
file is renamed away (only one waiter can win the rename), and a waiter that finds it renamed a fresh lock by
mistake puts it back.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from medvl.pipelines.stage import PipelineError


class LockTimeout(PipelineError):
    """Waited `cache.wait_timeout_s` for another run to finish building a stage."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


HOST = socket.gethostname()
BOOT = _boot_id()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_info(what: str) -> dict:
    return {"host": HOST, "boot_id": BOOT, "pid": os.getpid(), "started": time.time(), "what": what,
            "owner": uuid.uuid4().hex}


def describe_holder(info: Optional[dict]) -> str:
    if not info:
        return "another run"
    age = time.time() - float(info.get("started", time.time()))
    return f"{info.get('what') or 'another run'} (pid {info.get('pid')} on {info.get('host')}, for {age:.0f}s)"


class _Heartbeat:
    def __init__(self, beat: Callable[[], None], every_s: float):
        self._stop = threading.Event()
        self._beat, self._every = beat, max(0.2, every_s)
        self._t = threading.Thread(target=self._loop, name="medvl-lock-heartbeat", daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - a missed beat only risks the lock being judged stale later
                pass

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)


class BuildLock:
    """Context manager: `with lock:` blocks until held (breaking stale locks); `on_wait(holder)` is called once
    when another holder is found."""

    def __init__(self, name: str, what: str, stale_s: float = 120.0, timeout_s: Optional[float] = None,
                 poll_s: float = 0.5, on_wait: Optional[Callable[[dict], None]] = None,
                 on_stale: Optional[Callable[[str], None]] = None):
        self.name, self.stale_s, self.timeout_s, self.poll_s = name, stale_s, timeout_s, poll_s
        self.info = holder_info(what)
        self.on_wait, self.on_stale = on_wait, on_stale
        self.waited = False
        self.broke_stale: Optional[str] = None
        self._hb: Optional[_Heartbeat] = None

    def _try(self) -> tuple[bool, Optional[dict]]:  # abstract: (acquired, current holder)
        raise NotImplementedError

    def _beat(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def acquire(self) -> "BuildLock":
        t0 = time.monotonic()
        while True:
            ok, holder = self._try()
            if ok:
                self._hb = _Heartbeat(self._beat, self.stale_s / 4)
                return self
            if not self.waited:
                self.waited = True
                if self.on_wait:
                    self.on_wait(holder or {})
            if self.timeout_s is not None and time.monotonic() - t0 > self.timeout_s:
                raise LockTimeout(f"waited {self.timeout_s:.0f}s for {describe_holder(holder)} to build "
                                  f"{self.name} (cache.wait_timeout_s)")
            time.sleep(self.poll_s)

    def release(self) -> None:
        if self._hb is not None:
            self._hb.stop()
            self._hb = None
        self._release()

    def __enter__(self) -> "BuildLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _stale(self, reason: str) -> None:
        self.broke_stale = reason
        if self.on_stale:
            self.on_stale(reason)


class FileLock(BuildLock):
    """An O_EXCL lock file with heartbeats (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, what: str, **kw):
        super().__init__(str(path), what, **kw)
        self.path = Path(path)

    def _read(self, p: Optional[Path] = None) -> Optional[dict]:
        try:
            return json.loads((p or self.path).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _try(self) -> tuple[bool, Optional[dict]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            return True, None
        holder = self._read()
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False, holder  # released meanwhile: retry at once on the next poll
        reason = None
        if holder and holder.get("host") == HOST and holder.get("boot_id") == BOOT \
                and not pid_alive(int(holder.get("pid", -1))):
            reason = f"its holder (pid {holder.get('pid')} on this host) is gone"
        elif age > self.stale_s:
            reason = f"no heartbeat for {age:.0f}s (> cache.stale_lock_s={self.stale_s:g}) from {describe_holder(holder)}"
        if reason and self._break(holder):
            self._stale(reason)
            return self._try()
        return False, holder

    def _break(self, judged: Optional[dict]) -> bool:
        grave = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, grave)  # only one waiter wins this rename
        except FileNotFoundError:
            return True  # someone else broke (or released) it: try to take it
        took = self._read(grave)
        if judged is not None and took is not None and took.get("owner") != judged.get("owner"):
            try:  # we renamed a fresh lock created after our check: put it back (unless yet another exists)
                os.link(grave, self.path)
            except FileExistsError:
                pass
            os.unlink(grave)
            return False
        os.unlink(grave)
        return True

    def _beat(self) -> None:
        cur = self._read()
        if cur is not None and cur.get("owner") == self.info["owner"]:
            os.utime(self.path)

    def _release(self) -> None:
        cur = self._read()
        if cur is not None and cur.get("owner") == self.info["owner"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


LOCK_ACTOR = "medvl-stage-locks"
LOCK_NAMESPACE = "medvl"


_SERVICE_CLS = None


def _lock_service():
    global _SERVICE_CLS
    if _SERVICE_CLS is None:
        _SERVICE_CLS = _define_service()
    # "DEFAULT": never inside a Tune trial's placement group, which goes away with the trial
    return _SERVICE_CLS.options(name=LOCK_ACTOR, namespace=LOCK_NAMESPACE, lifetime="detached",
                                get_if_exists=True, scheduling_strategy="DEFAULT").remote()


def _define_service():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class StageLockService:
        """The table of held stage keys for one Ray cluster."""

        def __init__(self):
            self.locks: dict[str, dict] = {}

        def try_acquire(self, name: str, info: dict, ttl: float):
            now = time.time()
            cur = self.locks.get(name)
            stale = None
            if cur is not None and cur["info"]["owner"] != info["owner"]:
                if now - cur["beat"] <= cur["ttl"]:
                    return False, cur["info"], None
                stale = (f"no heartbeat for {now - cur['beat']:.0f}s (> cache.stale_lock_s={cur['ttl']:g}) from "
                         f"{describe_holder(cur['info'])}")
            self.locks[name] = {"info": info, "beat": now, "ttl": ttl}
            return True, None, stale

        def heartbeat(self, name: str, info: dict, ttl: float) -> bool:
            cur = self.locks.get(name)
            if cur is None or cur["info"]["owner"] == info["owner"]:
                self.locks[name] = {"info": info, "beat": time.time(), "ttl": ttl}
                return True
            return False

        def release(self, name: str, owner: str) -> bool:
            cur = self.locks.get(name)
            if cur is not None and cur["info"]["owner"] == owner:
                del self.locks[name]
                return True
            return False

        def held(self) -> dict:
            return {k: v["info"] for k, v in self.locks.items()}

    return StageLockService


class RayLock(BuildLock):
    """A lock held in the cluster's named lock actor (see the module docstring)."""

    def __init__(self, name: str, what: str, **kw):
        super().__init__(name, what, **kw)
        import ray
        if not ray.is_initialized():
            raise PipelineError("cache.lock: ray needs a Ray cluster (connect first)")
        self.service = _lock_service()

    def _try(self) -> tuple[bool, Optional[dict]]:
        import ray
        ok, holder, stale = ray.get(self.service.try_acquire.remote(self.name, self.info, self.stale_s))
        if ok and stale:
            self._stale(stale)
        return ok, holder

    def _beat(self) -> None:
        import ray
        ray.get(self.service.heartbeat.remote(self.name, self.info, self.stale_s))

    def _release(self) -> None:
        import ray
        try:
            ray.get(self.service.release.remote(self.name, self.info["owner"]))
        except Exception:  # noqa: BLE001 - the cluster is going away: the lock goes with it
            pass


__all__ = ["BuildLock", "FileLock", "RayLock", "LockTimeout", "pid_alive", "describe_holder"]
