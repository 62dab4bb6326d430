"""Models by name: open_clip architectures (built-in JSON configs, this package's configs, or a local dir),
optional local weights, and the offline pretrained two-tower model (`minilm-efficientnet-lite0`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from medvl.config import ConfigError, ModelConfig

PACKAGE_CONFIGS = Path(__file__).parent / "configs"
PRETRAINED_TWO_TOWER = "minilm-efficientnet-lite0"
_registered: set[str] = set()


def register_configs(config_dir: str | None = None) -> None:
    """Make this package's model JSONs (and an optional user dir) known to open_clip; idempotent."""
    for d in [str(PACKAGE_CONFIGS)] + ([config_dir] if config_dir else []):
        if d in _registered:
            continue
        if not Path(d).exists():
            raise ConfigError(f"model.config_dir: {d} does not exist")
        open_clip.add_model_config(d)
        _registered.add(d)


def _ensure_known(cfg: ModelConfig) -> None:
    register_configs(cfg.config_dir)
    if cfg.name == PRETRAINED_TWO_TOWER:
        from medvl.models.pretrained import register_pretrained_two_tower
        register_pretrained_two_tower()
    if open_clip.get_model_config(cfg.name) is None:
        raise ConfigError(f"model.name: unknown model {cfg.name!r}; open_clip knows "
                          f"{len(open_clip.list_models())} models, e.g. {', '.join(open_clip.list_models()[:5])}; "
                          f"add a JSON config with model.config_dir")


def model_arch(cfg: ModelConfig) -> dict[str, Any]:
    _ensure_known(cfg)
    return open_clip.get_model_config(cfg.name)


def create_model(cfg: ModelConfig, loss_kind: str = "clip") -> torch.nn.Module:
    """Build the model (random init unless `cfg.pretrained` names a local checkpoint file)."""
    _ensure_known(cfg)
    kwargs: dict[str, Any] = {}
    if cfg.init_logit_scale is not None:
        kwargs["init_logit_scale"] = cfg.init_logit_scale
    if loss_kind == "siglip":
        kwargs.setdefault("init_logit_scale", math.log(10))
        kwargs["init_logit_bias"] = -10.0
    model = open_clip.create_model(cfg.name, pretrained=None, output_dict=True, **kwargs)
    if cfg.name == PRETRAINED_TWO_TOWER:
        from medvl.models.pretrained import load_efficientnet_lite0_weights
        load_efficientnet_lite0_weights(model)
    if cfg.pretrained:
        load_pretrained(model, cfg)
    if cfg.lock_image and cfg.name == PRETRAINED_TWO_TOWER:
        from medvl.models.pretrained import freeze_image_trunk
        freeze_image_trunk(model)  # frozen timm trunk stays in eval mode (BN stats), projection trains
    elif cfg.lock_image:
        for prm in model.visual.parameters():
            prm.requires_grad = False
        proj = getattr(getattr(model.visual, "head", None), "proj", None) or getattr(model.visual, "proj", None)
        if isinstance(proj, torch.nn.Module):
            for prm in proj.parameters():
                prm.requires_grad = True
        elif isinstance(proj, torch.nn.Parameter):
            proj.requires_grad = True
    if cfg.lock_text and cfg.name == PRETRAINED_TWO_TOWER:
        from medvl.models.pretrained import lock_text_transformer
        lock_text_transformer(model)
    elif cfg.lock_text:
        text = getattr(model, "text", None)
        if text is not None:  # HF tower: keep the projection trainable
            for name, prm in text.named_parameters():
                prm.requires_grad = name.startswith("proj")
        else:
            for name in ("transformer", "token_embedding", "ln_final"):
                for prm in getattr(model, name).parameters():
                    prm.requires_grad = False
            model.positional_embedding.requires_grad = False
    return model


class UnsafeFileError(ValueError):
    """A weights/checkpoint file that cannot be loaded without arbitrary unpickling (code execution)."""


def load_tensors(path: str | Path, map_location: Any = "cpu") -> Any:
    """Load a file that holds only tensors and plain values: `torch.load(weights_only=True)`, or safetensors.
    A file that needs arbitrary unpickling is refused (`UnsafeFileError`, naming the offending class)."""
    import pickle
    import re
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p), device=str(map_location))
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        raise UnsafeFileError(
            f"{p}: refusing to load: the file needs arbitrary unpickling"
            f"{' (it contains ' + what.group(1) + ')' if what else ''}, which can run code. medvl loads only "
            f"tensors and plain values (torch.load(weights_only=True)) or .safetensors. If you trust the file, "
            f"re-save just its tensors, e.g. torch.save(torch.load(f, weights_only=False)['state_dict'], "
            f"'weights.pt')") from None


def load_pretrained(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """`model.pretrained` into `model`: every key must match unless `model.allow_partial_load`."""
    import logging
    p = Path(cfg.pretrained)
    if not p.is_file():
        raise ConfigError(f"model.pretrained: checkpoint file {p} not found (weights are never downloaded)")
    try:
        sd = load_tensors(p)
    except UnsafeFileError as e:
        raise ConfigError(f"model.pretrained: {e}") from None
    except Exception as e:  # noqa: BLE001 - truncated or not a torch file at all
        raise ConfigError(f"model.pretrained: {p} is not a readable weights file ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None
    if isinstance(sd, dict):
        for key in ("state_dict", "model"):  # open_clip_train / medvl checkpoints nest the weights
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"model.pretrained: {p} does not hold a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    shape = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
             if k in own and own[k].shape != v.shape]
    if shape:
        raise ConfigError(f"model.pretrained: {p} does not fit {cfg.name}: {len(shape)} tensors have other shapes, "
                          f"e.g. {'; '.join(shape[:3])}")
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        msg = (f"model.pretrained: {p} does not match {cfg.name}: {len(missing)} missing keys "
               f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected keys "
               f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if not cfg.allow_partial_load:
            raise ConfigError(msg + " (set model.allow_partial_load: true to load the matching keys anyway)")
        logging.getLogger(__name__).warning("%s; loading the %d matching keys (model.allow_partial_load)", msg,
                                            len(set(own) & set(sd)))
    model.load_state_dict(sd, strict=False)


def image_transforms(cfg: ModelConfig) -> tuple[Callable, Callable]:
    """The model's own open_clip train/eval preprocessing (PIL -> tensor), without building the model."""
    arch = model_arch(cfg)
    vis = arch.get("vision_cfg", {})
    size = vis.get("image_size", 224)
    pp = arch.get("preprocess_cfg", {})
    mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = pp.get("std", open_clip.OPENAI_DATASET_STD)
    kw = dict(mean=mean, std=std, resize_mode=pp.get("resize_mode"), interpolation=pp.get("interpolation"))
    return (open_clip.image_transform(size, is_train=True, **kw),
            open_clip.image_transform(size, is_train=False, **kw))


def image_norm(cfg: ModelConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's input normalisation (mean, std), applied on the training worker to uint8 images."""
    pp = model_arch(cfg).get("preprocess_cfg", {})
    return (tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)), tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)))


def pil_transforms(cfg: ModelConfig) -> tuple[Callable, Callable]:
    """The model's open_clip train/eval preprocessing up to the resized/cropped PIL image: the same transforms
    as `image_transforms` without ToTensor/Normalize (decoders ship uint8; `normalize_images` finishes the job
    on the training worker, with identical arithmetic)."""
    from torchvision import transforms as T
    out = []
    for tr in image_transforms(cfg):
        steps = [t for t in tr.transforms if not isinstance(t, (T.ToTensor, T.Normalize))]
        out.append(T.Compose(steps))
    return out[0], out[1]


_TOKENIZERS: dict[str, object] = {}


def tokenizer(cfg: ModelConfig):
    """open_clip's tokenizer for the model, built once per process (open_clip parses the config and prints
    "Parsing tokenizer identifier" every time it builds one; evaluations and decoders ask again and again)."""
    _ensure_known(cfg)
    tok = _TOKENIZERS.get(cfg.name)
    if tok is None:
        tok = _TOKENIZERS[cfg.name] = open_clip.get_tokenizer(cfg.name)
    return tok


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
