"""Export an open_clip model in open_clip's own format, loadable with no medvl import:

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:/path/to/open_clip")
    tokenizer = open_clip.get_tokenizer("local-dir:/path/to/open_clip")

The directory holds `open_clip_config.json` (`model_cfg` = the architecture medvl trained, `preprocess_cfg` = its
input size and normalisation) and `open_clip_model.safetensors` (the weights). A text tower that is a Hugging Face
model loaded from a local directory (`hf_model_name: /path/...` in the config) needs that directory on the machine
that loads the export, as it did for training.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def open_clip_config(arch: dict[str, Any]) -> dict[str, Any]:
    """`open_clip_config.json` for an architecture dict (`open_clip.get_model_config` form)."""
    arch = json.loads(json.dumps(arch))  # a plain, JSON-safe copy
    pp = dict(arch.pop("preprocess_cfg", None) or {})
    size = arch.get("vision_cfg", {}).get("image_size")
    if size is not None:
        pp.setdefault("size", size)
    return {"model_cfg": arch, "preprocess_cfg": pp}


def write_open_clip_dir(model: torch.nn.Module, arch: dict[str, Any], out_dir: str | Path) -> Path:
    """Write `model` (an open_clip CLIP/CustomTextCLIP) with its architecture `arch` into `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # cloned and contiguous: safetensors refuses tensors that share storage, open_clip's loader wants every key
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "written_by": "medvl"})
    (out / CONFIG_FILE).write_text(json.dumps(open_clip_config(arch), indent=2))
    return out
