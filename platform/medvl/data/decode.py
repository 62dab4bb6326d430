"""The decoder contract every method's data path follows, and the pieces decoders share.

A method reads corpus rows through a `RowDecoder`:

* it runs inside Ray Data `map_batches` tasks on CPU (never on the training workers), built on the driver,
  pickled to the task, and `setup()` once per worker process (transforms, tokenizers);
* `decode(row, rng)` turns one corpus row into named values; `collate(rows)` stacks a list of them into named
  numpy arrays whose dtypes are exactly `output_dtypes()` (the trainer converts them with those dtypes);
* all its randomness (augmentation, caption choice, masking) is a pure function of (seed, epoch, sample id):
  `decode_rows` seeds numpy (`rng`), torch's and Python's global generators from that triple before each row,
  so a row decodes identically in any process, in any order, after any restart;
* images travel as uint8 CHW (a quarter of float32's bytes through the object store) and are normalised on the
  training worker (`normalize_images`, on the GPU when there is one);
* a row that fails to decode raises; `decode_rows` drops it, reports it (`on_skip`, a log line) and goes on: a
  corrupt sample never kills an epoch (the trainer counts it, exactly, from the stream positions it passes).
"""
from __future__ import annotations

import hashlib
import io
import logging
import random
from typing import Any, Callable, Optional

import numpy as np

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("sample_id", "image", "image_uri")


def sample_seed(seed: int, epoch: int, sample_id: str) -> int:
    """A 63-bit seed that depends only on (seed, epoch, sample id)."""
    h = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1


class RowDecoder:
    """Base class of the per-row decoders (see the module docstring for the contract)."""

    columns: tuple[str, ...] = ("sample_id", "image", "image_uri", "texts")
    """Corpus columns the decoder reads (missing optional columns are simply absent from `row`)."""

    def output_dtypes(self) -> dict[str, str]:
        """Output array names -> numpy dtype names (e.g. {"image": "uint8", "text": "int64"})."""
        raise NotImplementedError

    def setup(self) -> None:
        """Build heavy state (transforms, tokenizer) once per process; not pickled."""

    def decode(self, row: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """One row -> named values; raise to skip the row (it is counted, never fatal)."""
        raise NotImplementedError

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Decoded rows -> named arrays with `output_dtypes()`. Default: stack each key."""
        dt = self.output_dtypes()
        return {k: np.stack([r[k] for r in rows]).astype(dt[k], copy=False) for k in dt}

    def cache_key(self) -> Any:
        """Decoders with equal keys share one set-up instance per process."""
        # the configuration only: state built by setup() (`_`-prefixed) must not make a set-up decoder look new
        return (type(self).__module__, type(self).__qualname__, repr(sorted(self.__getstate__().items())))

    # heavy state built by setup() never travels with the decoder
    def __getstate__(self):
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


_READY: dict[Any, RowDecoder] = {}


def ready(decoder: RowDecoder) -> RowDecoder:
    """The process-wide set-up instance of this decoder (Ray reuses worker processes across tasks)."""
    key = decoder.cache_key()
    dec = _READY.get(key)
    if dec is None:
        import torch
        torch.set_num_threads(1)
        decoder.setup()
        dec = _READY[key] = decoder
    return dec


def sample_hash(sample_id: str) -> int:
    """A 63-bit integer id of a sample id (travels with decoded rows as `_sid`; audits compare them)."""
    h = hashlib.blake2b(sample_id.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1


def decode_rows(decoder: RowDecoder, batch: dict[str, np.ndarray], *, seed: int, epoch: int,
                on_skip: Optional[Callable[[list[tuple[str, str]]], None]] = None,
                kept: Optional[list[int]] = None) -> Optional[dict[str, np.ndarray]]:
    """Decode a columnar batch row by row with per-sample seeding; skipped rows go to `on_skip`, and the indices
    of the rows that decoded are appended to `kept` (the stream tracks positions with them).
    Returns None when no row survived."""
    import torch
    dec = ready(decoder)
    n = len(batch["sample_id"])
    rows, bad = [], []
    for i in range(n):
        row = {k: batch[k][i] for k in batch}
        sid = str(row["sample_id"])
        s = sample_seed(seed, epoch, sid)
        # the CPU generator only: torch.manual_seed would also queue a lazy CUDA seeding with a formatted stack
        # trace per call (about a third of a small image's decode time); transforms here run on the CPU
        torch.default_generator.manual_seed(s)
        random.seed(s)
        try:
            rows.append(dec.decode(row, np.random.default_rng(s)))
            if kept is not None:
                kept.append(i)
        except Exception as e:  # noqa: BLE001 - any corrupt sample is skipped, never fatal
            bad.append((sid, f"{type(e).__name__}: {e}"[:200]))
    if bad:
        log.warning("skipped %d corrupt samples, e.g. %s", len(bad), bad[0])
        if on_skip is not None:
            on_skip(bad)
    if not rows:
        return None
    return dec.collate(rows)


# --------------------------------------------------------------------------- shared pieces


def load_image_bytes(row: dict) -> bytes:
    data = row.get("image")
    if data is not None and len(data) == 0 and not row.get("image_uri"):
        raise ValueError("image is empty (0 bytes)")
    if data:
        return data
    uri = row.get("image_uri")
    if not uri:
        raise ValueError("row has neither image bytes nor image_uri")
    from medvl.data.corpus import open_file
    with open_file(str(uri)) as f:
        data = f.read()
    if not data:
        raise ValueError(f"image file {uri} is empty (0 bytes)")
    return data


HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
"""PIL modes of 16-bit / 32-bit grayscale images (PNG/TIFF exports of DICOM, 12-bit radiographs)."""


def to_rgb(im):
    """Any PIL image -> 8-bit RGB. 16/32-bit grayscale is rescaled from the image's own min..max to 0..255
    (PIL's `convert("RGB")` clips it at 255, which turns a 12-bit radiograph stored in a 16-bit PNG almost entirely
    white); a constant image becomes black. Palette images go through their palette (via RGBA when the palette has
    transparency); alpha is dropped."""
    from PIL import Image
    if im.mode in HIGH_BIT_DEPTH_MODES:
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):  # a NaN/inf pixel: skip the row, never train on it
            raise ValueError(f"image (mode {im.mode}) has NaN or infinite pixel values")
        scaled = np.zeros(arr.shape, np.uint8) if hi <= lo else \
            np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


IMAGE_MEMO = "_image_memo"
"""Row key of an `ImageMemo`: a decoder that reads one row's image more than once (two augmented views) puts one in
its copy of the row, and `open_image` then decodes the image file once."""


class ImageMemo:
    """The row's opened image, filled by the first `open_image` call (transforms never modify their input)."""
    __slots__ = ("image",)

    def __init__(self):
        self.image = None


def open_image(row: dict):
    """The row's image as an RGB PIL image (fully loaded; see `to_rgb` for 16-bit and palette images)."""
    memo = row.get(IMAGE_MEMO)
    if memo is not None and memo.image is not None:
        return memo.image
    im = _open_image(row)
    if memo is not None:
        memo.image = im
    return im


def _open_image(row: dict):
    from PIL import Image, UnidentifiedImageError
    data = load_image_bytes(row)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # PIL's own message names only a BytesIO object
        raise ValueError(f"not an image format PIL reads ({len(data)} bytes starting {bytes(data[:8])!r})") from None
    with im:
        im.load()
        return to_rgb(im)


def to_uint8_chw(img) -> np.ndarray:
    """PIL RGB image -> uint8 [3, H, W]."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def pick_text(texts: Any, mode: str, rng: np.random.Generator) -> str:
    """One caption from a row's `texts`: `random` (seeded), `first`, or `join`."""
    if texts is None:
        raise ValueError("no text: texts is missing")
    if len(texts) == 0:
        raise ValueError("no text: texts is an empty list")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("no text: every entry of texts is empty")
    if mode == "first":
        return texts[0]
    if mode == "join":
        return " ".join(texts)
    return texts[int(rng.integers(len(texts)))]


def normalize_images(x, mean, std):
    """uint8 [B, 3, H, W] -> float32 normalised, on x's device; the same arithmetic as torchvision's
    ToTensor + Normalize, so results equal the float path bit for bit."""
    import torch
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.to(torch.float32).div_(255.0).sub_(m).div_(s)
