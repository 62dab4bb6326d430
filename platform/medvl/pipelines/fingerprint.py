"""Cache keys and input fingerprints.

key = sha256(stage name, kind + code version, config slice, upstream output ids, input fingerprints)[:20]

An upstream's *output id* is `<its key>:<its build id>` (the build id is a fresh uuid written into the completion
marker each time the stage is built), so a stage re-run with `--force` gives every stage below it a new key
without any of their own settings changing, while a stage that was only reused keeps theirs (Hugging Face
Datasets chains fingerprints the same way).

Fingerprints (what is hashed for an input that is not another stage):

- **corpus** (`medvl ingest` output): the bytes of `manifest.json`, plus for every shard it lists its path, size
  and modification time (`cache.corpus_fingerprint: stat`, the default: shards can be terabytes), or its content
  hash (`content`: exact, reads every byte once per process). Re-ingesting a corpus therefore changes the key even
  when the rows are identical (a rebuild, never a wrong reuse); editing a shard in place *without* changing its
  size or mtime is the one change `stat` does not see. On an object store (`s3://...`) size + ETag/mtime from
  fsspec stand in for the stat.
- **file** (checkpoints, weights, label lists): a sha256 of the content, memoised per process by (path, size,
  mtime) so a large checkpoint is read once. A directory hashes every file in it (relative path + content).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

KEY_LEN = 20
_FILE_MEMO: dict[tuple, str] = {}


def _numbers(obj: Any) -> Any:
    """A whole float as an int (256.0 -> 256): a float field's default written as `256` in a dataclass and the same
    value read back from a YAML/JSON dict as 256.0 (a sweep trial's pipeline) must give one key."""
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_numbers(v) for v in obj]
    return obj


def canonical(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace, whole floats as ints); non-JSON values by their str()."""
    return json.dumps(_numbers(obj), sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=True)


def stage_key(stage: str, code_version: str, config: dict, upstream: dict[str, str],
              fingerprints: dict[str, str]) -> str:
    payload = {"stage": stage, "code": code_version, "config": config, "upstream": upstream,
               "fingerprints": fingerprints}
    return hashlib.sha256(canonical(payload).encode()).hexdigest()[:KEY_LEN]


def _is_uri(p: str) -> bool:
    return "://" in p and not p.startswith("file://")


def file_sha256(path: str | os.PathLike) -> str:
    p = str(path)
    st = os.stat(p)
    memo = (os.path.realpath(p), st.st_size, st.st_mtime_ns)
    hit = _FILE_MEMO.get(memo)
    if hit:
        return hit
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    _FILE_MEMO[memo] = h.hexdigest()
    return _FILE_MEMO[memo]


def _remote_stat(uri: str) -> dict:
    import fsspec
    fs, path = fsspec.core.url_to_fs(uri)
    info = fs.info(path)
    return {k: str(info.get(k)) for k in ("size", "ETag", "etag", "md5", "mtime", "LastModified", "last_modified")
            if info.get(k) is not None}


def file_fingerprint(path: str) -> str:
    """Content hash of a file or of a directory's files; raises FileNotFoundError naming the path."""
    if _is_uri(path):
        return "remote:" + canonical(_remote_stat(path))
    p = Path(path.removeprefix("file://"))
    if p.is_file():
        return "sha256:" + file_sha256(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}\0{file_sha256(f)}\n".encode())
        return "dir-sha256:" + h.hexdigest()
    raise FileNotFoundError(f"{p}: file not found")


def corpus_fingerprint(corpus: str, mode: str = "stat") -> str:
    """Manifest bytes + each listed shard's (path, size, mtime) or content hash; errors name the missing file."""
    from medvl.data.corpus import CorpusError, load_manifest, manifest_path
    if _is_uri(corpus):
        import fsspec
        mp = corpus.rstrip("/") + ("" if corpus.endswith(".json") else "/manifest.json")
        try:
            with fsspec.open(mp, "rb") as f:
                manifest_bytes = f.read()
        except FileNotFoundError:
            raise CorpusError(f"{mp}: corpus manifest not found") from None
        shards = json.loads(manifest_bytes).get("shards", [])
        root = mp.rsplit("/", 1)[0]
        parts = [hashlib.sha256(manifest_bytes).hexdigest()]
        for s in shards:
            uri = f"{root}/{s['path']}"
            try:
                parts.append(f"{s['path']}:{canonical(_remote_stat(uri))}")
            except FileNotFoundError:
                raise CorpusError(f"{uri}: shard listed in {mp} does not exist") from None
        return "corpus:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()
    mp = manifest_path(corpus)
    manifest = load_manifest(corpus)  # CorpusError names the manifest when it is missing or malformed
    h = hashlib.sha256(mp.read_bytes())
    for s in manifest.shards:
        sp = mp.parent / s.path
        try:
            st = sp.stat()
        except FileNotFoundError:
            raise CorpusError(f"{sp}: shard listed in {mp} does not exist") from None
        if mode == "content":
            h.update(f"{s.path}\0{file_sha256(sp)}\n".encode())
        else:
            h.update(f"{s.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"corpus-{mode}:" + h.hexdigest()


__all__ = ["stage_key", "canonical", "file_fingerprint", "corpus_fingerprint", "file_sha256", "KEY_LEN"]
