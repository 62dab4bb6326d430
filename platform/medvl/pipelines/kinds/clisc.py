"""CLISC part 1 (issue 13) as stage kinds: `slice_labels` -> (`train` a `slice_classifier`) -> `cam` -> `amda`
-> (`train` again on the masked corpus) -> `cam` again -> `clisc_eval`. See `jobs/clisc_phantom.yaml` and the
README section "CLISC part 1".

Ground truth: the segmentations are read ONLY by `clisc_eval`. `slice_labels` loads the cases without masks (it
is handed the FLAIR paths only), the classifier trains on CLIP labels, `cam` runs on every slice the classifier
calls positive, binarisation uses Otsu / a fraction of the maximum of the CAM itself, and AMDA masks from the CAM
and the image. tests/test_clisc_stages.py deletes every `*_seg` file and checks the outputs are identical.

- `slice_labels` (driver; a Ray Data job): cases -> per-case preprocessing and axial slices (read tasks) -> an
  actor pool holding the CLIP model (softmax over the normal / tumour prompts) -> the driver drops slices under
  `confidence`, smooths labels over `window` neighbours along z, and writes `corpus/` (the labelled slices: label
  `tumour` = the CLIP label), `slices/` (every brain slice, for the CAM), `labels.parquet`, `cases.json`.
- `cam` (a Ray task): a trained `slice_classifier` over every slice of `slices/`; LayerCAM (pytorch-grad-cam) on
  `layer` for the slices it calls positive; per case a CAM volume, binarised (Otsu / fraction of max), 3D opening,
  largest component; writes `cams/<case>_cam.nii.gz` and `masks/<case>_mask.nii.gz` (original grid and affine),
  `cropped/<case>.npz` (the same on the cropped grid) and `slices.parquet` (prediction, CAM max, box per slice).
- `amda` (a Ray task): the labelled corpus with AMDA-masked copies of its training slices (`corpus/`).
- `clisc_eval` (a Ray task): the only reader of ground truth: slice-label accuracy and confusion, CAM Dice and box
  IoU (MONAI) before / after AMDA, the Otsu baseline, overlay pictures, on one split.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from medvl.config import ConfigError
from medvl.pipelines.stage import Input, PipelineError, Stage, StageContext, register_stage

LABEL_FIELD = "tumour"


# =========================================================================== slice_labels

@dataclass
class SliceLabelsConfig:
    cases: str = field(default="", metadata={"input": "file"})
    """The cases: a folder of BraTS-style case folders (`*_flair.nii.gz`) or a CSV `image_pth,mask_pth`."""
    clip_model: Optional[str] = field(default=None, metadata={"input": "file"})
    """The CLIP: a `train` stage's output, a `medvl train` run's checkpoint folder (or one checkpoint) with
    `clip_recipe`; unset with a `model` input, or with a `clip_recipe` whose `model.pretrained` names an open_clip
    checkpoint."""
    clip_recipe: Optional[str] = field(default=None, metadata={"input": "file"})
    """The training recipe describing the CLIP model (needed unless `clip_model` is a train stage's output)."""
    normal_prompt: str = ("an image of brain tissue showing typical signal intensity without any regions of "
                          "abnormal intensity or suspicious mass")
    """The no-tumour prompt (CLISC reference)."""
    tumour_prompt: str = ("an image of brain tissue showing a tumor with uneven hyperintensity and irregular "
                          "borders distinct from surroundings")
    """The tumour prompt (CLISC reference)."""
    confidence: float = 0.6
    """Slices whose larger softmax probability is below this are dropped (no label)."""
    window: int = 5
    """Majority vote over this many labelled neighbours on either side along z (0: no smoothing)."""
    logit_scale: Optional[float] = None
    """Softmax temperature (scale of the cosine logits); None: the model's own learnt `logit_scale`."""
    min_brain_fraction: float = 0.15
    """Slices with less brain area than this fraction of the case's largest slice are left out."""
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    """Case-level train / val / test fractions (seeded hash of the case id: the reference's 7:1:2)."""
    split_seed: int = 0
    skip_bad_cases: bool = False
    """False: a case that cannot be read fails the stage, naming it; True: it is skipped and counted."""
    batch_size: int = 64
    actors: int = 1
    """Ray Data actor pool size (each holds one CLIP)."""
    cpus_per_actor: float = 1.0
    use_gpu: bool = False

    def validate(self) -> None:
        if not self.cases:
            raise ConfigError("cases: name the folder (or CSV) of cases to label")
        if not 0.5 <= self.confidence <= 1:
            raise ConfigError("confidence must be in [0.5, 1]")
        if self.window < 0:
            raise ConfigError("window must be >= 0")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ConfigError("split_fractions: three fractions (train, val, test) summing to 1")
        for k in ("batch_size", "actors"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1")


def load_clip(model_dir: Optional[str], recipe_path: Optional[str]):
    """(recipe, method, model in eval mode) of the labelling CLIP (see `SliceLabelsConfig.clip_model`)."""
    import yaml

    from medvl.config import recipe_from_dict
    from medvl.train import checkpoint as ck
    d = Path(model_dir) if model_dir else None
    if d is not None and (d / "recipe.yaml").is_file() and (d / "model").is_dir():
        from medvl.pipelines.kinds.train import load_trained
        return load_trained(d)
    if not recipe_path:
        raise ConfigError("clip_recipe: needed to build the CLIP (clip_model is not a train stage's output)")
    try:
        recipe = recipe_from_dict(yaml.safe_load(Path(recipe_path).read_text()))
    except ConfigError as e:
        raise ConfigError(f"{recipe_path}: {e}") from None
    from medvl.methods import resolve_method
    if d is None:  # e.g. model.pretrained: a user's open_clip checkpoint
        method = resolve_method(recipe)
        return recipe, method, method.build_model().eval()
    from medvl.train.launcher import load_model_from_checkpoint
    ckpt = d if (d / ck.MANIFEST_FILE).is_file() else ck.latest_valid_checkpoint(d)[0]
    if ckpt is None:
        raise ConfigError(f"clip_model: {d} holds no valid medvl checkpoint")
    method, model, _ = load_model_from_checkpoint(recipe, str(ckpt))
    return recipe, method, model


def _case_slices(row: dict, min_brain_fraction: float) -> list[dict]:
    """Ray Data flat_map: one case (FLAIR path only: no mask) -> a row per axial brain slice (PNG at the cropped
    grid's resolution) with the case's geometry; an unreadable case -> one row carrying the error."""
    from medvl.data.ingest_brain import slice_png
    from medvl.data.volumes import CaseFiles, VolumeError, axial_slices, load_case, preprocess
    cid = str(row["case_id"])
    try:
        v = preprocess(load_case(CaseFiles(cid, Path(str(row["flair"]))), with_mask=False))
    except VolumeError as e:
        return [{"case_id": cid, "z": -1, "image": b"", "meta": "", "error": str(e)}]
    meta = json.dumps({"affine": v.affine.tolist(), "crop": [list(c) for c in v.crop],
                       "shape_before_crop": list(v.shape_before_crop), "shape": list(v.image.shape)})
    return [{"case_id": cid, "z": z, "image": slice_png(sl, 0, v.brain[:, :, z]), "meta": meta, "error": ""}
            for z, sl in axial_slices(v, min_brain_fraction)]


class ClipScorer:
    """Ray Data actor: the CLIP loaded once; P(tumour prompt) per slice."""

    def __init__(self, model_dir, recipe_path, prompts, logit_scale, threads, use_gpu):
        import torch

        from medvl.models.factory import tokenizer
        torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        recipe, self.method, model = load_clip(model_dir, recipe_path)
        self.model = model.to(self.device)
        self.dec = self.method.decoder(train=False)
        self.dec.setup()
        with torch.no_grad():
            t = self.method.text_features(self.model, tokenizer(recipe.model)(list(prompts)).to(self.device))
            self.text = torch.nn.functional.normalize(t.float(), dim=-1)
        ls = getattr(getattr(self.model, "clip", self.model), "logit_scale", None)
        self.scale = float(logit_scale) if logit_scale is not None else (
            float(ls.detach().exp()) if ls is not None else 100.0)

    def __call__(self, batch: dict) -> dict:
        import torch
        n = len(batch["case_id"])
        p = np.full(n, np.nan, np.float32)
        ok = [i for i in range(n) if len(batch["image"][i])]
        if ok:
            imgs = np.stack([self.dec.image({"image": bytes(batch["image"][i])}) for i in ok])
            with torch.no_grad():
                x = self.method.prepare_batch({"image": torch.from_numpy(imgs).to(self.device)}, self.device)
                f = torch.nn.functional.normalize(self.method.image_features(self.model, x["image"]).float(), dim=-1)
                p[ok] = torch.softmax(self.scale * f @ self.text.T, dim=-1)[:, 1].cpu().numpy()
        return {**batch, "p_tumour": p}


def _check_disjoint(recipe, case_ids: set[str]) -> None:
    """The CLIP's pretraining corpus must not hold the cases being labelled (its captions came from their masks)."""
    from medvl.data.corpus import CorpusError, iter_rows, shard_paths
    corpus = getattr(getattr(recipe, "data", None), "corpus", "")
    if not corpus or not Path(corpus).exists():
        return
    try:
        seen = {str(r["sample_id"]).split(":")[0] for r in iter_rows(shard_paths(corpus, None), ["sample_id"])}
    except CorpusError:
        return
    both = sorted(seen & case_ids)
    if both:
        raise PipelineError(f"the CLIP was trained on {len(both)} of the cases it would label (e.g. {both[0]}; "
                            f"corpus {corpus}): use a disjoint pretraining set")


@register_stage
class SliceLabelsStage(Stage):
    kind = "slice_labels"
    version = "1"
    config_cls = SliceLabelsConfig
    executor = "driver"  # a Ray Data job: read tasks + an actor pool
    inputs = {"model": Input("a train stage whose CLIP labels the slices (instead of clip_model)",
                             required=False, kinds=("train",))}
    ignore_keys = ("batch_size", "actors", "cpus_per_actor", "use_gpu")

    def resources(self) -> dict[str, float]:
        c = self.config
        return {"CPU": float(c.actors * c.cpus_per_actor + 1), "GPU": float(c.actors if c.use_gpu else 0)}

    def metric_names(self) -> set[str]:
        return {"cases", "cases_skipped", "slices", "labelled", "dropped", "positive_fraction", "slices_per_s"}

    def run(self, ctx: StageContext) -> dict[str, float]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import ray

        from medvl.data.clisc import smooth_labels
        from medvl.data.ingest import Ingestor
        from medvl.data.volumes import VolumeError, find_cases, split_cases
        from medvl.train.launcher import quiet_ray_data
        c = self.config
        t0 = time.perf_counter()
        model_dir = str(ctx.inputs["model"]) if "model" in ctx.inputs else c.clip_model
        if not model_dir and not c.clip_recipe:
            raise ConfigError("give the CLIP: a `model` input, clip_model or clip_recipe")
        recipe, _, _ = load_clip(model_dir, c.clip_recipe)  # fails here, once, rather than in every actor
        cases = find_cases(c.cases)  # a case folder without FLAIR: VolumeError naming it
        _check_disjoint(recipe, {x.case_id for x in cases})
        splits = split_cases([x.case_id for x in cases], tuple(c.split_fractions), c.split_seed)
        split_of = {cid: s for s, ids in splits.items() for cid in ids}
        quiet_ray_data()
        # only the FLAIR path travels: the label-free stage cannot reach a segmentation
        ds = ray.data.from_items([{"case_id": x.case_id, "flair": str(x.flair)} for x in cases],
                                 override_num_blocks=max(1, min(len(cases), 64)))
        ds = ds.flat_map(_case_slices, fn_kwargs={"min_brain_fraction": c.min_brain_fraction})
        ds = ds.map_batches(ClipScorer, fn_constructor_kwargs={
            "model_dir": model_dir, "recipe_path": c.clip_recipe, "prompts": (c.normal_prompt, c.tumour_prompt),
            "logit_scale": c.logit_scale, "threads": c.cpus_per_actor, "use_gpu": c.use_gpu},
            compute=ray.data.ActorPoolStrategy(size=c.actors), batch_size=c.batch_size,
            num_cpus=c.cpus_per_actor, num_gpus=1 if c.use_gpu else 0)
        per_case: dict[str, list[tuple[int, bytes, float]]] = {}
        metas: dict[str, dict] = {}
        errors: dict[str, str] = {}
        for b in ds.iter_batches(batch_format="numpy", batch_size=None):
            for i in range(len(b["case_id"])):
                cid = str(b["case_id"][i])
                if b["error"][i]:
                    errors[cid] = str(b["error"][i])
                    continue
                metas.setdefault(cid, json.loads(str(b["meta"][i])))
                per_case.setdefault(cid, []).append((int(b["z"][i]), bytes(b["image"][i]),
                                                     float(b["p_tumour"][i])))
        if errors and not c.skip_bad_cases:
            first = sorted(errors)[0]
            raise VolumeError(f"{len(errors)} case(s) cannot be labelled: {errors[first]}"
                              + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        # labels, per case along z
        names = [c.normal_prompt, c.tumour_prompt]
        rows = {k: [] for k in ("case_id", "z", "split", "p_tumour", "clip_label", "confident", "label")}
        corpus = Ingestor(ctx.out / "corpus", source=str(Path(c.cases).resolve()))
        slices = Ingestor(ctx.out / "slices", source=str(Path(c.cases).resolve()))
        for cid in sorted(per_case):
            items = sorted(per_case[cid])
            p = np.array([x[2] for x in items], np.float32)
            raw = (p >= 0.5).astype(np.int64)
            conf = np.maximum(p, 1 - p) >= c.confidence
            lab = smooth_labels(np.where(conf, raw, -1), c.window)
            split = split_of[cid]
            for (z, png, pz), r, cf, lb in zip(items, raw, conf, lab):
                sid = f"{cid}:{z:03d}"
                for k, v in (("case_id", cid), ("z", z), ("split", split), ("p_tumour", pz), ("clip_label", int(r)),
                             ("confident", bool(cf)), ("label", int(lb))):
                    rows[k].append(v)
                base = {"sample_id": sid, "image": png, "image_uri": None, "split": split, "study_id": cid,
                        "patient_id": cid, "view": "axial"}
                slices.add({**base, "texts": [names[int(r)]], "labels": {"p_tumour": float(pz)}})
                if lb >= 0:
                    corpus.add({**base, "texts": [names[int(lb)]], "labels": {LABEL_FIELD: float(lb)}})
        for ing in (corpus, slices):
            ing.finish(label_field=LABEL_FIELD, classnames=names, templates=["{}"], text_kind="captions")
        pq.write_table(pa.table(rows), ctx.out / "labels.parquet")
        (ctx.out / "cases.json").write_text(json.dumps(
            {cid: {**metas[cid], "split": split_of[cid]} for cid in sorted(metas)}, indent=1))
        (ctx.out / "skipped_cases.json").write_text(json.dumps(errors, indent=1))
        lab = np.asarray(rows["label"])
        n = len(lab)
        if not n:
            raise RuntimeError(f"{c.cases}: no slice could be labelled")
        return {"cases": float(len(per_case)), "cases_skipped": float(len(errors)), "slices": float(n),
                "labelled": float((lab >= 0).sum()), "dropped": float((lab < 0).sum()),
                "positive_fraction": float((lab == 1).sum() / max(1, (lab >= 0).sum())),
                "slices_per_s": n / max(time.perf_counter() - t0, 1e-9)}


# =========================================================================== cam

@dataclass
class CamConfig:
    layer: str = "layer3"
    """The classifier's module LayerCAM reads (a dotted name in the timm model: `layer3` as the reference)."""
    binarize: Literal["otsu", "fraction"] = "otsu"
    """CAM binarisation without ground truth: Otsu over the case's activated CAM values, or `fraction` x max."""
    fraction: float = 0.5
    """The fraction of the maximum (binarize: fraction)."""
    opening: int = 1
    """Iterations of 3D opening with a 3x3x3 cube (0: none)."""
    largest_component: bool = True
    """Keep only the largest 3D connected component."""
    batch_size: int = 32
    cpus: float = 1.0

    def validate(self) -> None:
        if not 0 < self.fraction < 1:
            raise ConfigError("fraction must be in (0, 1)")
        if self.opening < 0 or self.batch_size < 1:
            raise ConfigError("opening must be >= 0 and batch_size >= 1")


def read_corpus_images(corpus: Path) -> dict[str, dict[int, bytes]]:
    """case id -> z -> PNG bytes of a CLISC slice corpus."""
    from medvl.data.corpus import iter_rows, shard_paths
    out: dict[str, dict[int, bytes]] = {}
    for r in iter_rows(shard_paths(corpus, None), ["sample_id", "image"]):
        cid, _, z = str(r["sample_id"]).rpartition(":")
        out.setdefault(cid, {})[int(z)] = bytes(r["image"])
    return out


def to_volume_slice(img2d: np.ndarray) -> np.ndarray:
    """An image-oriented 2D array (rows = y flipped, cols = x: `slice_png`'s layout) -> the volume's (x, y)."""
    return np.ascontiguousarray(np.asarray(img2d)[::-1].T)


def to_image_slice(vol2d: np.ndarray) -> np.ndarray:
    """The volume's (x, y) slice -> image orientation (inverse of `to_volume_slice`)."""
    return np.ascontiguousarray(np.asarray(vol2d).T[::-1])


@register_stage
class CamStage(Stage):
    kind = "cam"
    version = "1"
    config_cls = CamConfig
    executor = "task"
    inputs = {"classifier": Input("a train stage of method slice_classifier", kinds=("train",)),
              "slices": Input("the slice_labels stage whose slices get a CAM", kinds=("slice_labels",))}
    ignore_keys = ("batch_size", "cpus")

    def resources(self) -> dict[str, float]:
        return {"CPU": float(self.config.cpus)}

    def metric_names(self) -> set[str]:
        return {"slices", "positive_slices", "skipped_no_activation", "cases_with_mask", "boxes"}

    def run(self, ctx: StageContext) -> dict[str, float]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch
        from pytorch_grad_cam import LayerCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        from skimage.transform import resize

        from medvl.data.clisc import binarize_cam, box_2d, clean_mask
        from medvl.data.volumes import save_nifti
        from medvl.methods.slice_classifier import Logits, slice_image, unwrap
        from medvl.pipelines.kinds.train import load_trained
        c = self.config
        torch.set_num_threads(max(1, int(c.cpus)))
        recipe, method, model = load_trained(ctx.inputs["classifier"])
        if recipe.method != "slice_classifier":
            raise ConfigError(f"classifier: a slice_classifier train stage is needed, got method {recipe.method!r}")
        net = Logits(unwrap(model)).eval()
        try:
            layer = net.m.net.get_submodule(c.layer)
        except AttributeError:
            raise ConfigError(f"layer: the classifier ({recipe.section('slice_classifier').arch}) has no module "
                              f"{c.layer!r}") from None
        size = recipe.section("slice_classifier").image_size
        cams = LayerCAM(model=net, target_layers=[layer])
        sl_dir = ctx.inputs["slices"]
        cases = json.loads((sl_dir / "cases.json").read_text())
        images = read_corpus_images(sl_dir / "slices")
        rows = {k: [] for k in ("case_id", "z", "split", "p_positive", "pred", "cam_max", "box")}
        n_pos = skipped = with_mask = boxes = 0
        for d in ("cams", "masks", "cropped"):
            (ctx.out / d).mkdir()
        for cid in sorted(images):
            meta = cases[cid]
            shape = tuple(meta["shape"])
            cam_vol = np.zeros(shape, np.float32)
            zs = sorted(images[cid])
            pngs = [images[cid][z] for z in zs]
            probs = np.zeros(len(zs), np.float32)
            cam_max = np.zeros(len(zs), np.float32)
            for i in range(0, len(zs), c.batch_size):
                x = torch.from_numpy(np.stack([slice_image(p, size) for p in pngs[i:i + c.batch_size]]))
                x = x.float().div_(255.0)
                with torch.no_grad():
                    pr = torch.softmax(net(x), -1)[:, 1].numpy()
                probs[i:i + len(x)] = pr
                pos = np.nonzero(pr >= 0.5)[0]
                if not len(pos):
                    continue
                g = cams(input_tensor=x[pos], targets=[ClassifierOutputTarget(1)] * len(pos))  # [P, S, S] in [0,1]
                for j, k in enumerate(pos):
                    idx = i + int(k)
                    z = zs[idx]
                    hw = (shape[1], shape[0])  # image orientation: rows = y, cols = x
                    m = float(np.nan_to_num(g[j]).max())
                    cam_max[idx] = m
                    if m <= 0:  # positive, but no activation in the layer: a counted skip (no CAM for it)
                        skipped += 1
                        continue
                    cam_vol[:, :, z] = to_volume_slice(resize(np.nan_to_num(g[j]), hw, order=1,
                                                              preserve_range=True, anti_aliasing=False))
            pred = (probs >= 0.5).astype(np.int64)
            n_pos += int(pred.sum())
            mask = clean_mask(binarize_cam(cam_vol, c.binarize, c.fraction), c.opening, c.largest_component)
            with_mask += int(mask.any())
            affine = np.asarray(meta["affine"])  # the cropped grid's affine
            full_affine = affine.copy()
            full_affine[:3, 3] = affine[:3, 3] - affine[:3, :3] @ np.array([a for a, _ in meta["crop"]], float)
            full = np.zeros(meta["shape_before_crop"], np.float32)
            sl = tuple(slice(a, b) for a, b in meta["crop"])
            full[sl] = cam_vol
            save_nifti(full, full_affine, ctx.out / "cams" / f"{cid}_cam.nii.gz")
            fm = np.zeros(meta["shape_before_crop"], np.uint8)
            fm[sl] = mask
            save_nifti(fm, full_affine, ctx.out / "masks" / f"{cid}_mask.nii.gz")
            np.savez_compressed(ctx.out / "cropped" / f"{cid}.npz", cam=cam_vol, mask=mask)
            for idx, z in enumerate(zs):
                b = box_2d(to_image_slice(mask[:, :, z]))
                boxes += b is not None
                for k, v in (("case_id", cid), ("z", z), ("split", meta["split"]), ("p_positive", float(probs[idx])),
                             ("pred", int(pred[idx])), ("cam_max", float(cam_max[idx])),
                             ("box", list(b) if b is not None else [-1, -1, -1, -1])):
                    rows[k].append(v)
        pq.write_table(pa.table(rows), ctx.out / "slices.parquet")
        return {"slices": float(len(rows["z"])), "positive_slices": float(n_pos),
                "skipped_no_activation": float(skipped), "cases_with_mask": float(with_mask), "boxes": float(boxes)}


def read_cam_slices(cam_dir: Path) -> dict[tuple[str, int], dict]:
    import pyarrow.parquet as pq
    t = pq.read_table(cam_dir / "slices.parquet").to_pylist()
    return {(r["case_id"], int(r["z"])): r for r in t}


def slice_box(r: Optional[dict]):
    if r is None or r["box"][0] < 0:
        return None
    return tuple(int(x) for x in r["box"])


# =========================================================================== amda

@dataclass
class AmdaConfig:
    mask_ratio: float = 0.8
    """r: inside a slice's CAM box, pixels with CAM > min + r (max - min) are masked (the top 20% by default)."""
    intensity_ratio: float = 0.8
    """q: slices without a box get their pixels above min + q (max - min) of intensity masked."""
    keep_original: bool = True
    """The masked copies are added to the original slices (True) or replace them (False)."""
    splits: list[str] = field(default_factory=lambda: ["train"])
    """Splits whose slices get masked copies (the others are copied unchanged, for validation)."""
    cpus: float = 1.0

    def validate(self) -> None:
        for k in ("mask_ratio", "intensity_ratio"):
            if not 0 <= getattr(self, k) < 1:
                raise ConfigError(f"{k} must be in [0, 1)")


@register_stage
class AmdaStage(Stage):
    kind = "amda"
    version = "1"
    config_cls = AmdaConfig
    executor = "task"
    inputs = {"slices": Input("the slice_labels stage (its labelled corpus)", kinds=("slice_labels",)),
              "cam": Input("the cam stage whose CAMs and boxes drive the masking", kinds=("cam",))}
    ignore_keys = ("cpus",)

    def resources(self) -> dict[str, float]:
        return {"CPU": float(self.config.cpus)}

    def metric_names(self) -> set[str]:
        return {"rows", "masked_box", "masked_intensity", "masked_pixel_fraction"}

    def run(self, ctx: StageContext) -> dict[str, float]:
        from PIL import Image

        from medvl.data.clisc import amda_mask
        from medvl.data.corpus import iter_rows, load_manifest, shard_paths
        from medvl.data.ingest import Ingestor
        c = self.config
        sl_dir, cam_dir = ctx.inputs["slices"], ctx.inputs["cam"]
        info = read_cam_slices(cam_dir)
        cams: dict[str, np.ndarray] = {}
        src = load_manifest(sl_dir / "corpus")
        ing = Ingestor(ctx.out / "corpus", source=str(sl_dir / "corpus"))
        n_box = n_int = 0
        frac = []
        for r in iter_rows(shard_paths(sl_dir / "corpus", None)):
            row = {k: r.get(k) for k in ("sample_id", "image", "image_uri", "texts", "labels", "split", "study_id",
                                         "patient_id", "view")}
            row["labels"] = dict(row["labels"] or [])
            row["texts"] = list(row["texts"] or [])
            if c.keep_original or row["split"] not in c.splits:
                ing.add(row)
            if row["split"] not in c.splits:
                continue
            cid, _, z = str(row["sample_id"]).rpartition(":")
            img = np.asarray(Image.open(io.BytesIO(bytes(row["image"]))).convert("L"))
            meta = info.get((cid, int(z)))
            box = slice_box(meta)
            cam2d = None
            if box is not None:
                if cid not in cams:
                    cams[cid] = np.load(cam_dir / "cropped" / f"{cid}.npz")["cam"]
                cam2d = to_image_slice(cams[cid][:, :, int(z)])
                n_box += 1
            else:
                n_int += 1
            m = amda_mask(img, cam2d, box, c.mask_ratio, c.intensity_ratio)
            frac.append(float(m.mean()))
            out = img.copy()
            out[m] = 0
            buf = io.BytesIO()
            Image.fromarray(out).save(buf, format="PNG")
            ing.add({**row, "sample_id": f"{row['sample_id']}:amda", "image": buf.getvalue()})
        ing.finish(label_field=src.label_field, classnames=src.classnames, templates=src.templates,
                   text_kind=src.text_kind)
        return {"rows": float(ing.stats.accepted), "masked_box": float(n_box), "masked_intensity": float(n_int),
                "masked_pixel_fraction": float(np.mean(frac)) if frac else 0.0}


# =========================================================================== clisc_eval (ground truth)

@dataclass
class CliscEvalConfig:
    cases: str = field(default="", metadata={"input": "file"})
    """The same cases as `slice_labels`, with their `*_seg` files: the only place ground truth is read."""
    split: str = "val"
    """The split evaluated (case-level, as `slice_labels` assigned it)."""
    min_lesion_pixels: int = 1
    """A slice is a ground-truth tumour slice when it has at least this many tumour pixels."""
    pictures: int = 4
    """CAM overlays before / after AMDA drawn for this many slices (the ones with the largest lesions)."""
    cpus: float = 1.0

    def validate(self) -> None:
        if not self.cases:
            raise ConfigError("cases: name the cases folder (with the segmentations) to evaluate against")


def _box_iou(a, b) -> float:
    import torch
    from monai.data.box_utils import box_iou
    if a is None or b is None:
        return 0.0
    return float(box_iou(torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32))[0, 0])


@register_stage
class CliscEvalStage(Stage):
    kind = "clisc_eval"
    version = "1"
    config_cls = CliscEvalConfig
    executor = "task"
    inputs = {"slices": Input("the slice_labels stage", kinds=("slice_labels",)),
              "cam": Input("the cam stage before AMDA", kinds=("cam",)),
              "cam_amda": Input("the cam stage after AMDA", required=False, kinds=("cam",))}
    ignore_keys = ("cpus",)

    def resources(self) -> dict[str, float]:
        return {"CPU": float(self.config.cpus)}

    def metric_names(self) -> set[str]:
        names = {"label/accuracy", "label/balanced_accuracy", "label/raw_accuracy", "label/coverage",
                 "label/tp", "label/fp", "label/tn", "label/fn", "otsu/dice", "cases"}
        for p in ("cam", "amda"):
            names |= {f"{p}/dice", f"{p}/box_iou", f"{p}/slice_accuracy"}
        return names

    def run(self, ctx: StageContext) -> dict[str, float]:
        import pyarrow.parquet as pq

        from medvl.data.clisc import box_2d
        from medvl.data.volumes import find_cases, load_case, preprocess
        from medvl.eval.segmentation import dice, otsu_baseline
        c = self.config
        sl_dir = ctx.inputs["slices"]
        cases_meta = json.loads((sl_dir / "cases.json").read_text())
        ids = sorted(cid for cid, m in cases_meta.items() if m["split"] == c.split)
        if not ids:
            raise ConfigError(f"split {c.split!r}: no case of the slice_labels stage is in it")
        files = {x.case_id: x for x in find_cases(c.cases)}
        labels = pq.read_table(sl_dir / "labels.parquet").to_pylist()
        lab = {(r["case_id"], int(r["z"])): r for r in labels}
        stages = {"cam": ctx.inputs["cam"]}
        if "cam_amda" in ctx.inputs:
            stages["amda"] = ctx.inputs["cam_amda"]
        info = {p: read_cam_slices(d) for p, d in stages.items()}
        y_true, y_lab, y_raw = [], [], []
        dices: dict[str, list[float]] = {p: [] for p in stages}
        ious: dict[str, list[float]] = {p: [] for p in stages}
        sacc: dict[str, list[float]] = {p: [] for p in stages}
        otsu, pics = [], []
        for cid in ids:
            if cid not in files:
                raise ConfigError(f"case {cid}: not found in {c.cases}")
            v = preprocess(load_case(files[cid], with_mask=True))  # GT: evaluation only
            otsu.append(dice(otsu_baseline(v.image, v.brain), v.mask))
            vols = {p: np.load(d / "cropped" / f"{cid}.npz") for p, d in stages.items()}
            for p in stages:
                dices[p].append(dice(vols[p]["mask"], v.mask))
            for (case, z), r in sorted(lab.items()):
                if case != cid:
                    continue
                gt2d = to_image_slice(v.mask[:, :, z])
                n_les = int(gt2d.sum())
                truth = int(n_les >= c.min_lesion_pixels)
                y_true.append(truth)
                y_lab.append(int(r["label"]))
                y_raw.append(int(r["clip_label"]))
                gbox = box_2d(gt2d) if truth else None
                for p in stages:
                    rr = info[p].get((cid, z))
                    sacc[p].append(float(int(rr["pred"]) == truth) if rr else 0.0)
                    pbox = slice_box(rr)
                    if gbox is not None or pbox is not None:
                        ious[p].append(_box_iou(pbox, gbox))
                if truth:
                    pics.append((n_les, cid, z, v))
        yt, yl, yr = (np.asarray(a) for a in (y_true, y_lab, y_raw))
        kept = yl >= 0
        tp = int(((yl == 1) & (yt == 1)).sum())
        fp = int(((yl == 1) & (yt == 0)).sum())
        tn = int(((yl == 0) & (yt == 0)).sum())
        fn = int(((yl == 0) & (yt == 1)).sum())
        per = [x for x in (tp / max(1, tp + fn) if (yt[kept] == 1).any() else None,
                           tn / max(1, tn + fp) if (yt[kept] == 0).any() else None) if x is not None]
        out = {"cases": float(len(ids)),
               "label/accuracy": float((yl[kept] == yt[kept]).mean()) if kept.any() else 0.0,
               "label/balanced_accuracy": float(np.mean(per)) if per else 0.0,
               "label/raw_accuracy": float((yr == yt).mean()), "label/coverage": float(kept.mean()),
               "label/tp": float(tp), "label/fp": float(fp), "label/tn": float(tn), "label/fn": float(fn),
               "otsu/dice": float(np.mean(otsu))}
        for p in ("cam", "amda"):
            out[f"{p}/dice"] = float(np.mean(dices[p])) if dices.get(p) else float("nan")
            out[f"{p}/box_iou"] = float(np.mean(ious[p])) if ious.get(p) else float("nan")
            out[f"{p}/slice_accuracy"] = float(np.mean(sacc[p])) if sacc.get(p) else float("nan")
        out = {k: v for k, v in out.items() if v == v}  # NaN: no AMDA stage given
        (ctx.out / "eval.json").write_text(json.dumps({"metrics": out, "split": c.split, "cases": ids,
                                                        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn}},
                                                       indent=1))
        ctx.log_artifact(ctx.out / "eval.json", "eval")
        pics.sort(key=lambda t: (-t[0], t[1], t[2]))
        for k, (_, cid, z, v) in enumerate(pics[:c.pictures]):
            path = ctx.out / "pictures" / f"{cid}_z{z:03d}.png"
            _overlay(path, v, z, {p: np.load(d / "cropped" / f"{cid}.npz")["cam"][:, :, z] for p, d in stages.items()})
            ctx.log_artifact(path, "pictures")
        _confusion_picture(ctx.out / "pictures" / "label_confusion.png", tp, fp, tn, fn)
        ctx.log_artifact(ctx.out / "pictures" / "label_confusion.png", "pictures")
        return out


def _overlay(path: Path, v, z: int, cams: dict[str, np.ndarray]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    img = to_image_slice(v.image[:, :, z])
    gt = to_image_slice(v.mask[:, :, z])
    fig, axes = plt.subplots(1, 1 + len(cams), figsize=(3 * (1 + len(cams)), 3))
    axes[0].imshow(img, cmap="gray")
    axes[0].contour(gt, levels=[0.5], colors="lime", linewidths=0.8)
    axes[0].set_title(f"{v.case_id} z={z}\nFLAIR + ground truth", fontsize=7)
    titles = {"cam": "LayerCAM before AMDA", "amda": "LayerCAM after AMDA"}
    for ax, (p, cam) in zip(axes[1:], cams.items()):
        ax.imshow(img, cmap="gray")
        ax.imshow(to_image_slice(cam), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.contour(gt, levels=[0.5], colors="white", linewidths=0.8)
        ax.set_title(titles.get(p, p), fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _confusion_picture(path: Path, tp: int, fp: int, tn: int, fn: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.array([[tn, fp], [fn, tp]])
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(m, cmap="Blues")
    for (i, j), val in np.ndenumerate(m):
        ax.text(j, i, str(val), ha="center", va="center")
    ax.set_xticks([0, 1], ["CLIP: normal", "CLIP: tumour"], fontsize=7)
    ax.set_yticks([0, 1], ["GT: normal", "GT: tumour"], fontsize=7)
    ax.set_title("slice labels (kept slices)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
