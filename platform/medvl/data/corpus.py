"""The medvl corpus format: sharded Parquet + `manifest.json`.

    <corpus>/manifest.json        schema version, source, splits, shard list with row counts, label names
    <corpus>/shards/<split>-NNNNN.parquet
    <corpus>/rejects.jsonl        rows ingest refused, one JSON object each (file, row, field, reason)

Columns (see `SCHEMA`): `sample_id` str, `image` bytes (encoded PNG/JPEG/...; or null with `image_uri` set),
`image_uri` str (file path or object-store URI), `texts` list<str> (captions / report sections),
`study_id` str, `view` str, `labels` map<str, float> (per-class values), `split` str; optional (absent in older
corpora): `patient_id` str (splits group by it), `other_images` list<struct<image bytes, image_uri str, view str,
image_id str>> (the study's further images when a row is a study with several views: chest X-ray ingest).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
FORMAT_NAME = "medvl-corpus"

OTHER_IMAGE = pa.struct([pa.field("image", pa.binary()), pa.field("image_uri", pa.string()),
                         pa.field("view", pa.string()), pa.field("image_id", pa.string())])
"""One further image of a study row (bytes or a URI, its view, its source id)."""

SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("image", pa.binary()),
    pa.field("image_uri", pa.string()),
    pa.field("texts", pa.list_(pa.string())),
    pa.field("study_id", pa.string()),
    pa.field("view", pa.string()),
    pa.field("labels", pa.map_(pa.string(), pa.float32())),
    pa.field("split", pa.string()),
    pa.field("patient_id", pa.string()),
    pa.field("other_images", pa.list_(OTHER_IMAGE)),
])
REQUIRED_FIELDS = ("sample_id", "texts", "split")


class CorpusError(ValueError):
    """A corpus, manifest or shard is malformed; the message names the file and field."""


@dataclass
class Shard:
    path: str
    """Relative to the corpus directory."""
    split: str
    rows: int


@dataclass
class Manifest:
    source: str
    shards: list[Shard] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT_NAME
    created_by: str = "medvl ingest"
    label_field: Optional[str] = None
    """The `labels` key that holds the class index for zero-shot eval (single-label corpora)."""
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    rejected: int = 0
    text_kind: str = "captions"
    """What `texts` hold: `captions` (alternative captions), `report` (sections of one report: findings,
    impression, ...) or `labels` (a summary written from the labels; methods may build their own text from
    `labels`, as CXR-CLIP does)."""

    def rows(self, split: Optional[str] = None) -> int:
        return sum(s.rows for s in self.shards if split is None or s.split == split)

    @property
    def splits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shards:
            out[s.split] = out.get(s.split, 0) + s.rows
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["splits"] = self.splits
        d["num_rows"] = self.rows()
        return d


def manifest_path(corpus: str | os.PathLike) -> Path:
    p = Path(corpus)
    return p if p.name.endswith(".json") else p / "manifest.json"


def load_manifest(corpus: str | os.PathLike) -> Manifest:
    mp = manifest_path(corpus)
    if not mp.is_file():
        raise CorpusError(f"{mp}: corpus manifest not found (run `medvl ingest` to create a corpus)")
    try:
        d = json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise CorpusError(f"{mp}: not valid JSON ({e})") from None
    if d.get("format") != FORMAT_NAME:
        raise CorpusError(f"{mp}: field 'format' must be {FORMAT_NAME!r}, got {d.get('format')!r}")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise CorpusError(f"{mp}: field 'schema_version' is {d.get('schema_version')!r}; this medvl reads "
                          f"version {SCHEMA_VERSION}")
    try:
        shards = [Shard(**s) for s in d.get("shards", [])]
    except TypeError as e:
        raise CorpusError(f"{mp}: field 'shards' has a malformed entry ({e})") from None
    known = {k for k in Manifest.__dataclass_fields__}
    kw = {k: v for k, v in d.items() if k in known and k != "shards"}
    return Manifest(shards=shards, **kw)


def write_manifest(corpus: str | os.PathLike, manifest: Manifest) -> Path:
    mp = manifest_path(corpus)
    tmp = mp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2))
    os.replace(tmp, mp)
    return mp


def shard_paths(corpus: str | os.PathLike, split: Optional[str]) -> list[str]:
    m = load_manifest(corpus)
    root = manifest_path(corpus).parent
    paths = [str(root / s.path) for s in m.shards if split is None or s.split == split]
    if not paths:
        raise CorpusError(f"{manifest_path(corpus)}: no shards for split {split!r} "
                          f"(splits: {sorted(m.splits)})")
    return paths


def open_file(path: str):
    """Open a local path or a URI (s3://, gs://, ... through fsspec) for reading. A member of a local zip archive,
    `zip://<member>::<archive.zip>` (fsspec's chained-URL form), is read through a per-process cache of open
    archives: fsspec re-reads the archive's directory on every open (~25-45 ms each), this takes ~0.1 ms."""
    p = str(path)
    if p.startswith("zip://") and "::" in p:
        member, _, archive = p[len("zip://"):].partition("::")
        if "://" not in archive or archive.startswith("file://"):
            return _zip_archive(archive.removeprefix("file://")).open(member)
    if "://" in p and not p.startswith("file://"):
        import fsspec
        return fsspec.open(p, "rb").open()
    return open(p.removeprefix("file://"), "rb")


_ZIPS: dict[str, Any] = {}


def _zip_archive(path: str):
    """An open `zipfile.ZipFile` per archive and process (reads from it are thread-safe)."""
    import zipfile
    zf = _ZIPS.get(path)
    if zf is None:
        if len(_ZIPS) >= 8:  # a handful of archives at most; close the oldest
            _ZIPS.pop(next(iter(_ZIPS))).close()
        zf = _ZIPS[path] = zipfile.ZipFile(path)
    return zf


def check_shard_schema(path: str | os.PathLike) -> pa.Schema:
    """Read only the footer of a shard and check it against SCHEMA; errors name the file and the field."""
    try:
        with open_file(str(path)) as f:
            schema = pq.read_schema(f)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    for name in REQUIRED_FIELDS:
        if name not in schema.names:
            raise CorpusError(f"{path}: required field '{name}' is missing (has: {', '.join(schema.names)})")
    if "image" not in schema.names and "image_uri" not in schema.names:
        raise CorpusError(f"{path}: needs field 'image' (bytes) or 'image_uri' (string)")
    for f in SCHEMA:
        if f.name in schema.names:
            got = schema.field(f.name).type
            if not got.equals(f.type) and not _compatible(got, f.type):
                raise CorpusError(f"{path}: field '{f.name}' has type {got}, expected {f.type}")
    return schema


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_null(got):  # an all-null column (pandas/pyarrow infer `null` for it) holds no wrong values
        return True
    if pa.types.is_large_string(got) and pa.types.is_string(want):
        return True
    if pa.types.is_large_binary(got) and pa.types.is_binary(want):
        return True
    if (pa.types.is_list(got) or pa.types.is_large_list(got)) and pa.types.is_list(want):
        return _compatible(got.value_type, want.value_type) or got.value_type.equals(want.value_type)
    if pa.types.is_map(got) and pa.types.is_map(want):
        return pa.types.is_floating(got.item_type) or pa.types.is_integer(got.item_type)
    return False


def validate_corpus(corpus: str | os.PathLike, split: Optional[str] = None) -> list[str]:
    """Check every shard of `split` exists and has the right schema; return their paths."""
    paths = shard_paths(corpus, split)
    for p in paths:
        if "://" not in p and not os.path.exists(p):
            raise CorpusError(f"{p}: shard listed in {manifest_path(corpus)} does not exist")
        check_shard_schema(p)
    return paths


class ShardWriter:
    """Buffers rows and writes `<split>-NNNNN.parquet` shards of `shard_size` rows."""

    def __init__(self, corpus: str | os.PathLike, shard_size: int = 2048):
        self.root = Path(corpus)
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.buffers: dict[str, list[dict]] = {}
        self.counters: dict[str, int] = {}
        self.shards: list[Shard] = []

    def add(self, row: dict[str, Any]) -> None:
        split = row["split"]
        buf = self.buffers.setdefault(split, [])
        buf.append(row)
        if len(buf) >= self.shard_size:
            self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self.buffers.get(split) or []
        if not rows:
            return
        n = self.counters.get(split, 0)
        rel = f"shards/{split}-{n:05d}.parquet"
        cols = {f.name: [r.get(f.name) for r in rows] for f in SCHEMA}
        cols["labels"] = [list((r.get("labels") or {}).items()) for r in rows]
        table = pa.Table.from_pydict(cols, schema=SCHEMA)
        pq.write_table(table, self.root / rel, row_group_size=min(len(rows), 256))
        self.shards.append(Shard(path=rel, split=split, rows=len(rows)))
        self.counters[split] = n + 1
        self.buffers[split] = []

    def close(self) -> list[Shard]:
        for split in list(self.buffers):
            self._flush(split)
        return self.shards


def iter_shard_batches(pf: "pq.ParquetFile", path: str, columns: Optional[list[str]], batch_size: int,
                       on_bad: Optional[Callable[[int, str], None]] = None):
    """Record batches of an open shard, one row group at a time. A row group that cannot be read (a corrupt
    data page behind a valid footer) is reported to `on_bad(rows, reason)` and skipped instead of ending the whole
    read (and with it the epoch)."""
    for i in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(i, columns=columns)
        except Exception as e:  # noqa: BLE001 - pyarrow raises OSError / ArrowInvalid / ... for corrupt pages
            rows = pf.metadata.row_group(i).num_rows
            reason = f"{path}: row group {i} ({rows} rows) is unreadable ({type(e).__name__}: {e})"[:300]
            if on_bad is None:
                raise CorpusError(reason) from None
            on_bad(rows, reason)
            continue
        yield from table.to_batches(max_chunksize=batch_size)


def iter_rows(paths: Iterable[str], columns: Optional[list[str]] = None, batch_size: int = 256,
              on_bad: Optional[Callable[[int, str], None]] = None):
    """Stream rows of the given shards as dicts (bounded memory: one row group at a time); unreadable row groups
    go to `on_bad(rows, reason)` (default: CorpusError naming the shard and row group)."""
    for p in paths:
        check_shard_schema(p)
        with open_file(p) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
            for rb in iter_shard_batches(pf, p, cols, batch_size, on_bad):
                yield from rb.to_pylist()
