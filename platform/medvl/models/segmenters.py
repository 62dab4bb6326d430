"""Prompt-driven 2D segmenters for CLISC's pseudo-labels (issue "CLISC, part 2"), and the prompts they take.

CLISC prompts a segmenter per positive slice with what the (enhanced) CAM says: the CAM's box dilated by `d` px,
`k` positive points among the pixels where CAM x intensity is highest, and negative points at the dilated box's
corners, on a histogram-equalised slice (`cam_prompts`). Segmenters share one call:
`segmenter(image2d, prompts) -> bool mask` (same height and width as the slice).

* `sam`: segment-anything's `SamPredictor` (single mask) with vit_b / vit_l / vit_h weights from a LOCAL checkpoint
  file (never downloaded; a missing file is a clear error before any work starts), or `tiny`: a randomly
  initialised SAM assembled from segment-anything's own modules (image encoder, prompt encoder, two-way
  transformer mask decoder with small width and depth) that exercises the same predictor code on CPU in tests.
* `random_walker`: scikit-image's random walker seeded from the same prompts (positive points = tumour; negative
  points and everything outside the dilated box = background); a classical, CPU-only segmenter so the pipeline runs
  on this machine and in CI.

Pure numpy / torch; no Ray. The pipeline's stage kinds call these per slice inside Ray Data actors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

SAM_TYPES = ("vit_b", "vit_l", "vit_h")


@dataclass
class Prompts:
    """One slice's prompts in pixel coordinates: box = (x0, y0, x1, y1) inclusive-exclusive as SAM's XYXY,
    points = (x, y) rows, labels 1 = foreground, 0 = background (SAM's convention)."""
    box: np.ndarray
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))

    @property
    def positives(self) -> np.ndarray:
        return self.points[self.labels == 1]

    @property
    def negatives(self) -> np.ndarray:
        return self.points[self.labels == 0]


class NoPrompt(ValueError):
    """A slice without a usable prompt (an empty CAM box): the caller counts it and skips the slice."""


def cam_box(cam_mask: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    """Bounding box (x0, y0, x1, y1), exclusive end, of a 2D binary mask; None when empty."""
    ys, xs = np.nonzero(cam_mask)
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def dilate_box(box: tuple[int, int, int, int], d: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box grown by `d` px on every side, clipped to the image (height, width)."""
    x0, y0, x1, y1 = box
    h, w = shape
    return max(0, x0 - d), max(0, y0 - d), min(w, x1 + d), min(h, y1 + d)


def cam_prompts(image: np.ndarray, cam: np.ndarray, cam_mask: np.ndarray, *, dilation: int = 10,
                n_pos: int = 5, n_neg: int = 4, top_fraction: float = 0.5) -> Prompts:
    """CLISC's prompts for one slice (reference defaults: box + 10 px, 5 positive, 4 negative points).

    Positive points: inside the (undilated) CAM box, the pixels whose CAM x intensity lies in the top
    `top_fraction` of its range there (the reference: `>= bins[-5]` of a 10-bin histogram, i.e. the top half);
    `n_pos` of them spread evenly along that list in raster order (the reference takes the first, last, middle
    and thirds). Negative points: the dilated box's corners (up to 4). Raises `NoPrompt` for an empty CAM mask."""
    if image.shape != cam.shape or cam.shape != cam_mask.shape:
        raise ValueError(f"image {image.shape}, CAM {cam.shape} and CAM mask {cam_mask.shape} differ in shape")
    box = cam_box(cam_mask)
    if box is None:
        raise NoPrompt("the CAM mask of this slice is empty: no box to prompt with")
    x0, y0, x1, y1 = box
    img = image.astype(np.float64)
    lo, hi = float(img.min()), float(img.max())
    score = cam.astype(np.float64)[y0:y1, x0:x1] * ((img[y0:y1, x0:x1] - lo) / (hi - lo) if hi > lo else 1.0)
    s_lo, s_hi = float(score.min()), float(score.max())
    cut = s_hi - top_fraction * (s_hi - s_lo)
    ys, xs = np.nonzero(score >= cut)  # raster order; never empty (the maximum qualifies)
    idx = np.unique(np.linspace(0, len(ys) - 1, num=min(n_pos, len(ys))).round().astype(int))
    pos = np.stack([xs[idx] + x0, ys[idx] + y0], axis=1).astype(np.float32)
    dx0, dy0, dx1, dy1 = dilate_box(box, dilation, image.shape)
    corners = np.array([[dx0, dy0], [dx1 - 1, dy0], [dx0, dy1 - 1], [dx1 - 1, dy1 - 1]], np.float32)[:n_neg]
    points = np.concatenate([pos, corners])
    labels = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(corners), np.int64)])
    return Prompts(np.array([dx0, dy0, dx1, dy1], np.float32), points, labels)


def equalised_uint8(image: np.ndarray) -> np.ndarray:
    """Min-max to uint8, then histogram equalisation (scikit-image), as the reference does before SAM."""
    from skimage import exposure
    img = image.astype(np.float64)
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    eq = exposure.equalize_hist((img - lo) / (hi - lo))
    return np.clip(np.rint(eq * 255), 0, 255).astype(np.uint8)


class RandomWalkerSegmenter:
    """scikit-image's random walker seeded from the prompts: positive points (a small disc each) are tumour;
    negative points and every pixel outside the dilated box are background. `beta` = edge sensitivity."""

    name = "random_walker"

    def __init__(self, beta: float = 130.0, point_radius: int = 1):
        self.beta, self.point_radius = beta, point_radius

    def __call__(self, image: np.ndarray, prompts: Prompts) -> np.ndarray:
        from skimage.segmentation import random_walker
        h, w = image.shape
        seeds = np.zeros((h, w), np.int32)
        x0, y0, x1, y1 = (int(v) for v in prompts.box)
        seeds[:] = 2
        seeds[y0:y1, x0:x1] = 0
        r = self.point_radius
        for x, y in prompts.negatives.astype(int):
            seeds[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = 2
        for x, y in prompts.positives.astype(int):
            seeds[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = 1
        if not (seeds == 1).any():
            raise NoPrompt("no positive point inside the image")
        img = image.astype(np.float64)
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        labels = random_walker(img, seeds, beta=self.beta, mode="cg_j", tol=1e-4)
        return labels == 1


def tiny_sam(seed: int = 0, img_size: int = 64):
    """A randomly initialised SAM from segment-anything's modules, small enough for a CPU test (about 0.1M
    parameters; vit_b has 93M): same classes, same predictor, same pre/post-processing."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    torch.manual_seed(seed)
    dim, patch = 32, 8
    grid = img_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(img_size=img_size, patch_size=patch, embed_dim=dim, depth=2, num_heads=2,
                                      out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(transformer_dim=dim, transformer=TwoWayTransformer(depth=1, embedding_dim=dim,
                                                                                    mlp_dim=64, num_heads=2),
                                 num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=32),
    ).eval()


class SamSegmenter:
    """segment-anything's `SamPredictor` with one mask per slice (`multimask_output=False`), the prompts' box and
    points, on the histogram-equalised slice as 3 channels."""

    name = "sam"

    def __init__(self, model_type: str = "vit_b", checkpoint: Optional[str] = None, device: str = "cpu"):
        check_sam(model_type, checkpoint)
        from segment_anything import SamPredictor, sam_model_registry
        sam = tiny_sam() if model_type == "tiny" else sam_model_registry[model_type](checkpoint=str(checkpoint))
        self.predictor = SamPredictor(sam.to(device).eval())

    def __call__(self, image: np.ndarray, prompts: Prompts) -> np.ndarray:
        import torch
        rgb = np.repeat(equalised_uint8(image)[:, :, None], 3, axis=2)
        with torch.inference_mode():
            self.predictor.set_image(rgb)
            masks, _, _ = self.predictor.predict(
                point_coords=prompts.points if len(prompts.points) else None,
                point_labels=prompts.labels if len(prompts.points) else None,
                box=prompts.box, multimask_output=False)
        return masks[0].astype(bool)


def check_sam(model_type: str, checkpoint: Optional[str]) -> None:
    """Fail before any work starts: an unknown model type, or a missing checkpoint file (named)."""
    if model_type == "tiny":
        return
    if model_type not in SAM_TYPES:
        raise ValueError(f"sam model_type {model_type!r}: expected one of {', '.join(SAM_TYPES)} or 'tiny' "
                         f"(random init, for tests)")
    if not checkpoint:
        raise ValueError(f"sam {model_type} needs a checkpoint: a local file path (weights are never downloaded)")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {checkpoint} (give the path of the "
                                f"sam_{model_type}_*.pth file you downloaded)")


def build_segmenter(kind: str, *, model_type: str = "vit_b", checkpoint: Optional[str] = None,
                    device: str = "cpu", beta: float = 130.0):
    """`random_walker` (CPU, CI) or `sam` (vit_b/l/h from a local checkpoint, or `tiny` for tests)."""
    if kind == "random_walker":
        return RandomWalkerSegmenter(beta=beta)
    if kind == "sam":
        return SamSegmenter(model_type, checkpoint, device)
    raise ValueError(f"segmenter {kind!r}: expected 'random_walker' or 'sam'")

