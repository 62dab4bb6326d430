"""Where stage outputs live, and how they are published atomically.

    <cache root>/<stage>/<key>/                  a complete output: the stage's files + `_medvl_stage.json`
    <cache root>/<stage>/.building-<key>-<id>/   an output being written (local stores)
    <cache root>/<stage>/<key>.lock              the build lock of that key (file locks)

The cache root is `cache.root` of the pipeline recipe, default `<run_root>/stages`. The completion marker
`_medvl_stage.json` is the only proof that an output is complete; it records the key, the build id, the config
slice, the upstream output ids, the input fingerprints, the metrics, the MLflow run that built it, and the size
of every file of the output.

- **Local or shared file system** (a path): the stage writes into a `.building-*` directory beside the final
  one; the marker is written into it last, and one `rename` publishes it as `<key>/` (atomic on POSIX file
  systems, NFS included). A crash leaves only a `.building-*` directory, which the next builder of that key
  removes; a half-written output is never visible under its key.
- **Object stores and other fsspec URIs** (`s3://bucket/medvl/stages`, `gs://...`, `file:///...`): there is no
  rename, so the stage writes into a local temporary directory, the files are uploaded under `<key>/`, and the
  marker is uploaded last (the `_SUCCESS` convention of Hadoop and Spark). Files under a key without a marker are
  a half-written upload and are deleted before the key is rebuilt. Readers download an output into a local cache
  directory once (`$TMPDIR/medvl-stage-cache/`). `s3://` needs `s3fs` (fsspec's S3 file system) installed.

A marker whose listed files are missing (deleted behind it) is an error naming the first missing file: the output
is not silently rebuilt, because other runs may be reading it; `--force <stage>` rebuilds it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from medvl.pipelines.stage import PipelineError

MARKER = "_medvl_stage.json"
MARKER_FORMAT = "medvl-stage-output/1"


def _missing_error(stage: str, where: str, what: str) -> PipelineError:
    return PipelineError(f"stage '{stage}': output {where} is listed in its completion marker but {what} "
                         f"(deleted behind the marker?); rebuild it with --force {stage}")


class LocalStore:
    """Outputs on a local or shared (NFS) file system: aside directory + marker + rename."""

    remote = False

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({self.root})"

    def location(self, stage: str, key: str) -> str:
        return str(self.root / stage / key)

    def lock_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.lock"

    def read_marker(self, stage: str, key: str) -> Optional[dict]:
        p = self.root / stage / key / MARKER
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None  # a torn marker is no proof of completeness

    def verify(self, stage: str, key: str, marker: dict) -> None:
        d = self.root / stage / key
        for rel, size in (marker.get("files") or {}).items():
            p = d / rel
            if not p.is_file():
                raise _missing_error(stage, str(p), "does not exist")
            if p.stat().st_size != size:
                raise _missing_error(stage, str(p), f"has {p.stat().st_size} bytes instead of {size}")

    def partial(self, stage: str, key: str) -> list[str]:
        """Leftovers of interrupted builds of this key (aside directories; a final directory without marker)."""
        d = self.root / stage
        out = [str(p) for p in d.glob(f".building-{key}-*")] if d.is_dir() else []
        final = d / key
        if final.is_dir() and not (final / MARKER).is_file():
            out.append(str(final))
        return out

    def clean_partial(self, stage: str, key: str) -> list[str]:
        """Remove what `partial` lists (only called while holding the key's build lock)."""
        gone = self.partial(stage, key)
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        return gone

    def begin(self, stage: str, key: str, build_id: str) -> Path:
        aside = self.root / stage / f".building-{key}-{build_id}"
        aside.mkdir(parents=True, exist_ok=False)
        return aside

    def commit(self, stage: str, key: str, aside: Path, marker: dict, replace: bool = False) -> dict:
        """Publish `aside` as `<stage>/<key>/` with its marker; `replace` swaps out an existing output (--force)."""
        marker = dict(marker, files=_list_files(aside), format=MARKER_FORMAT)
        _write_json(aside / MARKER, marker)
        final = self.root / stage / key
        if final.exists():
            if not replace and (final / MARKER).is_file():
                shutil.rmtree(aside, ignore_errors=True)  # someone published it first: theirs stands
                return self.read_marker(stage, key) or marker
            old = self.root / stage / f".replaced-{key}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(aside, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(aside, final)  # [atomic] the output appears complete, or not at all
        return marker

    def abort(self, aside: Optional[Path]) -> None:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def local_path(self, stage: str, key: str, marker: dict) -> Path:
        return self.root / stage / key

    def history(self, stage: str) -> list[dict]:
        """Markers of every complete output of a stage, newest first."""
        d = self.root / stage
        out = []
        if d.is_dir():
            for m in d.glob(f"*/{MARKER}"):
                if m.parent.name.startswith("."):
                    continue
                try:
                    out.append(json.loads(m.read_text()))
                except (OSError, json.JSONDecodeError):
                    continue
        return sorted(out, key=lambda m: m.get("created", 0), reverse=True)


class FsspecStore:
    """Outputs on an object store (or any fsspec URI): local staging, upload, marker uploaded last."""

    remote = True

    def __init__(self, root: str):
        import fsspec
        self.uri = root.rstrip("/")
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.uri)
        except (ImportError, ValueError) as e:
            raise PipelineError(f"cache.root {root!r}: no file system for this URI ({e}); s3:// needs the "
                                f"s3fs package, gs:// gcsfs") from None
        self.base = self.base.rstrip("/")

    def __repr__(self) -> str:
        return f"FsspecStore({self.uri})"

    def _p(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def location(self, stage: str, key: str) -> str:
        return f"{self.uri}/{stage}/{key}"

    def lock_path(self, stage: str, key: str) -> Path:  # pragma: no cover - object stores use the Ray lock
        raise PipelineError("an object-store cache has no file locks; use cache.lock: ray")

    def read_marker(self, stage: str, key: str) -> Optional[dict]:
        try:
            return json.loads(self.fs.cat_file(self._p(stage, key, MARKER)))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None

    def _sizes(self, stage: str, key: str) -> dict[str, int]:
        root = self._p(stage, key)
        try:
            found = self.fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in found.items():
            rel = path[len(root.lstrip("/")) + 1:] if not path.startswith(root) else path[len(root) + 1:]
            out[rel] = int(info.get("size") or 0)
        return out

    def verify(self, stage: str, key: str, marker: dict) -> None:
        have = self._sizes(stage, key)
        for rel, size in (marker.get("files") or {}).items():
            where = f"{self.location(stage, key)}/{rel}"
            if rel not in have:
                raise _missing_error(stage, where, "does not exist")
            if have[rel] != size:
                raise _missing_error(stage, where, f"has {have[rel]} bytes instead of {size}")

    def partial(self, stage: str, key: str) -> list[str]:
        if self.read_marker(stage, key) is None and self._sizes(stage, key):
            return [self.location(stage, key)]
        return []

    def clean_partial(self, stage: str, key: str) -> list[str]:
        gone = self.partial(stage, key)
        if gone:
            self.fs.rm(self._p(stage, key), recursive=True)
        return gone

    def unpublish(self, stage: str, key: str) -> None:
        """Before a forced rebuild: remove the marker first (readers stop trusting the output), then the files."""
        marker = self._p(stage, key, MARKER)
        if self.fs.exists(marker):
            self.fs.rm(marker)
        if self.fs.exists(self._p(stage, key)):
            self.fs.rm(self._p(stage, key), recursive=True)

    def upload(self, stage: str, key: str, local: Path) -> dict[str, int]:
        """Upload a staged output's files under `<key>/` (no marker yet); returns their sizes."""
        files = _list_files(local)
        for rel in files:
            dest = self._p(stage, key, rel)
            self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(local / rel), dest)
        return files

    def publish(self, stage: str, key: str, marker: dict, files: dict[str, int]) -> dict:
        """Write the marker, last: from now on the output is complete."""
        marker = dict(marker, files=files, format=MARKER_FORMAT)
        self.fs.pipe_file(self._p(stage, key, MARKER), json.dumps(marker, indent=1, default=str).encode())
        return marker

    def abort(self, aside: Optional[Path]) -> None:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def local_path(self, stage: str, key: str, marker: dict) -> Path:
        """Download a complete output once into a local cache directory (named by key and build id)."""
        cache = Path(tempfile.gettempdir()) / "medvl-stage-cache" / stage / f"{key}-{marker.get('build_id', 'x')}"
        if (cache / MARKER).is_file():
            return cache
        tmp = cache.with_name(cache.name + f".part-{uuid.uuid4().hex[:6]}")
        tmp.mkdir(parents=True)
        for rel in marker.get("files") or {}:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._p(stage, key, rel), str(tmp / rel))
        _write_json(tmp / MARKER, marker)
        try:
            os.rename(tmp, cache)
        except OSError:  # another process downloaded it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        return cache

    def history(self, stage: str) -> list[dict]:
        out = []
        try:
            entries = self.fs.ls(self._p(stage), detail=False)
        except FileNotFoundError:
            return []
        for e in entries:
            name = e.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(".") or name.endswith(".lock"):
                continue
            m = self.read_marker(stage, name)
            if m:
                out.append(m)
        return sorted(out, key=lambda m: m.get("created", 0), reverse=True)


def open_store(root: str) -> LocalStore | FsspecStore:
    """A path (local or shared file system) -> LocalStore; a URI (s3://, gs://, file://, memory://) -> FsspecStore."""
    return FsspecStore(root) if "://" in root else LocalStore(root)


def _list_files(d: Path) -> dict[str, int]:
    return {p.relative_to(d).as_posix(): p.stat().st_size
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != MARKER}


def _write_json(p: Path, data: Any) -> None:
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, p)


def new_marker(**fields: Any) -> dict:
    return {"created": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **fields}


__all__ = ["LocalStore", "FsspecStore", "open_store", "MARKER", "new_marker"]
