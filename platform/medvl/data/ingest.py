"""`medvl ingest`: turn image-text sources into a medvl corpus (sharded Parquet + manifest).

    medvl ingest csv   captions.tsv --out corpora/x [--image-key filepath] [--text-key title ...] [--sep '\t']
    medvl ingest folder images/    --out corpora/y [--template "a photo of {}." ...]
    medvl ingest digits            --out corpora/digits   # scikit-learn's handwritten digits, via `folder`
    medvl ingest mimic-cxr | chexpert | chestxray14 | iu-reports ...   # chest X-ray releases (ingest_cxr.py)
    medvl ingest pmc-oa | roco | webdataset ...           # figure-caption corpora, see `medvl.data.ingest_pmc`

Every row is validated (image decodes, texts non-empty strings, labels numeric, sample id unique). A bad row is
written to `<out>/rejects.jsonl` with its source file, row number, field and reason, counted, and never silently
dropped. A duplicated sample id is rejected (the first row with that id is kept): training seeds each row's
augmentation and caption choice from its id, and evaluation matches rows by id, so ids must be unique.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from PIL import Image

from medvl.data.corpus import CorpusError, Manifest, ShardWriter, write_manifest

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


@dataclass
class Rejected(Exception):
    field: str
    reason: str


@dataclass
class IngestStats:
    accepted: int = 0
    rejected: int = 0
    per_split: dict[str, int] = field(default_factory=dict)


def check_image(data: bytes, where: str = "image") -> None:
    """Raise Rejected if `data` is not a fully decodable image."""
    if not data:
        raise Rejected(where, "empty image file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:  # verify() leaves the image unusable; decode fully
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many exception types on corrupt data
        raise Rejected(where, f"unreadable image ({type(e).__name__}: {e})") from None


def check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise Rejected("texts", f"expected text, got {type(texts).__name__}")
    out = []
    for t in texts:
        if t is None or (isinstance(t, float) and t != t):  # None / NaN from pandas
            continue
        if not isinstance(t, str):
            raise Rejected("texts", f"expected text, got {type(t).__name__} {t!r}")
        if t.strip():
            out.append(t.strip())
    if not out:
        raise Rejected("texts", "missing or empty text")
    return out


def check_labels(labels: Any) -> dict[str, float]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise Rejected("labels", f"expected a mapping of class -> value, got {type(labels).__name__}")
    out = {}
    for k, v in labels.items():
        if v is None or (isinstance(v, float) and v != v):
            continue  # unlabelled (CheXpert blanks)
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise Rejected(f"labels.{k}", f"expected a number, got {v!r}") from None
    return out


def split_for(group_id: str, val_fraction: float, seed: int) -> str:
    """Deterministic split from a hash of the group id (stable when the source grows). Pass the patient id (else
    the study id) of medical images, never the image id: every image of one patient then lands on one side."""
    h = hashlib.sha1(f"{seed}:{group_id}".encode()).digest()
    return "val" if int.from_bytes(h[:8], "big") / 2**64 < val_fraction else "train"


class Ingestor:
    def __init__(self, out: str | os.PathLike, source: str, shard_size: int = 2048):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.writer = ShardWriter(self.out, shard_size)
        self.rejects_path = self.out / "rejects.jsonl"
        self.rejects = open(self.rejects_path, "w")
        self.stats = IngestStats()
        self.source = source
        self._seen: dict[str, str] = {}

    def claim(self, sample_id: str, where: str) -> None:
        """Reject a sample id seen before (ids must be unique: per-sample seeding, evaluation by id)."""
        first = self._seen.get(sample_id)
        if first is not None:
            raise Rejected("sample_id", f"duplicate sample_id {sample_id!r} (first seen at {first}; that row is kept)")
        self._seen[sample_id] = where

    def reject(self, file: str, row: Optional[int], fld: str, reason: str) -> None:
        self.stats.rejected += 1
        self.rejects.write(json.dumps({"file": file, "row": row, "field": fld, "reason": reason}) + "\n")

    def add(self, row: dict) -> None:
        self.writer.add(row)
        self.stats.accepted += 1
        self.stats.per_split[row["split"]] = self.stats.per_split.get(row["split"], 0) + 1

    def finish(self, **manifest_kw: Any) -> Manifest:
        self.rejects.close()
        shards = self.writer.close()
        m = Manifest(source=self.source, shards=shards, rejected=self.stats.rejected, **manifest_kw)
        write_manifest(self.out, m)
        splits = ", ".join(f"{k}={v}" for k, v in sorted(self.stats.per_split.items()))
        print(f"ingest: {self.stats.accepted} rows accepted ({splits}) in {len(shards)} shards, "
              f"{self.stats.rejected} rejected (see {self.rejects_path}) -> {self.out / 'manifest.json'}")
        return m


def _read_table(path: Path, sep: Optional[str]) -> Iterator[tuple[int, dict]]:
    if path.suffix in (".jsonl", ".ndjson"):
        with open(path) as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as e:
                        yield i, {"__error__": f"invalid JSON ({e})"}
        return
    import pandas as pd
    if sep is None:
        sep = "\t" if path.suffix in (".tsv", ".txt") else ","
    df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    for i, rec in enumerate(df.to_dict(orient="records"), start=2):  # row 1 is the header
        yield i, rec


def ingest_table(path: str, out: str, image_key: str = "filepath", text_keys: Iterable[str] = ("title",),
                 label_keys: Iterable[str] = (), id_key: Optional[str] = None, study_key: Optional[str] = None,
                 view_key: Optional[str] = None, split_key: Optional[str] = None, sep: Optional[str] = None,
                 patient_key: Optional[str] = None,
                 image_root: Optional[str] = None, store: str = "bytes", val_fraction: float = 0.2,
                 seed: int = 0, shard_size: int = 2048, templates: Iterable[str] = (),
                 shuffle: bool = True) -> Manifest:
    """CSV/TSV/JSONL manifest (open_clip's `filepath\\ttitle` CSV included) -> corpus. Without `split_key`, rows
    are split by a hash of their patient (`patient_key`), else study (`study_key`), else sample id. Rows are written
    in a seeded random order (`shuffle`), so a source sorted by patient, study or class does not put them side by
    side in the shards (training mixes row groups and windows of rows, not whole corpora)."""
    src = Path(path)
    if not src.is_file():
        raise CorpusError(f"{src}: manifest file not found")
    root = Path(image_root) if image_root else src.parent
    ing = Ingestor(out, source=str(src.resolve()), shard_size=shard_size)
    text_keys, label_keys = list(text_keys), list(label_keys)
    for rowno, rec in _shuffled(_read_table(src, sep), seed, shuffle):
        try:
            if "__error__" in rec:
                raise Rejected("row", rec["__error__"])
            if image_key not in rec or rec[image_key] in (None, ""):
                raise Rejected(image_key, "missing image path")
            img_path = Path(str(rec[image_key]))
            if not img_path.is_absolute():
                img_path = root / img_path
            try:
                data = img_path.read_bytes()
            except OSError as e:
                raise Rejected(image_key, f"cannot read {img_path} ({e.strerror})") from None
            check_image(data, image_key)
            missing = [k for k in text_keys if k not in rec]
            if len(missing) == len(text_keys):
                raise Rejected(text_keys[0], "missing text column")
            texts = check_texts([rec.get(k) for k in text_keys])
            labels = check_labels({k: rec.get(k) for k in label_keys if rec.get(k) not in (None, "")})
            sid = str(rec[id_key]) if id_key and rec.get(id_key) not in (None, "") else f"{src.stem}-{rowno}"
            ing.claim(sid, f"row {rowno}")
            patient = str(rec[patient_key]) if patient_key and rec.get(patient_key) not in (None, "") else None
            study = str(rec[study_key]) if study_key and rec.get(study_key) not in (None, "") else None
            group = patient or (f"study:{study}" if study else sid)  # never split one patient's/study's images
            split = str(rec[split_key]) if split_key and rec.get(split_key) else split_for(group, val_fraction, seed)
            ing.add({
                "sample_id": sid,
                "image": data if store == "bytes" else None,
                "image_uri": None if store == "bytes" else str(img_path.resolve()),
                "texts": texts, "labels": labels, "split": split,
                "study_id": study, "patient_id": patient,
                "view": str(rec[view_key]) if view_key and rec.get(view_key) else None,
            })
        except Rejected as r:
            ing.reject(str(src), rowno, r.field, r.reason)
    return ing.finish(templates=list(templates), classnames=list(label_keys))


def _shuffled(items: Iterable, seed: int, shuffle: bool) -> list:
    """The items in a seeded random order (only paths and text are held, never image bytes)."""
    items = list(items)
    if shuffle:
        import numpy as np
        order = np.random.default_rng([seed, 0x1A6E]).permutation(len(items))
        items = [items[i] for i in order]
    return items


def ingest_folder(root: str, out: str, templates: Iterable[str] = ("a photo of {}.",),
                  classnames: Optional[dict[str, str]] = None, label_field: str = "class",
                  val_fraction: float = 0.2, seed: int = 0, shard_size: int = 2048,
                  shuffle: bool = True) -> Manifest:
    """Class-per-folder image tree -> corpus; captions are the templates filled with the class name. Rows are
    written in a seeded random order (`shuffle`): in folder order every shard would hold one or two classes."""
    rootp = Path(root)
    if not rootp.is_dir():
        raise CorpusError(f"{rootp}: image folder not found")
    templates = list(templates)
    if not templates or any("{}" not in t for t in templates):
        raise CorpusError(f"templates must each contain '{{}}' for the class name: {templates}")
    classes = sorted(d.name for d in rootp.iterdir() if d.is_dir())
    if not classes:
        raise CorpusError(f"{rootp}: no class sub-folders found")
    names = [(classnames or {}).get(c, c.replace("_", " ")) for c in classes]
    ing = Ingestor(out, source=str(rootp.resolve()), shard_size=shard_size)
    files = [(ci, cdir, cname, f) for ci, (cdir, cname) in enumerate(zip(classes, names))
             for f in sorted((rootp / cdir).iterdir()) if f.suffix.lower() in IMAGE_EXTS]
    for ci, cdir, cname, f in _shuffled(files, seed, shuffle):
        try:
            data = f.read_bytes()
            check_image(data, "image")
            sid = f"{cdir}/{f.stem}"
            ing.claim(sid, str(f))
            ing.add({"sample_id": sid, "image": data, "image_uri": None,
                     "texts": [t.format(cname) for t in templates],
                     "labels": {label_field: float(ci)}, "split": split_for(sid, val_fraction, seed),
                     "study_id": None, "view": None})
        except Rejected as r:
            ing.reject(str(f), None, r.field, r.reason)
    return ing.finish(label_field=label_field, classnames=names, templates=templates)


DIGIT_TEMPLATES = [
    "a photo of the digit {}.", "a handwritten digit {}.", "the number {}.",
    "an image of the digit {}.", "a scan of a handwritten {}.",
]
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def export_digits(folder: str | os.PathLike, size: int = 32) -> Path:
    """Write scikit-learn's 1,797 handwritten digits (8x8, real scans) as a class-per-folder PNG tree."""
    from sklearn.datasets import load_digits
    d = load_digits()
    folder = Path(folder)
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        cdir = folder / str(int(y))
        cdir.mkdir(parents=True, exist_ok=True)
        arr = (img / 16.0 * 255).clip(0, 255).astype("uint8")
        Image.fromarray(arr, mode="L").resize((size, size), Image.BILINEAR).save(cdir / f"{i:04d}.png")
    return folder


def ingest_digits(out: str, val_fraction: float = 0.2, seed: int = 0, shard_size: int = 512,
                  templates: Iterable[str] = DIGIT_TEMPLATES, shuffle: bool = True) -> Manifest:
    outp = Path(out)
    tree = export_digits(outp / "source_images")
    # class folder "3" -> caption class name "3" (the eval prompt is "a photo of the digit 3.")
    return ingest_folder(str(tree), out, templates=templates, label_field="digit",
                         val_fraction=val_fraction, seed=seed, shard_size=shard_size, shuffle=shuffle)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="medvl ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="corpus directory to write")
    common.add_argument("--shard-size", type=int, default=2048, help="rows per Parquet shard")
    common.add_argument("--val-fraction", type=float, default=0.2)
    common.add_argument("--seed", type=int, default=0, help="seed of the split hash and of the row order")
    common.add_argument("--no-shuffle", action="store_true",
                        help="write rows in source order (default: a seeded random order)")
    c = sub.add_parser("csv", parents=[common], help="CSV/TSV/JSONL manifest with image paths and captions")
    c.add_argument("manifest")
    c.add_argument("--image-key", default="filepath")
    c.add_argument("--text-key", action="append", help="caption column(s); default: title")
    c.add_argument("--label-key", action="append", default=[], help="numeric label column(s)")
    c.add_argument("--id-key"), c.add_argument("--study-key"), c.add_argument("--view-key")
    c.add_argument("--patient-key", help="patient column: the hash split groups by it (else by --study-key)")
    c.add_argument("--split-key", help="column with train/val/test; default: hash split")
    c.add_argument("--sep", help="field separator (default: tab for .tsv, comma otherwise)")
    c.add_argument("--image-root", help="base directory of relative image paths (default: manifest's dir)")
    c.add_argument("--store", choices=["bytes", "uri"], default="bytes",
                   help="embed encoded image bytes, or keep a path/URI")
    f = sub.add_parser("folder", parents=[common], help="class-per-folder image tree")
    f.add_argument("root")
    f.add_argument("--template", action="append", help="prompt template with {} (repeatable)")
    f.add_argument("--label-field", default="class")
    sub.add_parser("digits", parents=[common], help="scikit-learn handwritten digits (demo corpus)")
    from medvl.data import ingest_cxr
    ingest_cxr.add_subcommands(sub, common)  # mimic-cxr, chexpert, chestxray14, iu-reports (each sets `run`)
    from medvl.data import ingest_pmc
    ingest_pmc.add_parsers(sub)  # pmc-oa, roco, webdataset
    from medvl.data import phantom
    phantom.add_parser(sub)  # brain-phantoms (CLISC's synthetic BraTS-layout cases)
    from medvl.data import ingest_brain
    ingest_brain.add_parser(sub)  # brain-slices (a CLIP pretraining corpus from cases with segmentations)
    a = p.parse_args(argv)
    if getattr(a, "run", None):
        m = a.run(a)
    elif a.kind == "csv":
        m = ingest_table(a.manifest, a.out, image_key=a.image_key, text_keys=a.text_key or ["title"],
                         label_keys=a.label_key, id_key=a.id_key, study_key=a.study_key, view_key=a.view_key,
                         patient_key=a.patient_key,
                         split_key=a.split_key, sep=a.sep, image_root=a.image_root, store=a.store,
                         val_fraction=a.val_fraction, seed=a.seed, shard_size=a.shard_size,
                         shuffle=not a.no_shuffle)
    elif a.kind == "folder":
        m = ingest_folder(a.root, a.out, templates=a.template or ["a photo of {}."], label_field=a.label_field,
                          val_fraction=a.val_fraction, seed=a.seed, shard_size=a.shard_size,
                          shuffle=not a.no_shuffle)
    else:
        m = ingest_digits(a.out, val_fraction=a.val_fraction, seed=a.seed,
                          shard_size=a.shard_size if a.shard_size != 2048 else 512, shuffle=not a.no_shuffle)
    return 0 if m.rows() > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
