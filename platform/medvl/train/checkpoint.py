"""Training checkpoints that are safe to load: written atomically with a checksum, verified before use, loaded
without arbitrary unpickling, found through Ray Train's registry (never by globbing directories).

A checkpoint directory holds
    state.pt             model, optimizer, scheduler, AMP scaler, method state, step/epoch, every rank's data
                         position and RNG states (tensors and plain values only: `torch.load(weights_only=True)`)
    position.json        the step and data positions, readable without torch
    medvl_checkpoint.json   written last: format, step, and the sha256 + size of every file above. A directory
                         without it is incomplete; a file whose checksum differs is corrupt.

Rank 0 writes it into a scratch directory (`runtime.scratch_dir`, default the system temp dir), Ray Train copies
it to the run's storage (`ray.train.report`) and registers it in its checkpoint-manager snapshot
(`<storage>/<run>/checkpoint_manager_snapshot.json`); the scratch copy is deleted right after. On (re)start the
worker verifies the checkpoint Ray hands it and, if that one is corrupt, falls back to the newest registered
checkpoint that verifies, with a warning naming the corrupt one. `medvl eval` uses the same registry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from medvl.models.factory import UnsafeFileError, load_tensors

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
POSITION_FILE = "position.json"
MANIFEST_FILE = "medvl_checkpoint.json"
FORMAT = "medvl-checkpoint"
VERSION = 2
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
SCRATCH_PREFIX = "medvl-ckpt-"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or unsafe; the message names the directory and the reason."""


# --------------------------------------------------------------------------- writing and verifying


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write aside, flush to disk, then rename: a crash leaves either the old file or the complete new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_checkpoint(directory: str | Path, state: dict[str, Any], position: dict[str, Any]) -> Path:
    """Write a complete checkpoint into `directory` (state, position, then the checksummed manifest)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _write_atomic(d / STATE_FILE, lambda f: torch.save(state, f))
    _write_atomic(d / POSITION_FILE, lambda f: json.dump(position, f), mode="w")
    files = {name: {"sha256": _sha256(d / name), "bytes": (d / name).stat().st_size}
             for name in (STATE_FILE, POSITION_FILE)}
    manifest = {"format": FORMAT, "version": VERSION, "step": position.get("step"), "files": files}
    _write_atomic(d / MANIFEST_FILE, lambda f: json.dump(manifest, f, indent=1), mode="w")
    return d


def verify_checkpoint(directory: str | Path) -> dict:
    """Check that the checkpoint is complete and every file matches its checksum; return its manifest."""
    d = Path(directory)
    mf = d / MANIFEST_FILE
    if not mf.is_file():
        raise CheckpointError(f"{d}: incomplete checkpoint (no {MANIFEST_FILE}: it was not written to the end, or "
                              f"by a medvl from before checksummed checkpoints)")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{d}: unreadable {MANIFEST_FILE} ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{d}: {MANIFEST_FILE} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, meta in files.items():
        p = d / name
        if not p.is_file():
            raise CheckpointError(f"{d}: {name} is missing")
        if p.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{d}: {name} has {p.stat().st_size} bytes, the checksum manifest says "
                                  f"{meta['bytes']} (truncated or overwritten)")
        if _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{d}: {name} does not match its sha256 checksum (corrupt)")
    return manifest


def load_checkpoint(directory: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify, then load the state with `weights_only=True` (clear errors for corrupt or unsafe files)."""
    d = Path(directory)
    verify_checkpoint(d)
    try:
        state = load_tensors(d / STATE_FILE, map_location=map_location)
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError / EOFError / zip errors
        raise CheckpointError(f"{d / STATE_FILE}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{d / STATE_FILE}: not a medvl checkpoint (no model state)")
    return state


# --------------------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, numpy's global, Python's) as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "gauss": float(gauss)},
           "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                      "gauss": py_gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].cpu().tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --------------------------------------------------------------------------- Ray Train's registry


@dataclass
class Registered:
    """A checkpoint registered in Ray Train's checkpoint-manager snapshot."""
    name: str
    step: int
    index: int
    """Order of registration (later = newer)."""


def read_snapshot(text: str) -> list[Registered]:
    """The registered checkpoints of a snapshot's JSON, newest first (by step, then registration order)."""
    try:
        snap = json.loads(text)
    except ValueError:
        return []
    out: dict[str, Registered] = {}
    results = snap.get("checkpoint_results") or []
    indices = snap.get("checkpoint_report_indices") or list(range(len(results)))
    latest = snap.get("latest_checkpoint_result")
    pairs = list(zip(results, indices)) + ([(latest, max(indices, default=0) + 1)] if latest else [])
    for res, idx in pairs:
        name = res.get("checkpoint_dir_name")
        if not name:
            continue
        step = res.get("metrics", {}).get("step")
        if step is None:
            m = re.search(r"step=(\d+)", name)
            step = int(m.group(1)) if m else -1
        if name not in out or out[name].index < idx:
            out[name] = Registered(name, int(step), int(idx))
    return sorted(out.values(), key=lambda r: (r.step, r.index), reverse=True)


def registered_checkpoints(storage_dir: str | Path) -> list[Registered]:
    """Registered checkpoints of a run's local storage directory (`<run_root>/ray/<run name>`), newest first."""
    p = Path(storage_dir) / SNAPSHOT_FILE
    try:
        return read_snapshot(p.read_text())
    except OSError:
        return []


def latest_valid_checkpoint(storage_dir: str | Path) -> tuple[Optional[Path], list[tuple[str, str]]]:
    """The newest registered checkpoint that verifies, and the (name, reason) of the newer ones that did not."""
    bad: list[tuple[str, str]] = []
    for r in registered_checkpoints(storage_dir):
        d = Path(storage_dir) / r.name
        try:
            verify_checkpoint(d)
            return d, bad
        except CheckpointError as e:
            bad.append((r.name, str(e)))
    return None, bad


def choose_checkpoint(candidates: Iterable[tuple[str, Callable[[], Any]]]) -> tuple[Optional[str], Any,
                                                                                     list[tuple[str, str]]]:
    """The first candidate whose `open()` (a context manager yielding a local directory) verifies: returns
    (its name, the open context, the rejected (name, reason) pairs before it)."""
    bad = []
    for name, open_dir in candidates:
        try:
            with open_dir() as d:
                verify_checkpoint(d)
            return name, open_dir, bad
        except (CheckpointError, OSError, FileNotFoundError) as e:
            bad.append((name, str(e)))
    return None, None, bad


def position_of(directory: str | Path) -> Optional[dict]:
    try:
        return json.loads((Path(directory) / POSITION_FILE).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- scratch directories


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]


def scratch_root(scratch_dir: Optional[str]) -> Path:
    root = Path(scratch_dir).expanduser() if scratch_dir else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return root


def scratch_prefix(run_name: str, storage: str) -> str:
    """`medvl-ckpt-<run name>-<hash of the run's storage>-`: two runs with the same name in different run roots
    (two users of one machine) never touch each other's scratch checkpoints."""
    return f"{SCRATCH_PREFIX}{_safe(run_name)}-{hashlib.sha256(str(storage).encode()).hexdigest()[:8]}-"


def new_scratch_dir(scratch_dir: Optional[str], run_name: str, storage: str = "") -> Path:
    """A fresh directory for one checkpoint of the run (deleted once Ray Train has persisted it)."""
    return Path(tempfile.mkdtemp(prefix=scratch_prefix(run_name, storage), dir=scratch_root(scratch_dir)))


def clean_scratch(scratch_dir: Optional[str], run_name: str, storage: str = "") -> int:
    """Remove this run's scratch checkpoints left on this node by a process that was killed while writing
    or persisting one; returns how many."""
    root = scratch_root(scratch_dir)
    n = 0
    for d in root.glob(f"{scratch_prefix(run_name, storage)}*"):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def checkpoint_dir_name(step: int, exists: Callable[[str], bool]) -> str:
    """`checkpoint_step=0000040`, or with a suffix when that name is taken in storage (a run that fell back to
    an older checkpoint re-trains steps whose old, corrupt, checkpoint is still registered: writing into it
    would mix the two, and Ray would later delete the new one when it rotates the old one out)."""
    base = f"checkpoint_step={step:07d}"
    if not exists(base):
        return base
    k = 1
    while exists(f"{base}.{k}"):
        k += 1
    return f"{base}.{k}"
