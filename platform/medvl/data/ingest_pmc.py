"""Figure-caption corpora for PMC-CLIP-style training: PMC-OA (JSONL + an image folder or `images.zip`), ROCO
(an image folder + a captions file) and WebDataset tar shards (open_clip's own format), into a medvl corpus.

    medvl ingest pmc-oa pmc_oa.jsonl --images images.zip --out corpora/pmcoa [--min-alignment-score 0.5]
    medvl ingest pmc-oa train.jsonl valid.jsonl test.jsonl --images images/ --out corpora/pmcoa --store uri
    medvl ingest roco roco-dataset/data --out corpora/roco [--subset radiology]
    medvl ingest roco captions.csv --images images/ --out corpora/rocov2
    medvl ingest webdataset 'shards/{00000..00099}.tar' --out corpora/wds [--split train]

PMC-OA rows: `image` (file name, e.g. `PMC212319_Fig3_4.jpg`), `caption`, optional `alignment_type` and
`alignment_score` (pmc_oa.jsonl), or `pmcid` / `url_name` (the older train/valid/test.jsonl; the file name gives
the split). Images are read in place: from a folder, or from the zip archive without extracting it (a member is
found by its exact name, else by its file name anywhere in the archive). `--store uri` keeps an `image_uri`
instead of the bytes (`/abs/path.jpg`, or `zip://<member>::/abs/images.zip`, which medvl reads through a cached
open archive; object stores work through fsspec), which is what a 1.6M-pair corpus wants.

Work is spread over `--workers` Ray actors (default: one per core; 0 = in this process), each validating chunks
of rows (the image decodes, the caption has letters or digits), and progress is printed in rows/s. Rejected rows
go to `<out>/rejects.jsonl` with file, row, field and reason; rows below `--min-alignment-score` are filtered and
counted (rows without a score are kept). Captions longer than the text tower's context (`--model`, default the
MiniLM of `jobs/pmc_clip_pmcoa.yaml`) are kept, counted, and truncated by the tokenizer at training time.
`<out>/ingest_stats.json` records rows/s, workers, filtered and truncated counts.

WebDataset shards are converted (not streamed directly): training then gets the corpus format's validated
shards, splits, rejects with reasons and per-sample seeding. Samples group tar members by key (everything before
the first dot of the file name); the image is the first of `jpg/jpeg/png/webp/bmp/tif/tiff`, the caption the
`txt` member (or `caption`/`text` in a `json` member).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from medvl.data.corpus import CorpusError, Manifest
from medvl.data.ingest import Ingestor, Rejected, check_image, split_for

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
SPLIT_NAMES = {"train": "train", "valid": "val", "validation": "val", "val": "val", "test": "test", "dev": "val"}
DEFAULT_MODEL = "minilm-efficientnet-lite0"
_HAS_ALNUM = re.compile(r"[^\W_]")


def check_caption(caption: Any, fld: str = "caption") -> str:
    """A caption must be a non-empty string with at least one letter or digit."""
    if caption is None or (isinstance(caption, float) and caption != caption):
        raise Rejected(fld, "missing caption")
    if not isinstance(caption, str):
        raise Rejected(fld, f"expected text, got {type(caption).__name__} {caption!r}"[:200])
    c = " ".join(caption.split())
    if not c:
        raise Rejected(fld, "empty caption")
    if not _HAS_ALNUM.search(c):
        raise Rejected(fld, f"caption has no letters or digits ({c[:40]!r})")
    return c


def split_of_file(path: str) -> Optional[str]:
    """`train.jsonl` -> train, `valid.jsonl` -> val, `test.jsonl` -> test; other names -> None (hash split)."""
    return SPLIT_NAMES.get(Path(path).name.split(".")[0].lower())


# --------------------------------------------------------------------------- per-chunk work (Ray actors)


class TokenCounter:
    """Counts captions longer than a text tower's context (they are truncated at training, not rejected)."""

    def __init__(self, model: Optional[str], config_dir: Optional[str] = None):
        self.model, self.context = model, 0
        self._count: Optional[Callable[[str], int]] = None
        if not model:
            return
        from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

        from medvl.config import ModelConfig
        from medvl.models.factory import tokenizer
        tok = tokenizer(ModelConfig(name=model, config_dir=config_dir))
        self.context = int(tok.context_length)
        if isinstance(tok, SimpleTokenizer):
            self._count = lambda t: len(tok.encode(t)) + 2  # + start / end of text
        elif isinstance(tok, HFTokenizer):
            self._count = lambda t: len(tok.tokenizer(tok.clean_fn(t), verbose=False)["input_ids"])
        else:  # pragma: no cover
            raise CorpusError(f"--model {model}: unsupported tokenizer {type(tok).__name__}")

    def too_long(self, text: str) -> bool:
        return self._count is not None and self._count(text) > self.context


class ImageSource:
    """Images by name from a folder or a zip archive (read in place, never extracted)."""

    def __init__(self, images: str):
        self.root = images
        self.is_zip = images.lower().endswith(".zip")
        self._zip = None
        self._by_name: Optional[dict[str, str]] = None

    def _archive(self):
        if self._zip is None:
            import zipfile
            try:
                self._zip = zipfile.ZipFile(self.root)
            except (OSError, zipfile.BadZipFile) as e:
                raise CorpusError(f"{self.root}: cannot open the image archive ({e})") from None
        return self._zip

    def member(self, name: str) -> str:
        """The archive member (or file path) holding image `name`; Rejected if there is none."""
        if not self.is_zip:
            p = Path(name) if os.path.isabs(name) else Path(self.root) / name
            if not p.is_file():
                raise Rejected("image", f"{name}: no such file in {self.root}")
            return str(p)
        zf = self._archive()
        try:
            zf.getinfo(name)
            return name
        except KeyError:
            pass
        if self._by_name is None:  # PMC-OA's archive keeps its images in a sub-folder: match by file name
            self._by_name = {}
            for m in zf.namelist():
                if not m.endswith("/"):
                    self._by_name.setdefault(m.rsplit("/", 1)[-1], m)
        m = self._by_name.get(name.rsplit("/", 1)[-1])
        if m is None:
            raise Rejected("image", f"{name}: not in archive {self.root}")
        return m

    def read(self, member: str) -> bytes:
        if not self.is_zip:
            return Path(member).read_bytes()
        return self._archive().read(member)

    def uri(self, member: str) -> str:
        if not self.is_zip:
            return str(Path(member).resolve())
        return f"zip://{member}::{Path(self.root).resolve()}"


@dataclass
class ChunkResult:
    rows: list[dict] = field(default_factory=list)
    rejects: list[tuple[str, Optional[int], str, str]] = field(default_factory=list)
    truncated: int = 0
    filtered: int = 0
    seen: int = 0


class ChunkWorker:
    """Validates records (dicts with `file`, `row`, `image`, `caption`, `split`, `sample_id`, ...) into corpus
    rows; one per Ray actor, holding its open archive and tokenizer."""

    def __init__(self, images: Optional[str], store: str = "bytes", check: str = "full",
                 model: Optional[str] = DEFAULT_MODEL, config_dir: Optional[str] = None):
        self.images = images
        self.sources: dict[str, ImageSource] = {}
        self.store, self.check = store, check
        self.counter = TokenCounter(model, config_dir)

    def source(self, images: Optional[str]) -> ImageSource:
        """The image folder / archive of a record (its own `images`, else the worker's), opened once."""
        root = images or self.images
        if root is None:
            raise Rejected("image", "no image folder or archive given")
        if root not in self.sources:
            self.sources[root] = ImageSource(root)
        return self.sources[root]

    def _check_image(self, data: bytes) -> None:
        if self.check == "full":
            check_image(data, "image")
        elif self.check == "header":
            from PIL import Image
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()
            except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data
                raise Rejected("image", f"unreadable image ({type(e).__name__}: {e})") from None

    def records(self, recs: list[dict]) -> ChunkResult:
        out = ChunkResult()
        for r in recs:
            out.seen += 1
            try:
                if "__error__" in r:
                    raise Rejected("row", r["__error__"])
                cap = check_caption(r.get("caption"))
                if not r.get("image"):
                    raise Rejected("image", "missing image name")
                if "image_bytes" in r:  # WebDataset: the bytes came with the record
                    data, uri = r["image_bytes"], None
                    self._check_image(data)
                else:
                    src = self.source(r.get("images"))
                    member = src.member(str(r["image"]))
                    try:
                        data = src.read(member)
                    except (OSError, KeyError) as e:
                        raise Rejected("image", f"{r['image']}: cannot read ({e})") from None
                    self._check_image(data)
                    uri = src.uri(member)
                if self.counter.too_long(cap):
                    out.truncated += 1
                keep_bytes = self.store == "bytes" or uri is None
                out.rows.append({"sample_id": r["sample_id"], "image": data if keep_bytes else None,
                                 "image_uri": None if keep_bytes else uri, "texts": [cap], "labels": {},
                                 "split": r["split"], "study_id": r.get("study_id"), "view": None})
            except Rejected as e:
                out.rejects.append((r.get("file", ""), r.get("row"), e.field, e.reason))
        return out

    def shard(self, path: str, split: Optional[str], val_fraction: float, seed: int) -> ChunkResult:
        """One WebDataset tar shard -> records -> rows."""
        return self.records(list(wds_records(path, split, val_fraction, seed)))


def run_chunks(chunks: Iterable[Any], make_worker: Callable[[], ChunkWorker], call: str, workers: int,
               on_result: Callable[[ChunkResult], None]) -> None:
    """Apply `ChunkWorker.<call>(chunk)` to every chunk, in order: in this process (`workers` = 0) or on that many
    Ray actors (1 CPU each), results handed to `on_result` in submission order as they complete."""
    if workers <= 0:
        w = make_worker()
        for c in chunks:
            on_result(getattr(w, call)(*c) if isinstance(c, tuple) else getattr(w, call)(c))
        return
    import ray
    from ray.util import ActorPool
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # no job runtime_env: the workers inherit RAY_AUTH_MODE from this environment, and Ray only gives
        # an actor one of the workers it prestarted when the node started if the runtime_envs match
        from medvl.raynode import init_local  # the dashboard agent's port chosen by the OS
        init_local(num_cpus=workers, include_dashboard=False, logging_level="WARNING")
    Remote = ray.remote(num_cpus=1)(_ActorWorker)
    actors = [Remote.remote(make_worker) for _ in range(workers)]
    pool = ActorPool(actors)

    def submit(a, c):
        return a.run.remote(call, c)

    for res in pool.map(submit, chunks):  # ordered: the corpus layout does not depend on timing
        on_result(res)
    for a in actors:
        ray.kill(a)


class _ActorWorker:
    def __init__(self, make_worker: Callable[[], ChunkWorker]):
        self.w = make_worker()

    def run(self, call: str, chunk: Any) -> ChunkResult:
        return getattr(self.w, call)(*chunk) if isinstance(chunk, tuple) else getattr(self.w, call)(chunk)


class _WorkerFactory:
    """Picklable ChunkWorker constructor (sent to every actor)."""

    def __init__(self, **kw: Any):
        self.kw = kw

    def __call__(self) -> ChunkWorker:
        return ChunkWorker(**self.kw)


class Progress:
    """Feeds chunk results into the Ingestor and prints rows/s every few seconds and at the end."""

    def __init__(self, ing: Ingestor, label: str, workers: int, every_s: float = 5.0):
        self.ing, self.label, self.workers, self.every = ing, label, workers, every_s
        self.t0 = self.t_last = time.perf_counter()
        self.seen = self.truncated = self.filtered = 0
        self.ids: set[str] = set()
        self.t_first: Optional[float] = None  # first chunk done: workers started (imports, archive index)
        self.seen_first = 0

    def __call__(self, res: ChunkResult) -> None:
        if self.t_first is None:
            self.t_first, self.seen_first = time.perf_counter(), res.seen
        for row in res.rows:
            sid, k = row["sample_id"], 1
            while row["sample_id"] in self.ids:  # the same image listed twice: keep both, ids stay unique
                k += 1
                row["sample_id"] = f"{sid}#{k}"
            self.ids.add(row["sample_id"])
            self.ing.add(row)
        for f, r, fld, reason in res.rejects:
            self.ing.reject(f, r, fld, reason)
        self.seen += res.seen
        self.truncated += res.truncated
        self.filtered += res.filtered
        now = time.perf_counter()
        if now - self.t_last >= self.every:
            self.t_last = now
            print(f"ingest {self.label}: {self.seen} rows ({self.ing.stats.accepted} accepted, "
                  f"{self.ing.stats.rejected} rejected) {self.seen / (now - self.t0):.0f} rows/s", flush=True)

    def finish(self, counter: TokenCounter, **manifest_kw: Any) -> Manifest:
        end = time.perf_counter()
        elapsed = end - self.t0
        rate = self.seen / max(elapsed, 1e-9)
        # steady state: after the first chunk, i.e. without worker start-up (imports, opening the archive)
        steady = ((self.seen - self.seen_first) / max(end - self.t_first, 1e-9)
                  if self.t_first is not None and self.seen > self.seen_first else float("nan"))
        where = f"{self.workers} Ray workers" if self.workers > 0 else "in-process"
        print(f"ingest {self.label}: {self.seen} rows in {elapsed:.1f}s = {rate:.0f} rows/s ({where}; "
              f"{steady:.0f} rows/s after start-up); "
              f"{self.filtered} filtered; {self.truncated} captions longer than the "
              f"{counter.context or '?'}-token context of {counter.model or 'no tokenizer'} (kept, truncated "
              f"when training)", flush=True)
        stats = {"source": self.label, "rows_seen": self.seen, "accepted": self.ing.stats.accepted,
                 "rejected": self.ing.stats.rejected, "filtered": self.filtered, "truncated_captions": self.truncated,
                 "context_length": counter.context, "tokenizer_model": counter.model, "seconds": elapsed,
                 "rows_per_s": rate, "rows_per_s_after_startup": steady, "workers": self.workers}
        m = self.ing.finish(**manifest_kw)
        (self.ing.out / "ingest_stats.json").write_text(json.dumps(stats, indent=2))
        return m


def _default_workers(workers: Optional[int]) -> int:
    return (os.cpu_count() or 1) if workers is None else workers


def _chunked(it: Iterable[Any], n: int) -> Iterator[list]:
    buf: list = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


# --------------------------------------------------------------------------- PMC-OA


def pmc_oa_records(paths: list[str], split: Optional[str], val_fraction: float, seed: int,
                   min_score: Optional[float], filtered: list[int]) -> Iterator[dict]:
    """JSONL rows -> records (split from `--split`, the file name, or a hash of the image name)."""
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise CorpusError(f"{p}: JSONL file not found")
        file_split = split or split_of_file(path)
        with open(p, encoding="utf-8") as f:
            for rowno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                rec: dict[str, Any] = {"file": str(p), "row": rowno}
                try:
                    d = json.loads(line)
                    if not isinstance(d, dict):
                        raise ValueError("not a JSON object")
                except ValueError as e:
                    yield {**rec, "__error__": f"invalid JSON ({e})"[:200]}
                    continue
                score = d.get("alignment_score")
                if min_score is not None and isinstance(score, (int, float)) and score < min_score:
                    filtered[0] += 1
                    continue
                image = d.get("image")
                sid = str(image) if image else f"{p.stem}-{rowno}"
                pmcid = d.get("pmcid") or (str(image).split("_")[0] if image and str(image).startswith("PMC") else None)
                yield {**rec, "image": image, "caption": d.get("caption"), "sample_id": sid,
                       "split": file_split or split_for(sid, val_fraction, seed),
                       "study_id": str(pmcid) if pmcid else None}


def ingest_pmc_oa(jsonl: list[str], images: str, out: str, *, min_alignment_score: Optional[float] = None,
                  store: str = "bytes", check: str = "full", split: Optional[str] = None, val_fraction: float = 0.02,
                  seed: int = 0, shard_size: int = 2048, workers: Optional[int] = None, chunk_size: int = 512,
                  model: Optional[str] = DEFAULT_MODEL, model_config_dir: Optional[str] = None) -> Manifest:
    if not os.path.exists(images):
        raise CorpusError(f"{images}: image folder or images.zip not found")
    workers = _default_workers(workers)
    make = _WorkerFactory(images=images, store=store, check=check, model=model, config_dir=model_config_dir)
    counter = TokenCounter(model, model_config_dir)
    ing = Ingestor(out, source=", ".join(str(Path(p).resolve()) for p in jsonl), shard_size=shard_size)
    prog = Progress(ing, "pmc-oa", workers)
    filtered = [0]
    recs = pmc_oa_records(jsonl, split, val_fraction, seed, min_alignment_score, filtered)
    run_chunks(_chunked(recs, chunk_size), make, "records", workers, prog)
    prog.filtered = filtered[0]
    return prog.finish(counter)


# --------------------------------------------------------------------------- ROCO


def _read_captions(path: Path, id_col: Optional[str], caption_col: Optional[str]) -> Iterator[tuple[int, Any, Any]]:
    """(row, id, caption) from ROCO's `captions.txt` (`ROCO_00002<TAB> caption`, no header) or a CSV/TSV with a
    header (ROCOv2: `ID,Caption`)."""
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    k, _, cap = line.rstrip("\n").partition("\t")
                    yield i, k.strip(), cap if _ else None
        return
    import pandas as pd
    df = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    cols = list(df.columns)

    def pick(want: Optional[str], cands: tuple[str, ...]) -> str:
        if want:
            if want not in cols:
                raise CorpusError(f"{path}: no column {want!r} (columns: {', '.join(cols)})")
            return want
        for c in cands:
            if c in cols:
                return c
        raise CorpusError(f"{path}: none of the columns {list(cands)} found (columns: {', '.join(cols)}); "
                          f"name them with --id-col / --caption-col")
    ic = pick(id_col, ("ID", "id", "image_id", "name", "image"))
    cc = pick(caption_col, ("Caption", "caption", "text"))
    for i, rec in enumerate(df[[ic, cc]].itertuples(index=False), start=2):
        yield i, rec[0], rec[1]


def roco_sources(root: str, images: Optional[str], subset: Optional[str]) -> list[tuple[Path, Path, Optional[str]]]:
    """(captions file, image folder, split) triples: a captions file given directly (its images in `--images`,
    default `images/` beside it), or every `captions.txt` under a ROCO checkout (`data/<split>/<subset>/`, images
    in its `images/`, as the dataset's fetch script puts them)."""
    r = Path(root)
    if r.is_file():
        img = Path(images) if images else r.parent / "images"
        return [(r, img, split_of_file(str(r)) or _split_in_path(r))]
    if not r.is_dir():
        raise CorpusError(f"{r}: ROCO folder or captions file not found")
    found = []
    for cap in sorted(r.rglob("captions.txt")):
        if subset and cap.parent.name != subset:
            continue
        found.append((cap, Path(images) if images else cap.parent / "images", _split_in_path(cap)))
    if not found:
        raise CorpusError(f"{r}: no captions.txt found" + (f" for subset {subset!r}" if subset else ""))
    return found


def _split_in_path(p: Path) -> Optional[str]:
    for part in reversed(p.parts[:-1]):
        if part.lower() in SPLIT_NAMES:
            return SPLIT_NAMES[part.lower()]
    return None


def roco_records(sources, id_col, caption_col, split, val_fraction, seed) -> Iterator[dict]:
    for cap, img_dir, file_split in sources:
        for rowno, key, caption in _read_captions(cap, id_col, caption_col):
            key = str(key)
            name = key if Path(key).suffix.lower() in (".jpg", ".jpeg", ".png") else f"{key}.jpg"
            for ext in ("", ".png", ".jpeg"):  # ROCO ships .jpg; other copies may not
                cand = name if not ext else f"{key}{ext}"
                if (img_dir / cand).is_file():
                    name = cand
                    break
            yield {"file": str(cap), "row": rowno, "image": name, "caption": caption, "sample_id": key,
                   "images": str(img_dir), "split": split or file_split or split_for(key, val_fraction, seed)}


def ingest_roco(root: str, out: str, *, images: Optional[str] = None, subset: Optional[str] = None,
                id_col: Optional[str] = None, caption_col: Optional[str] = None, store: str = "bytes",
                check: str = "full", split: Optional[str] = None, val_fraction: float = 0.1, seed: int = 0,
                shard_size: int = 2048, workers: Optional[int] = None, chunk_size: int = 512,
                model: Optional[str] = DEFAULT_MODEL, model_config_dir: Optional[str] = None) -> Manifest:
    sources = roco_sources(root, images, subset)
    workers = _default_workers(workers)
    counter = TokenCounter(model, model_config_dir)
    ing = Ingestor(out, source=str(Path(root).resolve()), shard_size=shard_size)
    prog = Progress(ing, "roco", workers)
    make = _WorkerFactory(images=None, store=store, check=check, model=model, config_dir=model_config_dir)
    recs = roco_records(sources, id_col, caption_col, split, val_fraction, seed)
    run_chunks(_chunked(recs, chunk_size), make, "records", workers, prog)  # one pool for every captions file
    return prog.finish(counter)


# --------------------------------------------------------------------------- WebDataset


def expand_urls(urls: Iterable[str]) -> list[str]:
    """Shard lists with brace patterns (`shards/{00000..00099}.tar`), as WebDataset and open_clip take them."""
    from braceexpand import braceexpand
    return [p for u in urls for p in braceexpand(u)]


def wds_records(path: str, split: Optional[str], val_fraction: float, seed: int) -> Iterator[dict]:
    """The samples of one tar shard (members grouped by key, WebDataset's convention)."""
    from medvl.data.corpus import open_file
    groups: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    try:
        with open_file(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                d, _, base = m.name.rpartition("/")
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = f"{d}/{stem}" if d else stem
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                fh = tar.extractfile(m)
                groups[key][ext.lower()] = fh.read() if fh is not None else b""
    except (OSError, tarfile.TarError) as e:
        yield {"file": path, "row": None, "__error__": f"unreadable tar shard ({type(e).__name__}: {e})"[:200]}
        return
    for i, key in enumerate(order, start=1):
        g = groups[key]
        rec: dict[str, Any] = {"file": path, "row": i, "sample_id": key,
                               "split": split or split_for(key, val_fraction, seed)}
        img = next((g[e] for e in WDS_IMAGE_EXTS if e in g), None)
        if img is None:
            yield {**rec, "__error__": f"sample {key!r} has no image member ({', '.join(sorted(g))})"}
            continue
        cap: Any = None
        if "txt" in g:
            cap = g["txt"].decode("utf-8", errors="replace")
        elif "json" in g:
            try:
                meta = json.loads(g["json"])
                cap = meta.get("caption") or meta.get("text") if isinstance(meta, dict) else None
            except ValueError:
                cap = None
        yield {**rec, "image": key, "image_bytes": img, "caption": cap}


def ingest_webdataset(urls: list[str], out: str, *, split: Optional[str] = None, val_fraction: float = 0.1,
                      seed: int = 0, shard_size: int = 2048, workers: Optional[int] = None, check: str = "full",
                      model: Optional[str] = DEFAULT_MODEL, model_config_dir: Optional[str] = None) -> Manifest:
    paths = expand_urls(urls)
    if not paths:
        raise CorpusError("no WebDataset shards given")
    for p in paths:
        if "://" not in p and not os.path.isfile(p):
            raise CorpusError(f"{p}: WebDataset shard not found")
    workers = _default_workers(workers)
    counter = TokenCounter(model, model_config_dir)
    ing = Ingestor(out, source=", ".join(paths[:3]) + (" ..." if len(paths) > 3 else ""), shard_size=shard_size)
    prog = Progress(ing, "webdataset", workers)
    make = _WorkerFactory(images=None, store="bytes", check=check, model=model, config_dir=model_config_dir)
    run_chunks([(p, split, val_fraction, seed) for p in paths], make, "shard", workers, prog)
    return prog.finish(counter)


# --------------------------------------------------------------------------- command line


def add_parsers(sub) -> None:
    """Register `pmc-oa`, `roco` and `webdataset` under `medvl ingest` (each sets `run`). Their options are their
    own (argparse shares option objects between parsers with a common parent, so per-command defaults such as
    the validation fraction could not differ otherwise)."""
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--out", required=True, help="corpus directory to write")
    shared.add_argument("--shard-size", type=int, default=2048, help="rows per Parquet shard")
    shared.add_argument("--seed", type=int, default=0)
    shared.add_argument("--workers", type=int, default=None,
                        help="parallel Ray workers validating rows (default: one per core; 0 = in this process)")
    shared.add_argument("--split", help="put every row in this split (default: from file names, else hash split)")
    shared.add_argument("--check", choices=["full", "header", "none"], default="full",
                        help="image check: decode fully (default), parse the header only, or none")
    shared.add_argument("--model", default=DEFAULT_MODEL,
                        help="model whose tokenizer counts over-long captions ('none' to skip)")
    shared.add_argument("--model-config-dir", help="extra open_clip model configs for --model")

    p = sub.add_parser("pmc-oa", parents=[shared], help="PMC-OA JSONL + image folder or images.zip")
    p.add_argument("--val-fraction", type=float, default=0.02, help="hash-split share of val (single JSONL)")
    p.add_argument("jsonl", nargs="+", help="pmc_oa.jsonl, or train.jsonl valid.jsonl test.jsonl")
    p.add_argument("--images", required=True, help="image folder or images.zip (read in place)")
    p.add_argument("--min-alignment-score", type=float, help="drop rows whose alignment_score is lower")
    p.add_argument("--store", choices=["bytes", "uri"], default="bytes")
    p.add_argument("--chunk-size", type=int, default=512)
    p.set_defaults(run=_run_pmc)

    r = sub.add_parser("roco", parents=[shared], help="ROCO: image folder(s) + captions file(s)")
    r.add_argument("--val-fraction", type=float, default=0.1, help="hash-split share of val (no split in path)")
    r.add_argument("root", help="a ROCO checkout (every captions.txt under it) or one captions file")
    r.add_argument("--images", help="image folder of a single captions file (default: images/ beside it)")
    r.add_argument("--subset", help="only this sub-folder, e.g. radiology")
    r.add_argument("--id-col"), r.add_argument("--caption-col")
    r.add_argument("--store", choices=["bytes", "uri"], default="bytes")
    r.add_argument("--chunk-size", type=int, default=512)
    r.set_defaults(run=_run_roco)

    w = sub.add_parser("webdataset", parents=[shared], help="WebDataset tar shards (brace patterns ok)")
    w.add_argument("--val-fraction", type=float, default=0.1, help="hash-split share of val (without --split)")
    w.add_argument("urls", nargs="+", help="shard paths or URLs, e.g. 'shards/{00000..00009}.tar'")
    w.set_defaults(run=_run_wds)


def _model(a) -> Optional[str]:
    return None if str(a.model).lower() == "none" else a.model


def _run_pmc(a) -> Manifest:
    return ingest_pmc_oa(a.jsonl, a.images, a.out, min_alignment_score=a.min_alignment_score, store=a.store,
                         check=a.check, split=a.split, val_fraction=a.val_fraction, seed=a.seed,
                         shard_size=a.shard_size, workers=a.workers, chunk_size=a.chunk_size, model=_model(a),
                         model_config_dir=a.model_config_dir)


def _run_roco(a) -> Manifest:
    return ingest_roco(a.root, a.out, images=a.images, subset=a.subset, id_col=a.id_col, caption_col=a.caption_col,
                       store=a.store, check=a.check, split=a.split, val_fraction=a.val_fraction, seed=a.seed,
                       shard_size=a.shard_size, workers=a.workers, chunk_size=a.chunk_size, model=_model(a),
                       model_config_dir=a.model_config_dir)


def _run_wds(a) -> Manifest:
    return ingest_webdataset(a.urls, a.out, split=a.split, val_fraction=a.val_fraction, seed=a.seed,
                             shard_size=a.shard_size, workers=a.workers, check=a.check, model=_model(a),
                             model_config_dir=a.model_config_dir)
