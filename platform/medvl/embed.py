"""`medvl embed`: image embeddings of a folder of images for downstream work, through Ray Data, into one Parquet file.

    medvl embed jobs/digits_clip.yaml --images runs/corpora/digits/source_images --out digits.parquet
    medvl embed runs:/<run id>/model  --images DIR --out OUT.parquet      # any MLflow model URI (models:/name/1, ...)
    medvl embed path/to/open_clip     --images DIR --out OUT.parquet      # an exported open_clip directory

MODEL is a recipe (its run's newest registered checkpoint that verifies, or `--checkpoint`), an MLflow model URI or
local MLflow model directory (the run's pyfunc: `image_embedding`), or an open_clip directory
(`open_clip_config.json` + `open_clip_model.safetensors`, loaded with open_clip alone and its own preprocessing).
The images (files under DIR with an image extension, recursively) are read with `ray.data.read_binary_files` and
embedded by a pool of actors (`map_batches` with a callable class, `--actors`, `--batch-size`); the driver streams
the results into OUT (columns `path`, `embedding` (list<float32>, L2-normalised), `error`). An image that cannot be
read or decoded gets a null embedding and its error, is counted and named on the console, and never stops the job.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

IMAGE_EXTENSIONS = ["png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp"]
SHOWN_ERRORS = 20


def resolve_target(target: str, checkpoint: Optional[str] = None) -> dict[str, Any]:
    """What the actors load: {"kind": "recipe"|"open_clip"|"mlflow", ...} (checked here, on the driver)."""
    p = Path(target)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        from medvl.config import ConfigError, load_recipe, to_dict
        from medvl.track import runs
        from medvl.train.checkpoint import latest_valid_checkpoint
        recipe = load_recipe(str(p))
        ckpt = checkpoint
        if ckpt is None:
            storage = runs.run_root(recipe) / "ray" / recipe.run_name
            found, bad = latest_valid_checkpoint(storage)
            for name, why in bad:
                print(f"medvl embed: WARNING: skipping checkpoint {name}: {why}", file=sys.stderr)
            if found is None:
                raise ConfigError(f"{target}: run '{recipe.run_name}' has no registered checkpoint that verifies "
                                  f"under {storage} (train it first, or pass --checkpoint)")
            ckpt = str(found)
        return {"kind": "recipe", "recipe": to_dict(recipe), "checkpoint": str(ckpt)}
    from medvl.models.export import CONFIG_FILE
    if p.is_dir() and (p / CONFIG_FILE).exists():
        return {"kind": "open_clip", "dir": str(p.resolve())}
    if p.is_dir() and not (p / "MLmodel").exists():
        from medvl.config import ConfigError
        raise ConfigError(f"{target}: a directory with neither {CONFIG_FILE} (open_clip) nor MLmodel (MLflow)")
    import mlflow
    # the actors resolve runs:/ and models:/ URIs against the driver's tracking server
    return {"kind": "mlflow", "uri": str(p.resolve()) if p.is_dir() else target,
            "tracking_uri": mlflow.get_tracking_uri()}


class ImageEmbedder:
    """The Ray Data callable class: a batch of {"bytes", "path"} -> {"path", "embedding", "error"}."""

    def __init__(self, target: dict[str, Any], device: str = "cpu", torch_threads: Optional[int] = None):
        import torch
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.kind = target["kind"]
        if self.kind == "recipe":
            from medvl.config import recipe_from_dict
            from medvl.methods.embedding import Embedder
            from medvl.train.launcher import load_model_from_checkpoint
            method, model, _ = load_model_from_checkpoint(recipe_from_dict(target["recipe"]), target["checkpoint"])
            self.embedder = Embedder(method, model, device)
        elif self.kind == "open_clip":
            import open_clip
            d = "local-dir:" + target["dir"]
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(d)
            self.model.eval()
        else:
            import mlflow.pyfunc
            if target.get("tracking_uri"):
                mlflow.set_tracking_uri(target["tracking_uri"])
            self.model = mlflow.pyfunc.load_model(target["uri"])

    def _check(self, data: bytes):
        """The decoded image (raises with the reason when it is not one)."""
        if self.kind == "recipe":
            return self.embedder.decode(data)
        from medvl.data.decode import open_image
        return open_image({"image": bytes(data)})

    def _embed(self, good: list[tuple[bytes, Any]]) -> np.ndarray:
        if self.kind == "recipe":
            return self.embedder.embed_decoded([g[1] for g in good])
        if self.kind == "open_clip":
            import torch
            with torch.no_grad():
                x = torch.stack([self.preprocess(g[1]) for g in good])
                return self.model.encode_image(x, normalize=True).float().numpy()
        import pandas as pd
        out = self.model.predict(pd.DataFrame({"image": [bytes(g[0]) for g in good]}))
        if "image_embedding" in out.columns:
            return np.stack([np.asarray(v, np.float32) for v in out["image_embedding"]])
        return out.to_numpy(dtype=np.float32)  # e.g. a classifier's probabilities (CLIP-IT)

    def __call__(self, batch: dict[str, np.ndarray]):
        import pandas as pd
        paths = [str(p) for p in batch["path"]]
        emb: list[Optional[list[float]]] = [None] * len(paths)
        err: list[Optional[str]] = [None] * len(paths)
        good, where = [], []
        for i, data in enumerate(batch["bytes"]):
            try:
                if data is None or len(data) == 0:
                    raise ValueError("empty file (0 bytes)")
                good.append((data, self._check(data)))
                where.append(i)
            except Exception as e:  # noqa: BLE001 - a bad image is counted and named, never fatal
                err[i] = f"{type(e).__name__}: {e}"[:500]
        if good:
            for i, e in zip(where, self._embed(good)):
                emb[i] = np.asarray(e, np.float32).tolist()
        # lists and None (not ndarrays): Arrow makes a list<float> column with nulls
        return pd.DataFrame({"path": paths, "embedding": emb, "error": err})


def embed_images(target: dict[str, Any], images: str, out: str, batch_size: int = 32, actors: int = 1,
                 device: str = "cpu", torch_threads: Optional[int] = None,
                 extensions: Optional[list[str]] = None) -> dict[str, Any]:
    """Embed every image under `images` into the Parquet file `out`; returns {"rows", "embedded", "bad": [(path,
    error)], "dim"}. Needs Ray initialised (`medvl.train.launcher.ensure_ray`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows in the order of the listed files
    ds = ray.data.read_binary_files(str(Path(images).resolve()), include_paths=True,
                                    file_extensions=extensions or IMAGE_EXTENSIONS)
    ds = ds.map_batches(ImageEmbedder, fn_constructor_kwargs={"target": target, "device": device,
                                                              "torch_threads": torch_threads},
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if device.startswith("cuda") else 0)
    schema = pa.schema([("path", pa.string()), ("embedding", pa.list_(pa.float32())), ("error", pa.string())])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(out) + ".partial")
    rows, bad, dim = 0, [], None
    with pq.ParquetWriter(str(tmp), schema) as w:
        for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            b = b.to_pydict()
            embs = [None if e is None else list(e) for e in b["embedding"]]
            errs = [None if e is None else str(e) for e in b["error"]]
            w.write_table(pa.table({"path": [str(p) for p in b["path"]], "embedding": embs, "error": errs},
                                   schema=schema))
            rows += len(embs)
            for p, e, x in zip(b["path"], errs, embs):
                if e is not None:
                    bad.append((str(p), e))
                elif dim is None:
                    dim = len(x)
    os.replace(tmp, out)  # a finished file or none
    return {"rows": rows, "embedded": rows - len(bad), "bad": bad, "dim": dim}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="medvl embed", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="recipe YAML, MLflow model URI (runs:/<id>/model, models:/<name>/<v>) or "
                                 "directory, or an open_clip export directory")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="the Parquet file to write (path, embedding, error)")
    p.add_argument("--checkpoint", help="with a recipe: this checkpoint directory instead of the run's newest")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--actors", type=int, default=1, help="embedding actors (model copies) in the pool")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per actor)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per actor (default: torch's)")
    a = p.parse_args(argv)
    if not Path(a.images).is_dir():
        from medvl.config import ConfigError
        raise ConfigError(f"--images {a.images}: not a directory")
    target = resolve_target(a.model, a.checkpoint)
    from medvl.train.launcher import ensure_ray
    ensure_ray()
    r = embed_images(target, a.images, a.out, a.batch_size, a.actors, a.device, a.torch_threads)
    print(f"medvl embed: {r['embedded']} of {r['rows']} images embedded (dim {r['dim']}) -> {a.out}")
    if r["bad"]:
        print(f"medvl embed: {len(r['bad'])} images could not be read (null embedding, `error` column):")
        for path, e in r["bad"][:SHOWN_ERRORS]:
            print(f"  {path}: {e}")
        if len(r["bad"]) > SHOWN_ERRORS:
            print(f"  ... and {len(r['bad']) - SHOWN_ERRORS} more")
    return 0
