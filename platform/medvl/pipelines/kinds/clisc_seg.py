"""CLISC part 2 (issue 14) as stage kinds: (part 1's enhanced CAM) -> `sam_labels` -> (`train` a `unet3d` on the
pseudo-labels) -> `s3f` -> (`train` the `unet3d` again on its own kept predictions) -> `clisc_seg_eval`. See
`jobs/clisc_phantom.yaml` (stages 4-6 at its end), `jobs/clisc_brats.yaml` and the README section "CLISC part 2".

Ground truth: the segmentations are read ONLY by `clisc_seg_eval` and `clisc_gt_volumes` (the corpus of the
supervised upper bound, an evaluation-only reference row). `sam_labels` loads the FLAIR alone (the cases come from
the slice_labels stage's config; each case is built with no segmentation path), prompts come from the CAM,
the U-Net trains on pseudo-labels and its model is the last epoch's (its `val/label_dice` is the agreement with the
pseudo-labels of held-out cases: the selection signal without ground truth), S3F scores cases by the agreement of
the segmenter with the U-Net. tests/test_clisc_seg_stages.py deletes every `*_seg` file and checks the outputs of
stages 4-6 are identical.

- `sam_labels` (driver; a Ray Data job over cases, an actor pool holding the segmenter): per case the FLAIR is
  preprocessed as in part 1 (same cropped grid as the CAM), every slice the classifier called positive is prompted
  from the enhanced CAM (`medvl.models.segmenters.cam_prompts`: the CAM box dilated by `dilation` px, `n_pos`
  points where CAM x intensity is highest, `n_neg` negatives at the dilated box's corners) and segmented by the
  pluggable segmenter (`random_walker` on CPU / in CI, `sam` vit_b/l/h from a local checkpoint, `sam` with
  `model_type: tiny` = a random-init SAM for tests); the slice masks stack into a 3D pseudo-label kept inside the
  brain. Counted skips: a positive slice with no prompt (its CAM mask is empty there), a case whose pseudo-label is
  empty (left out of the corpus). Output: `labels/<case>_pseudo.nii.gz` (original grid, FLAIR affine),
  `pseudo/<case>.npz` (cropped grid: label, brain), `corpus/` (a volume corpus for `unet3d`: train + val cases,
  npz inline), `prompts.json`, `pictures/` (prompt overlays).
- `s3f` (driver; Ray Data over the training cases, actors holding the U-Net and the segmenter): the U-Net predicts
  (sliding window, inside the brain; its `component`: the largest 3D one as the reference, the most probable one
  or all), the segmenter is re-prompted from the prediction (box
  with d = 0, the same point rules with the U-Net's foreground probability as the score), similarity =
  Dice(segmenter, U-Net); keep the top `keep` fraction (`mode: top`, default 0.8) or every case >= `keep`
  (`mode: threshold`). Output: `corpus/` (kept training cases labelled with the U-Net's own predictions + the val
  cases with their pseudo-labels) for the retraining `train` stage, `similarity.json` (per case, kept or not),
  `predictions/<case>.npz`, `pictures/similarity.png`. More rounds = another `s3f` + `train` pair in the recipe
  (its `unet` input the previous retraining).
- `clisc_agreement` (driver; S3F's scoring on held-out cases): the `val` cases of the sam corpus (never trained on)
  predicted by a U-Net (the one after S3F), the segmenter re-prompted from each prediction, `agreement` = mean
  Dice(segmenter, U-Net) (an empty prediction counts 0): a ground-truth-free score of the final model, the
  objective of `jobs/sweep_clisc_amda_s3f.yaml`.
- `clisc_gt_volumes` (a Ray task; EVALUATION ONLY): the same cases and splits with their ground truth, a volume
  corpus for the supervised upper bound (`train` a `unet3d` on it). Outside the label-free chain.
- `clisc_seg_eval` (a Ray task; reads ground truth): Dice (MONAI) and HD95 in mm (MONAI; an empty prediction on a
  case with tumour is a counted failure, never 0) per case and mean +- std on one split for: Otsu on FLAIR, the
  CAM, the segmenter prompted by the CAM box alone, the pseudo-labels, the U-Net, the U-Net after S3F, the U-Net
  trained on ground truth (the U-Net rows post-processed by `component`: all / largest / most_probable, label-free);
  whether S3F works (Spearman between similarity and true Dice, mean true Dice of kept vs
  dropped cases); `table.md`, `eval.json`, overlay pictures.
"""
from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from medvl.config import ConfigError
from medvl.pipelines.stage import Input, PipelineError, Stage, StageContext, register_stage


# =========================================================================== shared pieces

@dataclass
class SegmenterConfig:
    kind: Literal["random_walker", "sam"] = "random_walker"
    """`random_walker` (scikit-image, CPU) or `sam` (segment-anything's SamPredictor, single mask)."""
    model_type: str = "vit_b"
    """SAM: vit_b / vit_l / vit_h (with `checkpoint`), or `tiny` (a random-init SAM: tests only)."""
    checkpoint: Optional[str] = field(default=None, metadata={"input": "file"})
    """SAM: the local checkpoint file (e.g. sam_vit_b_01ec64.pth); never downloaded. A missing file stops the
    pipeline when it is planned, naming the path, before any stage runs."""
    beta: float = 130.0
    """random_walker: edge sensitivity."""

    def validate(self, where: str = "segmenter") -> None:
        if self.kind == "sam":
            from medvl.models.segmenters import SAM_TYPES
            if self.model_type not in SAM_TYPES + ("tiny",):
                raise ConfigError(f"{where}.model_type {self.model_type!r}: expected one of "
                                  f"{', '.join(SAM_TYPES)} or tiny")
            if self.model_type != "tiny" and not self.checkpoint:
                raise ConfigError(f"{where}.checkpoint: SAM {self.model_type} needs a local checkpoint file")
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta must be > 0")

    def check_files(self) -> None:
        """A missing SAM checkpoint: FileNotFoundError naming the path (called before any work starts)."""
        if self.kind == "sam":
            from medvl.models.segmenters import check_sam
            check_sam(self.model_type, self.checkpoint)


def _segmenter_config(flat: dict) -> SegmenterConfig:
    """The segmenter of a sam_labels stage from its marker's (flat) config."""
    return SegmenterConfig(**{k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("segmenter.")})


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(bytes(data))) as z:
        return {k: z[k] for k in z.files}


def segment_volume(segmenter, image: np.ndarray, score: np.ndarray, mask: np.ndarray, zs, *, dilation: int,
                   n_pos: int, n_neg: int, top_fraction: float, box_only: bool = False):
    """Prompt and segment the axial slices `zs` of a volume (x, y, z arrays; a slice is `[:, :, z]`).

    Prompts per slice from `score` (the CAM, or the U-Net's foreground probability) and `mask` (the binarised CAM,
    or the U-Net's prediction) with `cam_prompts`; `box_only`: the dilated box alone (the "zero-shot" baseline;
    the random walker, which needs a foreground seed, gets the box's centre). The random walker sees the
    histogram-equalised slice (SAM equalises inside `SamSegmenter`). Returns (3D bool label, prompted slices,
    slices with no prompt, {z: Prompts})."""
    from medvl.models.segmenters import NoPrompt, Prompts, cam_prompts, equalised_uint8
    label = np.zeros(image.shape, bool)
    done, skipped, used = 0, 0, {}
    rw = getattr(segmenter, "name", "") == "random_walker"
    for z in zs:
        img = image[:, :, z]
        try:
            p = cam_prompts(img, score[:, :, z], mask[:, :, z], dilation=dilation, n_pos=n_pos, n_neg=n_neg,
                            top_fraction=top_fraction)
            if box_only:
                if rw:
                    x0, y0, x1, y1 = p.box
                    p = Prompts(p.box, np.array([[(x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2]], np.float32),
                                np.ones(1, np.int64))
                else:
                    p = Prompts(p.box)
            m = segmenter(equalised_uint8(img) if rw else img, p)
        except NoPrompt:
            skipped += 1
            continue
        label[:, :, z] = m
        used[int(z)] = p
        done += 1
    return label, done, skipped, used


def _prompts_json(used: dict) -> dict:
    return {str(z): {"box": [float(v) for v in p.box], "points": p.points.tolist(), "labels": p.labels.tolist()}
            for z, p in used.items()}


def unet_probability(net, image: np.ndarray, patch, overlap: float = 0.25, sw_batch_size: int = 2,
                     device="cpu") -> np.ndarray:
    """The U-Net's foreground probability over a whole volume (MONAI sliding window, softmax), float32 (x, y, z)."""
    from medvl.methods.unet3d import predict_probability
    return predict_probability(net, image, patch, overlap, sw_batch_size, device)


def load_unet(model_dir: str | Path):
    """(the MONAI network in eval mode, its `unet3d` config) of a `train` stage of method unet3d."""
    from medvl.pipelines.kinds.train import load_trained
    recipe, _, model = load_trained(model_dir)
    if recipe.method != "unet3d":
        raise ConfigError(f"{model_dir}: a unet3d train stage is needed, got method {recipe.method!r}")
    return model.net.eval(), recipe.section("unet3d")


class CaseSegmenter:
    """Ray Data actor: one segmenter (and, for S3F, one U-Net) loaded once; one case per call.

    Row in (`sam_labels`): case_id, flair (path), cam (path of the CAM stage's cropped npz), zs (JSON list of the
    positive slices). Row in (`s3f`): case_id, volume (npz bytes: image, label, affine), brain (npz bytes).
    Row out: the case's arrays (npz bytes), prompts (JSON), prompted / no_prompt counts, similarity, error."""

    def __init__(self, segmenter: dict, prompts: dict, threads: float, use_gpu: bool,
                 unet_dir: Optional[str] = None, component: str = "largest"):
        import torch

        from medvl.models.segmenters import build_segmenter
        torch.set_num_threads(max(1, int(threads)))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        cfg = SegmenterConfig(**segmenter)
        self.seg = build_segmenter(cfg.kind, model_type=cfg.model_type, checkpoint=cfg.checkpoint,
                                   device=self.device, beta=cfg.beta)
        self.prompts = prompts
        self.unet = None
        self.component = component
        if unet_dir:
            self.unet, self.ucfg = load_unet(unet_dir)
            self.unet.to(self.device)

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in ("case_id", "arrays", "prompts", "prompted", "no_prompt", "similarity", "error")}
        for i in range(len(batch["case_id"])):
            cid = str(batch["case_id"][i])
            try:
                r = self._one(batch, i)
                err = ""
            except Exception as e:  # noqa: BLE001 - reported per case by the driver, naming it
                r, err = {"arrays": b"", "prompts": "{}", "prompted": 0, "no_prompt": 0, "similarity": float("nan")}, \
                    f"case {cid}: {type(e).__name__}: {e}"
            out["case_id"].append(cid)
            out["error"].append(err)
            for k, v in r.items():
                out[k].append(v)
        return out

    def _one(self, batch: dict, i: int) -> dict:
        from medvl.data.volumes import CaseFiles, load_case, preprocess
        p = self.prompts
        if self.unet is None:  # sam_labels: prompts from the enhanced CAM
            cid = str(batch["case_id"][i])
            v = preprocess(load_case(CaseFiles(cid, Path(str(batch["flair"][i]))), with_mask=False))
            with np.load(str(batch["cam"][i])) as z:
                cam, cmask = z["cam"], z["mask"]
            if cam.shape != v.image.shape:
                raise ValueError(f"CAM {cam.shape} and the preprocessed FLAIR {v.image.shape} differ in shape")
            label, done, skipped, used = segment_volume(self.seg, v.image, cam, cmask, json.loads(str(batch["zs"][i])),
                                                        dilation=p["dilation"], n_pos=p["n_pos"], n_neg=p["n_neg"],
                                                        top_fraction=p["top_fraction"])
            label &= v.brain
            return {"arrays": _npz_bytes(image=v.image, label=label.astype(np.uint8), brain=v.brain,
                                         affine=v.affine),
                    "prompts": json.dumps(_prompts_json(used)), "prompted": done, "no_prompt": skipped,
                    "similarity": float("nan")}
        # s3f: the U-Net predicts, the segmenter is re-prompted from its prediction (box d = 0)
        from medvl.eval.s3f import choose_component, similarity
        vol = _npz(batch["volume"][i])
        brain = _npz(batch["brain"][i])["brain"].astype(bool)
        u = self.ucfg
        prob = unet_probability(self.unet, vol["image"], u.patch, u.overlap, u.sw_batch_size, self.device)
        pred = choose_component((prob > 0.5) & brain, prob, self.component)
        zs = [int(z) for z in np.nonzero(pred.any(axis=(0, 1)))[0]]
        seg, done, skipped, used = segment_volume(self.seg, vol["image"], prob, pred, zs, dilation=0,
                                                  n_pos=p["n_pos"], n_neg=p["n_neg"],
                                                  top_fraction=p["top_fraction"])
        seg &= brain
        sim = similarity(seg, pred) if pred.any() else float("nan")  # an empty prediction is never kept
        return {"arrays": _npz_bytes(prediction=pred.astype(np.uint8), segmenter=seg.astype(np.uint8)),
                "prompts": json.dumps(_prompts_json(used)), "prompted": done, "no_prompt": skipped,
                "similarity": float(sim)}


def _run_actor_pool(rows: list[dict], ctor: dict, actors: int, cpus: float, use_gpu: bool) -> list[dict]:
    import ray

    from medvl.train.launcher import quiet_ray_data
    quiet_ray_data()
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 64)))
    ds = ds.map_batches(CaseSegmenter, fn_constructor_kwargs=ctor, compute=ray.data.ActorPoolStrategy(size=actors),
                        batch_size=1, num_cpus=cpus, num_gpus=1 if use_gpu else 0)
    out = []
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i in range(len(b["case_id"])):
            out.append({k: b[k][i] for k in b})
    return sorted(out, key=lambda r: str(r["case_id"]))


def _raise_errors(results: list[dict], what: str) -> None:
    errors = [str(r["error"]) for r in results if str(r["error"])]
    if errors:
        raise RuntimeError(f"{what}: {len(errors)} case(s) failed: {errors[0]}"
                           + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))


def _original_grid(meta: dict, arr: np.ndarray):
    """A cropped-grid array on the case's original grid, with the original affine (part 1's cases.json meta)."""
    from medvl.data.volumes import uncrop_array
    affine = np.asarray(meta["affine"])
    full_affine = affine.copy()
    full_affine[:3, 3] = affine[:3, 3] - affine[:3, :3] @ np.array([a for a, _ in meta["crop"]], float)
    return uncrop_array(arr, meta["shape_before_crop"], meta["crop"]), full_affine


# =========================================================================== sam_labels

@dataclass
class SamLabelsConfig:
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    """The prompt-driven 2D segmenter (`kind`, `model_type`, `checkpoint`, `beta`)."""
    dilation: int = 10
    """d: the CAM box grown by this many pixels (the reference: 10)."""
    n_pos: int = 5
    """Positive points where CAM x intensity is highest (the reference: 5)."""
    n_neg: int = 4
    """Negative points at the dilated box's corners (the reference: 4)."""
    top_fraction: float = 0.5
    """Positive points are drawn among the pixels in the top fraction of the CAM x intensity range in the box."""
    pictures: int = 4
    """Prompt overlays (box, points, pseudo-label) drawn for this many slices (the largest pseudo-labels)."""
    actors: int = 1
    """Ray Data actor pool size (each holds one segmenter; one GPU each with use_gpu)."""
    cpus_per_actor: float = 1.0
    use_gpu: bool = False

    def validate(self) -> None:
        self.segmenter.validate()
        if self.dilation < 0 or self.n_pos < 1 or self.n_neg < 0 or self.n_neg > 4:
            raise ConfigError("dilation must be >= 0, n_pos >= 1, n_neg in 0..4")
        if not 0 < self.top_fraction <= 1:
            raise ConfigError("top_fraction must be in (0, 1]")
        if self.actors < 1:
            raise ConfigError("actors must be >= 1")


def _case_files(ctx: StageContext) -> tuple[dict, dict]:
    """(case id -> FLAIR path, case id -> part-1 meta with split) of the slice_labels stage feeding this one."""
    from medvl.data.volumes import find_cases
    sl_dir = ctx.inputs["slices"]
    metas = json.loads((sl_dir / "cases.json").read_text())
    src = (ctx.upstream.get("slices") or {}).get("config", {}).get("cases")
    if not src:
        raise PipelineError(f"stage {ctx.stage}: its slices input names no `cases` (a slice_labels stage)")
    flair = {x.case_id: str(x.flair) for x in find_cases(src)}  # FLAIR paths only: never a segmentation
    missing = sorted(set(metas) - set(flair))
    if missing:
        raise PipelineError(f"case {missing[0]}: in the slice_labels output but not in {src}")
    return flair, metas


@register_stage
class SamLabelsStage(Stage):
    kind = "sam_labels"
    version = "1"
    config_cls = SamLabelsConfig
    executor = "driver"  # a Ray Data job: an actor pool of segmenters over cases
    inputs = {"cam": Input("the (enhanced) cam stage whose CAM prompts the segmenter"),
              "slices": Input("the slice_labels stage (cases, splits, the cropped grid)")}
    ignore_keys = ("actors", "cpus_per_actor", "use_gpu")

    def resources(self) -> dict[str, float]:
        c = self.config
        return {"CPU": float(c.actors * c.cpus_per_actor + 1), "GPU": float(c.actors if c.use_gpu else 0)}

    def metric_names(self) -> set[str]:
        return {"cases", "cases_empty", "slices_prompted", "slices_no_prompt", "pseudo_voxels_mean",
                "corpus_train", "corpus_val", "cases_per_s"}

    def run(self, ctx: StageContext) -> dict[str, float]:
        import pyarrow.parquet as pq

        from medvl.data.volumes import save_nifti, write_volume_corpus
        c = self.config
        t0 = time.perf_counter()
        c.segmenter.check_files()  # before any work starts
        flair, metas = _case_files(ctx)
        cam_dir = ctx.inputs["cam"]
        pos: dict[str, list[int]] = {}
        for r in pq.read_table(cam_dir / "slices.parquet", columns=["case_id", "z", "pred"]).to_pylist():
            if int(r["pred"]) == 1:
                pos.setdefault(str(r["case_id"]), []).append(int(r["z"]))
        rows = []
        for cid in sorted(metas):
            npz = cam_dir / "cropped" / f"{cid}.npz"
            if not npz.is_file():
                raise PipelineError(f"case {cid}: the cam stage has no CAM for it ({npz})")
            rows.append({"case_id": cid, "flair": flair[cid], "cam": str(npz),
                         "zs": json.dumps(sorted(pos.get(cid, [])))})
        prompts = {"dilation": c.dilation, "n_pos": c.n_pos, "n_neg": c.n_neg, "top_fraction": c.top_fraction}
        seg = {"kind": c.segmenter.kind, "model_type": c.segmenter.model_type,
               "checkpoint": c.segmenter.checkpoint, "beta": c.segmenter.beta}
        results = _run_actor_pool(rows, {"segmenter": seg, "prompts": prompts, "threads": c.cpus_per_actor,
                                         "use_gpu": c.use_gpu}, c.actors, c.cpus_per_actor, c.use_gpu)
        _raise_errors(results, "sam_labels")
        empty, prompted, no_prompt, voxels = [], 0, 0, []
        corpus, all_prompts, pics = [], {}, []
        for r in results:
            cid = str(r["case_id"])
            a = _npz(r["arrays"])
            label, split = a["label"], metas[cid]["split"]
            full, aff = _original_grid(metas[cid], label)
            save_nifti(full, aff, ctx.out / "labels" / f"{cid}_pseudo.nii.gz")
            (ctx.out / "pseudo").mkdir(exist_ok=True)
            np.savez_compressed(ctx.out / "pseudo" / f"{cid}.npz", label=label, brain=a["brain"])
            prompted += int(r["prompted"])
            no_prompt += int(r["no_prompt"])
            voxels.append(int(label.sum()))
            pj = json.loads(str(r["prompts"]))
            all_prompts[cid] = pj
            if not label.any():
                empty.append(cid)  # counted skip: nothing to learn from this case
            elif split in ("train", "val"):
                corpus.append((cid, split, a["image"], label, a["affine"]))
            for z, p in pj.items():
                pics.append((int(label[:, :, int(z)].sum()), cid, int(z)))
        n_train = sum(1 for x in corpus if x[1] == "train")
        if not n_train:
            raise RuntimeError(f"sam_labels: no training case has a non-empty pseudo-label ({len(empty)} of "
                               f"{len(results)} cases empty, {no_prompt} positive slices without a prompt)")
        write_volume_corpus(ctx.out / "corpus", corpus, source="clisc sam_labels", inline=True, shard_size=16)
        (ctx.out / "prompts.json").write_text(json.dumps(all_prompts))
        (ctx.out / "skipped.json").write_text(json.dumps({"empty_pseudo_label": empty}, indent=1))
        pics.sort(key=lambda t: (-t[0], t[1], t[2]))
        images = {}
        for _, cid, z in pics[:c.pictures]:
            if cid not in images:
                images[cid] = _npz(next(r["arrays"] for r in results if str(r["case_id"]) == cid))
            path = ctx.out / "pictures" / f"{cid}_z{z:03d}_prompts.png"
            _prompt_picture(path, images[cid]["image"][:, :, z], images[cid]["label"][:, :, z],
                            all_prompts[cid][str(z)], f"{cid} z={z}: prompts ({c.segmenter.kind})")
            ctx.log_artifact(path, "pictures")
        return {"cases": float(len(results)), "cases_empty": float(len(empty)), "slices_prompted": float(prompted),
                "slices_no_prompt": float(no_prompt), "pseudo_voxels_mean": float(np.mean(voxels)),
                "corpus_train": float(n_train), "corpus_val": float(len(corpus) - n_train),
                "cases_per_s": len(results) / max(time.perf_counter() - t0, 1e-9)}


def _prompt_picture(path: Path, img: np.ndarray, label: np.ndarray, p: dict, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(3.2, 3.2))
    # the 2D arrays are the volume's (x, y) slices: rows = x, columns = y; the prompts are (column, row) points
    ax.imshow(img, cmap="gray")
    if label.any():
        ax.contour(label, levels=[0.5], colors="yellow", linewidths=0.8)
    x0, y0, x1, y1 = p["box"]
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=0.8))
    pts, labs = np.asarray(p["points"]).reshape(-1, 2), np.asarray(p["labels"])
    for lab, colour in ((1, "lime"), (0, "red")):
        q = pts[labs == lab]
        if len(q):
            ax.scatter(q[:, 0], q[:, 1], c=colour, s=12, marker="*" if lab else "x")
    ax.set_title(title, fontsize=7)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# =========================================================================== s3f

@dataclass
class S3fConfig:
    mode: Literal["top", "threshold"] = "top"
    """`top`: keep the `keep` fraction of training cases with the highest similarity; `threshold`: keep every case
    with similarity >= `keep`."""
    keep: float = 0.8
    """The kept fraction (mode top; the reference: 0.8) or the similarity threshold (mode threshold)."""
    component: Literal["largest", "most_probable", "all"] = "largest"
    """Which part of the U-Net's prediction (inside the brain) S3F prompts from, scores and retrains on:
    `largest` 3D component (the reference), `most_probable` (the component with the highest mean U-Net
    foreground probability) or `all` components (`medvl.eval.s3f.choose_component`)."""
    actors: int = 1
    cpus_per_actor: float = 1.0
    use_gpu: bool = False

    def validate(self) -> None:
        if self.mode == "top" and not 0 < self.keep <= 1:
            raise ConfigError("keep: the kept fraction must be in (0, 1] (mode top)")
        if self.mode == "threshold" and not 0 <= self.keep <= 1:
            raise ConfigError("keep: the similarity threshold must be in [0, 1] (mode threshold)")
        if self.actors < 1:
            raise ConfigError("actors must be >= 1")
        if self.component not in ("largest", "most_probable", "all"):
            raise ConfigError(f"component {self.component!r}: expected largest, most_probable or all")


@register_stage
class S3fStage(Stage):
    kind = "s3f"
    version = "1"
    config_cls = S3fConfig
    executor = "driver"  # a Ray Data job: actors holding the U-Net and the segmenter
    inputs = {"unet": Input("the train stage of method unet3d to filter and retrain", kinds=("train",)),
              "sam": Input("the sam_labels stage (its segmenter, prompt rules and volume corpus)",
                           kinds=("sam_labels",))}
    ignore_keys = ("actors", "cpus_per_actor", "use_gpu")

    def resources(self) -> dict[str, float]:
        c = self.config
        return {"CPU": float(c.actors * c.cpus_per_actor + 1), "GPU": float(c.actors if c.use_gpu else 0)}

    def metric_names(self) -> set[str]:
        return {"cases", "kept", "dropped", "empty_predictions", "similarity_mean", "similarity_min",
                "similarity_max", "kept_min_similarity", "cases_per_s"}

    def run(self, ctx: StageContext) -> dict[str, float]:
        from medvl.data.volumes import write_volume_corpus
        from medvl.eval.s3f import select
        c = self.config
        t0 = time.perf_counter()
        vols, results = _rescore(ctx, "train", c.component, c.actors, c.cpus_per_actor, c.use_gpu, "s3f")
        scores = {str(r["case_id"]): float(r["similarity"]) for r in results}
        try:
            kept = select(scores, c.mode, c.keep)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        (ctx.out / "predictions").mkdir()
        preds = {}
        for r in results:
            cid = str(r["case_id"])
            a = _npz(r["arrays"])
            preds[cid] = a["prediction"]
            np.savez_compressed(ctx.out / "predictions" / f"{cid}.npz", **a)
        cases = []
        for cid in kept:  # retraining labels: the U-Net's own predictions of the kept cases
            v = _npz(vols[cid][1])
            cases.append((cid, "train", v["image"], preds[cid], v["affine"]))
        for cid in sorted(k for k, (s, _) in vols.items() if s == "val"):  # held-out agreement: pseudo-labels
            v = _npz(vols[cid][1])
            cases.append((cid, "val", v["image"], v["label"], v["affine"]))
        if not kept:
            raise RuntimeError(f"s3f: no case kept ({c.mode} {c.keep}; similarities {scores})")
        write_volume_corpus(ctx.out / "corpus", cases, source="clisc s3f", inline=True, shard_size=16)
        doc = {"mode": c.mode, "keep": c.keep, "kept": kept,
               "cases": {cid: {"similarity": None if math.isnan(s) else s, "kept": cid in kept}
                         for cid, s in sorted(scores.items())}}
        (ctx.out / "similarity.json").write_text(json.dumps(doc, indent=1))
        ctx.log_artifact(ctx.out / "similarity.json", "s3f")
        _similarity_picture(ctx.out / "pictures" / "similarity.png", scores, kept)
        ctx.log_artifact(ctx.out / "pictures" / "similarity.png", "pictures")
        ok = [s for s in scores.values() if not math.isnan(s)]
        return {"cases": float(len(scores)), "kept": float(len(kept)), "dropped": float(len(scores) - len(kept)),
                "empty_predictions": float(len(scores) - len(ok)),
                "similarity_mean": float(np.mean(ok)) if ok else 0.0,
                "similarity_min": float(np.min(ok)) if ok else 0.0,
                "similarity_max": float(np.max(ok)) if ok else 0.0,
                "kept_min_similarity": float(min(scores[k] for k in kept)),
                "cases_per_s": len(scores) / max(time.perf_counter() - t0, 1e-9)}


# =========================================================================== clisc_agreement

@dataclass
class AgreementConfig:
    split: str = "val"
    """The cases of the `sam` input's corpus scored: `val` = held out from every U-Net's training (the U-Nets train
    on `train`; `val` only feeds their `val/label_dice`)."""
    component: Literal["largest", "most_probable", "all"] = "most_probable"
    """As `s3f.component`: the part of the U-Net's prediction prompted from and scored."""
    actors: int = 1
    cpus_per_actor: float = 1.0
    use_gpu: bool = False

    def validate(self) -> None:
        if self.actors < 1:
            raise ConfigError("actors must be >= 1")
        if self.component not in ("largest", "most_probable", "all"):
            raise ConfigError(f"component {self.component!r}: expected largest, most_probable or all")


@register_stage
class AgreementStage(Stage):
    """A ground-truth-free score of a U-Net (the objective of `jobs/sweep_clisc_amda_s3f.yaml`): S3F's similarity
    on held-out cases. Each `split` case is predicted by the `unet` input, the segmenter of the `sam` input is
    re-prompted from the prediction (box d = 0, the same point rules) and the case scores Dice(segmenter, U-Net).
    `agreement` = the mean over cases, an empty prediction counting 0 (the model found nothing; every phantom and
    every BraTS case has a tumour). Output: `agreement.json` (per case)."""
    kind = "clisc_agreement"
    version = "1"
    config_cls = AgreementConfig
    executor = "driver"  # a Ray Data job: actors holding the U-Net and the segmenter
    inputs = {"unet": Input("the unet3d train stage scored (e.g. the U-Net after S3F)", kinds=("train",)),
              "sam": Input("the sam_labels stage (its segmenter, prompt rules and held-out cases)",
                           kinds=("sam_labels",))}
    ignore_keys = ("actors", "cpus_per_actor", "use_gpu")

    def resources(self) -> dict[str, float]:
        c = self.config
        return {"CPU": float(c.actors * c.cpus_per_actor + 1), "GPU": float(c.actors if c.use_gpu else 0)}

    def metric_names(self) -> set[str]:
        return {"agreement", "agreement_std", "cases", "empty_predictions"}

    def run(self, ctx: StageContext) -> dict[str, float]:
        c = self.config
        _, results = _rescore(ctx, c.split, c.component, c.actors, c.cpus_per_actor, c.use_gpu, "clisc_agreement")
        raw = {str(r["case_id"]): float(r["similarity"]) for r in results}
        scores = {k: 0.0 if math.isnan(v) else v for k, v in raw.items()}
        doc = {"split": c.split, "component": c.component,
               "cases": {k: {"similarity": scores[k], "empty_prediction": math.isnan(raw[k])} for k in sorted(raw)}}
        (ctx.out / "agreement.json").write_text(json.dumps(doc, indent=1))
        ctx.log_artifact(ctx.out / "agreement.json", "agreement")
        v = list(scores.values())
        return {"agreement": float(np.mean(v)), "agreement_std": float(np.std(v)), "cases": float(len(v)),
                "empty_predictions": float(sum(math.isnan(x) for x in raw.values()))}


def _rescore(ctx: StageContext, split: str, component: str, actors: int, cpus: float, use_gpu: bool,
             what: str) -> tuple[dict, list[dict]]:
    """S3F's scoring of the `split` cases of the `sam` input's corpus by the `unet` input: (case id -> (split, npz
    bytes) of the whole corpus, the actors' rows sorted by case: prediction, re-prompted segmenter mask,
    similarity). Used by `s3f` (training cases) and `clisc_agreement` (held-out cases)."""
    from medvl.data.corpus import iter_rows, shard_paths
    sam_dir = ctx.inputs["sam"]
    flat = (ctx.upstream.get("sam") or {}).get("config") or {}
    segc = _segmenter_config(flat)
    segc.check_files()
    prompts = {"n_pos": int(flat.get("n_pos", 5)), "n_neg": int(flat.get("n_neg", 4)),
               "top_fraction": float(flat.get("top_fraction", 0.5))}
    vols = {str(r["sample_id"]): (str(r["split"]), bytes(r["image"]))
            for r in iter_rows(shard_paths(sam_dir / "corpus", None), ["sample_id", "split", "image"])}
    ids = sorted(k for k, (s, _) in vols.items() if s == split)
    if not ids:
        raise ConfigError(f"{what}: no {split} case in {sam_dir / 'corpus'}")
    rows = [{"case_id": cid, "volume": vols[cid][1],
             "brain": _npz_bytes(brain=np.load(sam_dir / "pseudo" / f"{cid}.npz")["brain"])} for cid in ids]
    seg = {"kind": segc.kind, "model_type": segc.model_type, "checkpoint": segc.checkpoint, "beta": segc.beta}
    results = _run_actor_pool(rows, {"segmenter": seg, "prompts": prompts, "threads": cpus, "use_gpu": use_gpu,
                                     "unet_dir": str(ctx.inputs["unet"]), "component": component},
                              actors, cpus, use_gpu)
    _raise_errors(results, what)
    return vols, results


def _similarity_picture(path: Path, scores: dict[str, float], kept: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    k = [v for c, v in scores.items() if c in kept and not math.isnan(v)]
    d = [v for c, v in scores.items() if c not in kept and not math.isnan(v)]
    fig, ax = plt.subplots(figsize=(4, 2.6))
    bins = np.linspace(0, 1, 21)
    ax.hist([k, d], bins=bins, stacked=True, color=["tab:green", "tab:red"], label=["kept", "dropped"])
    ax.set_xlabel("S3F similarity = Dice(segmenter, U-Net)", fontsize=7)
    ax.set_ylabel("cases", fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# =========================================================================== ground truth: evaluation only

@dataclass
class GtVolumesConfig:
    cases: str = field(default="", metadata={"input": "file"})
    """The same cases as `slice_labels`, with their `*_seg` files (EVALUATION ONLY: the supervised upper bound)."""
    cpus: float = 1.0

    def validate(self) -> None:
        if not self.cases:
            raise ConfigError("cases: name the cases folder (with the segmentations)")


@register_stage
class GtVolumesStage(Stage):
    kind = "clisc_gt_volumes"
    version = "1"
    config_cls = GtVolumesConfig
    executor = "task"
    inputs = {"slices": Input("the slice_labels stage (the splits)")}
    ignore_keys = ("cpus",)

    def resources(self) -> dict[str, float]:
        return {"CPU": float(self.config.cpus)}

    def metric_names(self) -> set[str]:
        return {"corpus_train", "corpus_val"}

    def run(self, ctx: StageContext) -> dict[str, float]:
        from medvl.data.volumes import find_cases, load_case, preprocess, write_volume_corpus
        metas = json.loads((ctx.inputs["slices"] / "cases.json").read_text())
        files = {x.case_id: x for x in find_cases(self.config.cases)}
        cases = []
        for cid in sorted(metas):
            split = metas[cid]["split"]
            if split not in ("train", "val"):
                continue
            if cid not in files:
                raise ConfigError(f"case {cid}: not found in {self.config.cases}")
            v = preprocess(load_case(files[cid], with_mask=True))  # ground truth: evaluation only
            cases.append((cid, split, v.image, v.mask, v.affine))
        write_volume_corpus(ctx.out / "corpus", cases, source="clisc ground truth (evaluation only)", inline=True,
                            shard_size=16)
        n = sum(1 for x in cases if x[1] == "train")
        return {"corpus_train": float(n), "corpus_val": float(len(cases) - n)}


@dataclass
class SegEvalConfig:
    cases: str = field(default="", metadata={"input": "file"})
    """The same cases as `slice_labels`, with their `*_seg` files: ground truth, read only here."""
    split: str = "test"
    """The split evaluated (case-level, as `slice_labels` assigned it)."""
    box_baseline: bool = True
    """Also segment the split with the segmenter prompted by the CAM box alone (the "zero-shot" reference row)."""
    pictures: int = 3
    """Pseudo-label / U-Net / ground-truth overlays for this many cases (their largest lesion slice)."""
    component: Literal["all", "largest", "most_probable"] = "all"
    """Label-free post-processing of every U-Net row's prediction (inside the brain) before it is scored, as S3F's
    `component` (`medvl.eval.s3f.choose_component`): `all` = the whole argmax mask (no post-processing),
    `largest` 3D component, `most_probable` = the component with the highest mean foreground probability. With
    anything but `all`, the table also lists each U-Net row's Dice without it."""
    cpus: float = 1.0
    use_gpu: bool = False
    """Run the U-Nets and the box-only segmenter (SAM) on a GPU."""

    def validate(self) -> None:
        if not self.cases:
            raise ConfigError("cases: name the cases folder (with the segmentations) to evaluate against")
        if self.component not in ("all", "largest", "most_probable"):
            raise ConfigError(f"component {self.component!r}: expected all, largest or most_probable")


ROWS = {"otsu": "Otsu on FLAIR inside the brain (intensity baseline)",
        "cam": "enhanced CAM (binarised, 3D clean-up)",
        "box_only": "segmenter prompted by the CAM box alone (zero-shot)",
        "pseudo": "pseudo-labels (segmenter, CAM prompts)",
        "unet": "3D U-Net on the pseudo-labels",
        "unet_s3f": "3D U-Net after S3F self-training",
        "unet_gt": "3D U-Net on ground truth (supervised upper bound)"}


def _summary(dices: list[float], hds: list[float], worst: float) -> dict[str, float]:
    from medvl.eval.segmentation import hd95_summary
    s = hd95_summary(hds, worst)
    return {"dice": float(np.mean(dices)), "dice_std": float(np.std(dices)), "hd95": s["hd95_mean"],
            "hd95_std": s["hd95_std"], "hd95_failures": s["hd95_failures"],
            "hd95_worst_for_failures": s["hd95_mean_failures_as_worst"]}


@register_stage
class SegEvalStage(Stage):
    kind = "clisc_seg_eval"
    version = "1"
    config_cls = SegEvalConfig
    executor = "task"
    inputs = {"slices": Input("the slice_labels stage (splits)"),
              "cam": Input("the (enhanced) cam stage", required=False),
              "sam": Input("the sam_labels stage", kinds=("sam_labels",)),
              "unet": Input("the unet3d train stage on the pseudo-labels", required=False, kinds=("train",)),
              "s3f": Input("the s3f stage (its similarities: is S3F's ranking right?)", required=False,
                           kinds=("s3f",)),
              "unet_s3f": Input("the unet3d train stage after S3F", required=False, kinds=("train",)),
              "unet_gt": Input("a unet3d train stage on ground truth (upper bound)", required=False,
                               kinds=("train",))}
    ignore_keys = ("cpus", "use_gpu")

    def resources(self) -> dict[str, float]:
        return {"CPU": float(self.config.cpus), "GPU": 1.0 if self.config.use_gpu else 0.0}

    def metric_names(self) -> set[str]:
        names = {"cases", "s3f/spearman", "s3f/kept_true_dice", "s3f/dropped_true_dice", "s3f/cases"}
        for r in ROWS:
            names |= {f"{r}/{k}" for k in ("dice", "dice_std", "hd95", "hd95_std", "hd95_failures",
                                           "hd95_worst_for_failures")}
        names |= {f"{r}/dice_all_components" for r in ("unet", "unet_s3f", "unet_gt")}
        return names

    def run(self, ctx: StageContext) -> dict[str, float]:
        import torch

        from medvl.data.volumes import find_cases, load_case, preprocess
        from medvl.eval.s3f import choose_component, validity
        from medvl.eval.segmentation import dice, hd95, otsu_baseline
        from medvl.models.segmenters import build_segmenter
        c = self.config
        torch.set_num_threads(max(1, int(c.cpus)))
        device = "cuda" if c.use_gpu and torch.cuda.is_available() else "cpu"
        metas = json.loads((ctx.inputs["slices"] / "cases.json").read_text())
        ids = sorted(cid for cid, m in metas.items() if m["split"] == c.split)
        if not ids:
            raise ConfigError(f"split {c.split!r}: no case of the slice_labels stage is in it")
        files = {x.case_id: x for x in find_cases(c.cases)}
        sam_dir = ctx.inputs["sam"]
        flat = (ctx.upstream.get("sam") or {}).get("config") or {}
        nets = {r: load_unet(ctx.inputs[r]) for r in ("unet", "unet_s3f", "unet_gt") if r in ctx.inputs}
        for net, _ in nets.values():
            net.to(device)
        seg = None
        if c.box_baseline and "cam" in ctx.inputs:
            segc = _segmenter_config(flat)
            segc.check_files()
            seg = build_segmenter(segc.kind, model_type=segc.model_type, checkpoint=segc.checkpoint,
                                  device=device, beta=segc.beta)
        per: dict[str, dict[str, list]] = {}
        per_case: dict[str, dict] = {}
        raw_dice: dict[str, list[float]] = {}  # U-Net rows without the component post-processing
        pics = []

        def add(row, cid, pred, v):
            d, h = dice(pred, v.mask), hd95(pred, v.mask, v.spacing)
            per.setdefault(row, {"dice": [], "hd95": []})
            per[row]["dice"].append(d)
            per[row]["hd95"].append(h)
            per_case.setdefault(cid, {})[row] = {"dice": d, "hd95": None if math.isnan(h) else h}

        worst = 0.0
        for cid in ids:
            if cid not in files:
                raise ConfigError(f"case {cid}: not found in {c.cases}")
            v = preprocess(load_case(files[cid], with_mask=True))  # ground truth: evaluation only
            worst = max(worst, float(np.linalg.norm(np.asarray(v.image.shape) * np.asarray(v.spacing))))
            add("otsu", cid, otsu_baseline(v.image, v.brain), v)
            preds = {}
            if "cam" in ctx.inputs:
                with np.load(ctx.inputs["cam"] / "cropped" / f"{cid}.npz") as z:
                    cam, cmask = z["cam"], z["mask"].astype(bool)
                add("cam", cid, cmask, v)
                if seg is not None:
                    zs = [int(z) for z in np.nonzero(cmask.any(axis=(0, 1)))[0]]
                    box, _, _, _ = segment_volume(seg, v.image, cam, cmask, zs, dilation=int(flat.get("dilation", 10)),
                                                  n_pos=1, n_neg=0, top_fraction=0.5, box_only=True)
                    add("box_only", cid, box & v.brain, v)
            preds["pseudo"] = np.load(sam_dir / "pseudo" / f"{cid}.npz")["label"].astype(bool)
            add("pseudo", cid, preds["pseudo"], v)
            for r, (net, u) in nets.items():
                prob = unet_probability(net, v.image, u.patch, u.overlap, u.sw_batch_size, device)
                whole = (prob > 0.5) & v.brain  # = the 2-class argmax (predict_volume) inside the brain
                preds[r] = choose_component(whole, prob, c.component)
                add(r, cid, preds[r], v)
                raw_dice.setdefault(r, []).append(dice(whole, v.mask))
                per_case[cid][r]["dice_all_components"] = raw_dice[r][-1]
            if v.mask.any():
                z = int(v.mask.sum(axis=(0, 1)).argmax())
                pics.append((int(v.mask[:, :, z].sum()), cid, z, v.image[:, :, z], v.mask[:, :, z],
                             {r: p[:, :, z] for r, p in preds.items()}))
        out: dict[str, float] = {"cases": float(len(ids))}
        table = {}
        for r in ROWS:
            if r in per:
                table[r] = _summary(per[r]["dice"], per[r]["hd95"], worst)
                out.update({f"{r}/{k}": v for k, v in table[r].items() if v == v})
        s3f_check = {}
        if "s3f" in ctx.inputs:  # is S3F's ranking right? true Dice of the U-Net predictions it scored
            doc = json.loads((ctx.inputs["s3f"] / "similarity.json").read_text())
            scores = {k: (float("nan") if d["similarity"] is None else d["similarity"])
                      for k, d in doc["cases"].items()}
            true = {}
            for cid in scores:
                if cid not in files:
                    raise ConfigError(f"case {cid}: not found in {c.cases}")
                v = preprocess(load_case(files[cid], with_mask=True))  # ground truth: evaluation only
                pred = np.load(ctx.inputs["s3f"] / "predictions" / f"{cid}.npz")["prediction"]
                true[cid] = dice(pred, v.mask)
            s3f_check = validity({k: s for k, s in scores.items() if s == s}, true, doc["kept"])
            s3f_check["per_case"] = {k: {"similarity": doc["cases"][k]["similarity"], "true_dice": true[k],
                                         "kept": doc["cases"][k]["kept"]} for k in sorted(scores)}
            out.update({f"s3f/{k[4:]}": float(v) for k, v in s3f_check.items()
                        if k.startswith("s3f_") and v == v})
        (ctx.out / "eval.json").write_text(json.dumps({"split": c.split, "cases": ids, "worst_hd95_mm": worst,
                                                        "table": table, "per_case": per_case, "s3f": s3f_check},
                                                       indent=1))
        raw = {r: float(np.mean(d)) for r, d in raw_dice.items()}
        out.update({f"{r}/dice_all_components": d for r, d in raw.items()})
        (ctx.out / "table.md").write_text(format_table(table, c.split, len(ids), worst, s3f_check,
                                                       c.component, raw))
        ctx.log_artifact(ctx.out / "eval.json", "eval")
        ctx.log_artifact(ctx.out / "table.md", "eval")
        pics.sort(key=lambda t: (-t[0], t[1]))
        for _, cid, z, img, gt, layers in pics[:c.pictures]:
            path = ctx.out / "pictures" / f"{cid}_z{z:03d}.png"
            _overlay(path, img, gt, layers, f"{cid} z={z}")
            ctx.log_artifact(path, "pictures")
        return out


def format_table(table: dict, split: str, n: int, worst: float, s3f: dict, component: str = "all",
                 raw: Optional[dict] = None) -> str:
    """The issue's table (markdown): Dice and HD95 mean +- std, HD95 failures, the mean with failures as worst."""
    lines = [f"Split `{split}`, {n} cases. HD95 mean +- std over cases with a prediction; failures = empty "
             f"prediction on a case with tumour (never 0 mm); last column: mean with each failure = {worst:.0f} mm "
             f"(the largest volume diagonal).", "",
             "| row | Dice | HD95 (mm) | HD95 failures | HD95, failures as worst (mm) |", "|---|---|---|---|---|"]
    for r, label in ROWS.items():
        if r in table:
            t = table[r]
            lines.append(f"| {label} | {t['dice']:.3f} +- {t['dice_std']:.3f} | {t['hd95']:.1f} +- "
                         f"{t['hd95_std']:.1f} | {int(t['hd95_failures'])} | {t['hd95_worst_for_failures']:.1f} |")
    if component != "all" and raw:
        lines += ["", f"U-Net rows: the `{component}` 3D component of each prediction (label-free post-processing); "
                  "Dice of the whole prediction: " + ", ".join(f"{r} {d:.3f}" for r, d in raw.items())]
    if s3f:
        lines += ["", f"S3F check (training cases, {int(s3f.get('s3f_cases', 0))}): Spearman(similarity, true Dice) "
                  f"= {s3f.get('s3f_spearman', float('nan')):.3f}; mean true Dice kept "
                  f"{s3f.get('s3f_kept_true_dice', float('nan')):.3f} vs dropped "
                  f"{s3f.get('s3f_dropped_true_dice', float('nan')):.3f}"]
    return "\n".join(lines) + "\n"


def _overlay(path: Path, img: np.ndarray, gt: np.ndarray, layers: dict[str, np.ndarray], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(layers)
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(2.6 * (1 + len(names)), 2.8))
    axes = np.atleast_1d(axes)
    axes[0].imshow(img, cmap="gray")
    axes[0].contour(gt, levels=[0.5], colors="lime", linewidths=0.8)
    axes[0].set_title(f"{title}\nFLAIR + ground truth", fontsize=7)
    for ax, r in zip(axes[1:], names):
        ax.imshow(img, cmap="gray")
        ax.contour(gt, levels=[0.5], colors="lime", linewidths=0.6)
        if layers[r].any():
            ax.contour(layers[r].astype(float), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(r, fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
