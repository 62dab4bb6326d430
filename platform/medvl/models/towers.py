"""Pre-projection access to an open_clip model's towers, for methods and plug-ins that put heads on the features
*before* the contrastive projection (CLIPin's pre-projectors and predictors).

`OpenClipTowers(model)` splits `encode_image` / `encode_text` into a trunk part (`image_pre`, `text_pre`: the
pooled features the projection would receive) and the projection (`image_proj`, `text_proj`), reusing the very
parameters of the model, so `image_proj(image_pre(x)) == encode_image(x)` and gradients reach the same weights.
Supported: open_clip's VisionTransformer and timm (`TimmModel`) image towers; the built-in text transformer
(CLIP) and HF / TextTransformer text towers (CustomTextCLIP). Other towers raise a ConfigError naming the type.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medvl.config import ConfigError


class OpenClipTowers:
    def __init__(self, model: nn.Module):
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer
        self.m = model
        v = model.visual
        if isinstance(v, VisionTransformer):
            self._image = "vit"
        elif isinstance(v, TimmModel):
            self._image = "timm"
        else:
            self._image = None
        self._vtype = type(v).__name__

    # ------------------------------------------------------------------ image
    def _need_image(self):
        if self._image is None:
            raise ConfigError(f"model.name: pre-projection image features are not available for a "
                              f"{self._vtype} image tower (supported: open_clip ViT, timm)")

    def image_pre(self, x: torch.Tensor) -> torch.Tensor:
        self._need_image()
        v = self.m.visual
        if self._image == "vit":
            return v._pool(v.transformer(v._embeds(x)))[0]
        f = v.trunk(x)
        for name, mod in v.head.named_children():
            if name in ("proj", "mlp"):
                break
            f = mod(f)
        return f

    def image_proj(self, f: torch.Tensor) -> torch.Tensor:
        self._need_image()
        v = self.m.visual
        if self._image == "vit":
            return f @ v.proj if v.proj is not None else f
        for name in ("proj", "mlp"):
            if hasattr(v.head, name):
                return getattr(v.head, name)(f)
        return f

    @property
    def image_width(self) -> int:
        """Width of the pre-projection image features."""
        self._need_image()
        v = self.m.visual
        if self._image == "vit":
            return int(v.proj.shape[0]) if v.proj is not None else int(v.output_dim)
        if hasattr(v.head, "proj"):
            return int(v.head.proj.in_features)
        return int(v.trunk.num_features)

    # ------------------------------------------------------------------ text
    def text_pre(self, text: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool
        m = self.m
        t = getattr(m, "text", None)
        if t is None:  # open_clip CLIP: the text tower's parts live on the model
            cast = m.transformer.get_cast_dtype()
            x = m.token_embedding(text).to(cast) + m.positional_embedding.to(cast)
            x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
            return text_global_pool(x, text, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if hasattr(t, "pooler"):  # HFTextEncoder
            mask = (text != t.config.pad_token_id).long()
            return t.pooler(t.transformer(input_ids=text, attention_mask=mask), mask)
        if hasattr(t, "ln_final"):  # TextTransformer inside CustomTextCLIP
            x, attn_mask = t._embeds(text)
            x = t.ln_final(t.transformer(x, attn_mask=attn_mask))
            return text_global_pool(x, text, pool_type=t.pool_type, eos_token_id=getattr(t, "eos_id", None))
        raise ConfigError(f"model.name: pre-projection text features are not available for {type(t).__name__}")

    def _text_projection(self):
        t = getattr(self.m, "text", None)
        if t is None:
            return self.m.text_projection
        return getattr(t, "proj", None) if hasattr(t, "pooler") else t.text_projection

    def text_proj(self, f: torch.Tensor) -> torch.Tensor:
        p = self._text_projection()
        if p is None:
            return f
        return p(f) if isinstance(p, nn.Module) else f @ p

    @property
    def text_width(self) -> int:
        p = self._text_projection()
        if isinstance(p, nn.Linear):
            return int(p.in_features)
        if isinstance(p, nn.Module):  # HF mlp projection
            return int(next(m for m in p.modules() if isinstance(m, nn.Linear)).in_features)
        if p is not None:
            return int(p.shape[0])
        raise ConfigError("model.name: the text tower has no projection")

    # ------------------------------------------------------------------ both
    def features(self, image: torch.Tensor, text: torch.Tensor, hook=None) -> dict[str, torch.Tensor]:
        """open_clip's output dict computed through the pre-projection split; `hook(name, pre)` may replace the
        pre-projection features of `image` / `text` before they are projected (and record them)."""
        ip, tp = self.image_pre(image), self.text_pre(text)
        if hook is not None:
            ip, tp = hook("image", ip), hook("text", tp)
        out = {"image_features": F.normalize(self.image_proj(ip), dim=-1),
               "text_features": F.normalize(self.text_proj(tp), dim=-1),
               "logit_scale": self.m.logit_scale.exp()}
        if getattr(self.m, "logit_bias", None) is not None:
            out["logit_bias"] = self.m.logit_bias
        return out
