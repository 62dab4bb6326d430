"""Image and text embeddings of a trained contrastive model outside training: what the exported MLflow model
(`medvl.methods.embedding_pyfunc`), `medvl embed` and the tests call.

    emb = Embedder.from_files("recipe.json", "model.safetensors")   # a run's exported `model/artifacts`
    emb.embed_images([png_bytes, ...])   # [N, D] float32, L2-normalised
    emb.embed_texts(["a photo of the digit 3."])

The preprocessing and the towers are exactly those of the method's held-out evaluation: the model's eval transform
(resize + centre crop) to uint8, the model's normalisation, `Method.image_features` / `Method.text_features`, and
the model's tokenizer; so the exported embeddings equal the ones medvl evaluates. No mlflow import here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvl.config import Recipe, recipe_from_dict, to_dict
from medvl.data.decode import normalize_images, open_image, to_uint8_chw
from medvl.methods.base import Method, resolve_method
from medvl.models.factory import image_norm, pil_transforms, tokenizer, unwrap

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"


def portable_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a dict that rebuilds the model's architecture anywhere: no initial weights to load (the
    exported weights replace them)."""
    d = to_dict(recipe)
    d["model"]["pretrained"] = None
    return d


def write_model_files(method: Method, model: nn.Module, out_dir: str | Path) -> dict[str, str]:
    """`recipe.json` + `model.safetensors` (the whole module's state) in `out_dir`; returns the artifact map."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # cloned and contiguous: safetensors refuses tensors that share storage (tied embeddings)
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in unwrap(model).state_dict().items()},
              str(out / WEIGHTS_FILE), metadata={"format": "pt", "written_by": "medvl"})
    (out / RECIPE_FILE).write_text(json.dumps(portable_recipe(method.recipe), indent=1))
    return {"recipe": str(out / RECIPE_FILE), "weights": str(out / WEIGHTS_FILE)}


class Embedder:
    """Embeds encoded images and texts with a method's model (CPU by default, eval mode, no grad)."""

    def __init__(self, method: Method, model: nn.Module, device: str | torch.device = "cpu", batch_size: int = 64):
        self.method, self.device, self.batch_size = method, torch.device(device), batch_size
        self.model = unwrap(model).to(self.device).eval()
        mc = method.recipe.model
        self.transform = pil_transforms(mc)[1]
        self.norm = image_norm(mc)
        self._tokenize = None

    @classmethod
    def from_files(cls, recipe_file: str | Path, weights_file: str | Path, **kw) -> "Embedder":
        from safetensors.torch import load_file
        recipe = recipe_from_dict(json.loads(Path(recipe_file).read_text()))
        recipe.model.pretrained = None
        method = resolve_method(recipe)
        model = method.build_model()
        model.load_state_dict(load_file(str(weights_file)))
        return cls(method, model, **kw)

    # ---------------------------------------------------------------- images
    def decode(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> uint8 [3, H, W] (the eval transform); ValueError when it is not an image."""
        return to_uint8_chw(self.transform(open_image({"image": bytes(data)})))

    @torch.no_grad()
    def embed_decoded(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.stack(images[i:i + self.batch_size])).to(self.device)
            f = self.method.image_features(self.model, normalize_images(x, *self.norm))
            out.append(F.normalize(f.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        """Encoded images -> [N, D] L2-normalised embeddings (raises ValueError naming the first bad index)."""
        dec = []
        for i, b in enumerate(images):
            try:
                dec.append(self.decode(b))
            except Exception as e:  # noqa: BLE001 - name the input that is not an image
                raise ValueError(f"image {i}: not a decodable image ({e})") from None
        return self.embed_decoded(dec)

    # ---------------------------------------------------------------- texts
    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self._tokenize is None:
            self._tokenize = tokenizer(self.method.recipe.model)
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids = self._tokenize(list(texts[i:i + self.batch_size])).to(self.device)
            f = self.method.text_features(self.model, ids)
            out.append(F.normalize(f.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def embed_frame(embedder: Embedder, df) -> Any:
    """The pyfunc contract on a pandas DataFrame: optional columns `image` (encoded bytes, or base64 str) and `text`;
    out: `image_embedding` / `text_embedding` (lists of float, None where the row had no image / text)."""
    import base64

    import pandas as pd
    n = len(df)
    out: dict[str, list[Optional[list[float]]]] = {}
    if "image" not in df.columns and "text" not in df.columns:
        raise ValueError("input has neither an 'image' nor a 'text' column")
    if "image" in df.columns:
        rows, dec = [], []
        for i, v in enumerate(df["image"]):
            if _missing(v):
                continue
            data = base64.b64decode(v) if isinstance(v, str) else bytes(v)
            try:
                dec.append(embedder.decode(data))
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"row {i}: column 'image' is not a decodable image ({e})") from None
            rows.append(i)
        col: list[Optional[list[float]]] = [None] * n
        for i, e in zip(rows, embedder.embed_decoded(dec) if dec else []):
            col[i] = e.tolist()
        out["image_embedding"] = col
    if "text" in df.columns:
        rows = [i for i, v in enumerate(df["text"]) if not _missing(v)]
        col = [None] * n
        if rows:
            for i, e in zip(rows, embedder.embed_texts([str(df["text"].iloc[i]) for i in rows])):
                col[i] = e.tolist()
        out["text_embedding"] = col
    return pd.DataFrame(out)


def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN from a DataFrame with a missing cell
    except (TypeError, ValueError):
        return False
