"""`method: unet3d`: CLISC's 3D U-Net (MONAI), trained on pseudo-labels with Ray Train through the method seam.

    method: unet3d
    unet3d:
      channels: [8, 16, 32, 64]   # the reference's unet_3D: [16, 32, 64, 128, 256]
      num_res_units: 0            # plain double-conv blocks, as the reference
      patch: [48, 48, 48]         # random crop per sample (the reference: 128^3 at 1 mm)
      loss: ce                    # ce (what the reference actually trains) | dice_ce (0.5 x (Dice + CE))
      rot_flip: true              # the reference's RandomRotFlip: rot90 in the axial plane + a flip, seeded
      pos_fraction: 0.0           # probability that a training crop is centred on a labelled voxel (0 = uniform)
      overlap: 0.25               # sliding-window overlap at evaluation / prediction
      init: ""                    # start from another unet3d model (S3F's retraining: bind `unet3d.init: unet`)

Corpus: one row per case (`volume_corpus` writes it): `sample_id` = case id, `image_uri` = an `.npz` holding the
preprocessed FLAIR (`image`, float32, nibabel's (x, y, z) order) and the label to learn (`label`, uint8 0/1: a
pseudo-label in CLISC, never ground truth), plus `affine`. The decoder loads it (local or any fsspec/zip path),
crops a `patch` at a position drawn from (seed, epoch, case) (zero-padded when the volume is smaller; with
`pos_fraction` > 0 that often centred on a random labelled voxel, MONAI's RandCropByPosNegLabel idea: the
reference's 128^3 crop of the brain box holds the whole lesion, a uniform 48^3 crop at 2 mm often only its edge),
applies the seeded rotation/flip, and ships the image as float16 and the label as uint8 (half / an eighth of float32's bytes).

Evaluation at each epoch end (the model selection without ground truth that the CLISC issue asks for): MONAI
sliding-window inference over the validation cases, Dice of the argmax against the stored labels,
`val/label_dice` (agreement with the pseudo-labels of held-out cases). `predict_volume` is the same inference for
the S3F and evaluation stages. Instance norm (MONAI's default) is per sample, so gradient accumulation and DDP
equal one process on the whole batch.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvl.config import ConfigError
from medvl.data.decode import RowDecoder, load_image_bytes
from medvl.data.volumes import write_volume_corpus  # noqa: F401  (re-exported: the corpus this method reads)
from medvl.eval.segmentation import dice as mask_dice  # noqa: F401  (binary Dice; 1.0 when both are empty)
from medvl.methods.base import Method, register_method
from medvl.models.factory import UnsafeFileError, load_tensors


@dataclass
class Unet3dConfig:
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    """Feature maps per level (the reference: [16, 32, 64, 128, 256])."""
    num_res_units: int = 0
    """Residual units per block (MONAI UNet); 0 = plain conv blocks like the reference's unet_3D."""
    patch: list[int] = field(default_factory=lambda: [48, 48, 48])
    """Training crop (x, y, z) and the sliding window at inference; each divisible by 2^(levels - 1)."""
    loss: Literal["ce", "dice_ce"] = "ce"
    """`ce`: cross-entropy (what the reference trains: its 0.5 x (Dice + CE) is overwritten); `dice_ce`: both."""
    rot_flip: bool = True
    """The reference's RandomRotFlip: a random number of 90-degree turns in the axial plane and a random flip."""
    pos_fraction: float = 0.0
    """Foreground-biased training crops: the probability that a crop is centred on a labelled voxel (one drawn at
    random; MONAI's RandCropByPosNegLabel with pos / (pos + neg) = pos_fraction), else a uniform position as
    before. Drawn from the decoder's per-sample rng, so crops stay deterministic and exact resume holds; a case
    with an empty label always gets a uniform crop. 0 = the old uniform crops, bit for bit."""
    overlap: float = 0.25
    """Sliding-window overlap (MONAI sliding_window_inference)."""
    sw_batch_size: int = 2
    """Windows per forward pass at inference."""
    init: str = field(default="", metadata={"path": True})
    """Start from these weights instead of a random initialisation: a unet3d `train` stage's output directory (its
    `model/state.pt`; bind it in a pipeline: `inputs: {unet3d.init: unet}`), a checkpoint directory or a state
    file. Empty = random init
    (the reference retrains S3F's U-Net from scratch; fine-tuning the filtered U-Net on its own kept predictions is
    the alternative `jobs/clisc_phantom.yaml` measures). The architecture must match (`channels`,
    `num_res_units`)."""

    def validate(self) -> None:
        if len(self.channels) < 2:
            raise ConfigError("unet3d.channels needs at least 2 levels")
        if len(self.patch) != 3 or min(self.patch) < 8:
            raise ConfigError("unet3d.patch must be 3 sizes >= 8")
        f = 2 ** (len(self.channels) - 1)
        if any(p % f for p in self.patch):
            raise ConfigError(f"unet3d.patch {self.patch}: each size must be divisible by {f} "
                              f"(2^(levels - 1) for {len(self.channels)} levels)")
        if not 0 <= self.overlap < 1:
            raise ConfigError("unet3d.overlap must be in [0, 1)")
        if not 0 <= self.pos_fraction <= 1:
            raise ConfigError("unet3d.pos_fraction must be in [0, 1]")


def load_case_npz(row: dict) -> dict[str, np.ndarray]:
    """A volume-corpus row's arrays: `image` float32 (x, y, z), `label` uint8, `affine`."""
    with np.load(io.BytesIO(load_image_bytes(row))) as z:
        out = {k: z[k] for k in z.files}
    if "image" not in out or "label" not in out:
        raise ValueError(f"case {row.get('sample_id')}: {row.get('image_uri')} lacks 'image' or 'label' arrays")
    if out["image"].ndim != 3 or out["image"].shape != out["label"].shape:
        raise ValueError(f"case {row.get('sample_id')}: image {out['image'].shape} and label "
                         f"{out['label'].shape} must be equal 3D shapes")
    return out


def random_patch(image: np.ndarray, label: np.ndarray, patch: tuple[int, int, int], rng: np.random.Generator,
                 rot_flip: bool, pos_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A `patch`-sized crop at a random position (zero-padded where the volume is smaller), then the reference's
    RandomRotFlip (k x 90 degrees in the axial (x, y) plane, a flip along one axis). Deterministic given `rng`.
    With probability `pos_fraction` (and a non-empty label) the crop is centred on a random labelled voxel (shifted
    to stay inside the volume, so it always contains that voxel); `pos_fraction` 0 draws nothing extra from `rng`."""
    pads = [(0, max(0, p - s)) for p, s in zip(patch, image.shape)]
    if any(b for _, b in pads):
        image, label = np.pad(image, pads), np.pad(label, pads)
    centre = None
    if pos_fraction > 0 and rng.random() < pos_fraction:
        fg = np.flatnonzero(label)
        if fg.size:
            centre = np.unravel_index(int(fg[int(rng.integers(0, fg.size))]), label.shape)
    if centre is None:
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape, patch)]
    else:
        start = [int(min(max(int(c) - p // 2, 0), s - p)) for c, s, p in zip(centre, image.shape, patch)]
    sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
    img, lab = image[sl], label[sl]
    if rot_flip:
        k = int(rng.integers(0, 4))
        axis = int(rng.integers(0, 3))
        if patch[0] == patch[1]:  # turns keep the shape only on a square axial patch
            img, lab = np.rot90(img, k, axes=(0, 1)), np.rot90(lab, k, axes=(0, 1))
        img, lab = np.flip(img, axis=axis), np.flip(lab, axis=axis)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


class VolumePatchDecoder(RowDecoder):
    columns = ("sample_id", "image", "image_uri")

    def __init__(self, patch: list[int], rot_flip: bool, train: bool, pos_fraction: float = 0.0):
        self.patch, self.rot_flip, self.train = tuple(patch), rot_flip, train
        self.pos_fraction = float(pos_fraction) if train else 0.0

    def output_dtypes(self):
        return {"image": "float16", "label": "uint8"}

    def decode(self, row, rng):
        arrays = load_case_npz(row)
        img, lab = random_patch(arrays["image"].astype(np.float32), (arrays["label"] > 0).astype(np.uint8),
                                self.patch, rng, self.rot_flip and self.train, self.pos_fraction)
        return {"image": img[None].astype(np.float16), "label": lab}


class Unet3dModule(nn.Module):
    """MONAI's 3D UNet, 1 input channel, 2 classes; `forward(batch)` returns logits and the labels."""

    def __init__(self, cfg: Unet3dConfig):
        super().__init__()
        from monai.networks.nets import UNet
        self.net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=tuple(cfg.channels),
                        strides=(2,) * (len(cfg.channels) - 1), num_res_units=cfg.num_res_units)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.net(batch["image"]), "label": batch["label"]}


def load_init(module: Unet3dModule, init: str) -> None:
    """Load `unet3d.init` (a unet3d train stage's output directory or a state file) into `module`; a missing file,
    an unsafe file or another architecture is a ConfigError naming the path."""
    from pathlib import Path
    p = Path(init)
    f = p
    if p.is_dir():  # a train stage's output (model/state.pt) or a checkpoint directory (state.pt)
        f = p / "model" / "state.pt" if (p / "model" / "state.pt").is_file() else p / "state.pt"
    if not f.is_file():
        raise ConfigError(f"unet3d.init: {f} not found (a unet3d train stage's output directory or a state file)")
    try:
        state = load_tensors(f, map_location="cpu")
    except UnsafeFileError as e:
        raise ConfigError(f"unet3d.init: {e}") from None
    sd = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise ConfigError(f"unet3d.init: {f} holds no model state dict")
    try:
        module.load_state_dict(sd)
    except RuntimeError as e:
        raise ConfigError(f"unet3d.init: {f} does not fit this unet3d (channels / num_res_units): "
                          f"{str(e).splitlines()[0][:300]}") from None


def predict_logits(net: nn.Module, image: np.ndarray, patch, overlap: float = 0.25, sw_batch_size: int = 2,
                   device="cpu") -> torch.Tensor:
    """Sliding-window inference (MONAI) over a whole preprocessed volume -> logits (1, classes, x, y, z); the net's
    train/eval mode is restored afterwards."""
    from monai.inferers import sliding_window_inference
    was = net.training
    net.eval()
    try:
        x = torch.as_tensor(np.asarray(image, np.float32))[None, None].to(device)
        with torch.no_grad():
            return sliding_window_inference(x, tuple(patch), sw_batch_size, net, overlap=overlap)
    finally:
        net.train(was)


def predict_volume(net: nn.Module, image: np.ndarray, patch, overlap: float = 0.25, sw_batch_size: int = 2,
                   device="cpu") -> np.ndarray:
    """`predict_logits` -> uint8 argmax mask (x, y, z)."""
    return predict_logits(net, image, patch, overlap, sw_batch_size, device).argmax(1)[0].to(torch.uint8).cpu().numpy()


def predict_probability(net: nn.Module, image: np.ndarray, patch, overlap: float = 0.25, sw_batch_size: int = 2,
                        device="cpu") -> np.ndarray:
    """`predict_logits` -> foreground probability (softmax, class 1), float32 (x, y, z); > 0.5 = the argmax."""
    logits = predict_logits(net, image, patch, overlap, sw_batch_size, device)
    return torch.softmax(logits.float(), 1)[0, 1].cpu().numpy()


@register_method
class Unet3dMethod(Method):
    name = "unet3d"
    config_cls = Unet3dConfig
    feature_keys = ("logits", "label")
    global_keys = ()

    def decoder(self, train: bool) -> VolumePatchDecoder:
        return VolumePatchDecoder(self.cfg.patch, self.cfg.rot_flip, train, self.cfg.pos_fraction)

    def prepare_batch(self, batch, device):
        batch["image"] = batch["image"].float()
        return batch

    def build_model(self) -> Unet3dModule:
        module = Unet3dModule(self.cfg)
        if self.cfg.init:
            load_init(module, self.cfg.init)
        return module

    def loss_terms(self) -> tuple[str, ...]:
        return ("ce", "dice") if self.cfg.loss == "dice_ce" else ("ce",)

    def loss(self, out):
        logits, label = out["logits"].float(), out["label"].long()
        ce = F.cross_entropy(logits, label)
        if self.cfg.loss == "ce":
            return {"loss": ce, "ce": ce}
        from monai.losses import DiceLoss
        dice = DiceLoss(to_onehot_y=True, softmax=True)(logits, label[:, None])
        return {"loss": 0.5 * (ce + dice), "ce": ce, "dice": dice}

    def evaluator(self):
        d, e = self.recipe.data, self.recipe.eval
        if d.val_split is None or not e.enabled:
            return None
        from medvl.data.corpus import iter_rows, shard_paths
        cases = []
        paths = shard_paths(d.val_corpus or d.corpus, d.val_split)
        for row in iter_rows(paths, columns=list(VolumePatchDecoder.columns)):
            cases.append(load_case_npz(row))
            if e.max_rows and len(cases) >= e.max_rows:
                break
        if not cases:
            return None
        c = self.cfg

        def evaluate(model, device) -> dict[str, float]:
            net = getattr(model, "module", model).net
            dice = [mask_dice(predict_volume(net, k["image"], c.patch, c.overlap, c.sw_batch_size, device),
                              k["label"]) for k in cases]
            return {"val/label_dice": float(np.mean(dice))}
        return evaluate

    def metric_names(self) -> set[str]:
        if self.recipe.data.val_split is None or not self.recipe.eval.enabled:
            return set()
        return {"val/label_dice"}

    def export(self, model, tracking_uri, run_id):
        pass  # the pipeline's train stage keeps the model (`model/state.pt`); nothing to log to MLflow
