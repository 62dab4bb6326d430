"""`kind: pair` (CLIP-IT, stage 1): give every image of an image-only corpus the k-th most similar text of an
external, unpaired text corpus, by cosine similarity in a CLIP-style model's joint space.

    pair:
      kind: pair
      inputs: {model: clip, corpus: part_b}   # a `train` stage (or `checkpoint` + `model_name`); the image corpus
      splits: [train, val]
      texts: clip_it_digit_texts.csv           # .txt (one report a line), .csv/.tsv/.jsonl (`texts_column`), or a
      texts_column: text                       #   medvl corpus directory (each row's texts joined)
      texts_label_column: digit                # optional: class of each text -> `accuracy` (evaluation only)
      k: 1                                     # the k-th most similar text (1 = the nearest)
      min_similarity: null                     # images whose k-th similarity is below it get no text (counted)

How it runs: every distinct text is tokenized and embedded once, in this process, under `torch.no_grad`
(duplicates are embedded once and share an index; a text longer than the tokenizer's context is truncated by the
tokenizer and counted in `texts_truncated`). The images stream through Ray Data exactly as in the `embed` kind
(`embed.embedding_stream`: read + decode tasks -> an `ActorPoolStrategy` pool of model actors, one GPU each with
`use_gpu`); each batch that streams back is matched against the text matrix here. An image that fails to decode
is dropped in the decode task and counted in `skipped`: it gets no row in the output, never a wrong text. A second,
streaming pass over the source shards writes the output corpus through the ingest `Ingestor`.

Output (`<cache>/pair/<key>/`):
- `corpus/`: a medvl corpus, the source rows (image, labels, ids, split) with `texts = [paired text]`, or `[]` for
  an image below `min_similarity` (CLIP-IT then trains it with the classification term only);
- `pairs.parquet`: `sample_id`, `split`, `label` (-1: none), `text_index` (-1: below the cutoff), `similarity`
  (cosine of the k-th neighbour);
- `texts.jsonl`: the distinct texts in index order (`index`, `text`, `label`);
- `teacher/`: the pairing model's weights (`model.safetensors`) and its `model` config (`teacher.json`): CLIP-IT's
  frozen text encoder (`clip_it.teacher`, bound with `inputs: {clip_it.teacher: pair/teacher}`);
- `info.json`: what was paired with what.

Metrics: `rows` (written), `rows/<split>`, `texts` (distinct), `texts_input` (as read), `texts_truncated`,
`skipped` (images that failed to decode), `below_cutoff`, `pair_s` (wall time of the pairing job),
`similarity_mean`, and `accuracy` when the texts carry classes: how often the paired text's class equals the
image's label (rows with a label and a text; a distractor text counts as wrong). Labels are never used to pair.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medvl.config import ConfigError
from medvl.pipelines.stage import Input, Stage, StageContext, register_stage


@dataclass
class PairConfig:
    corpus: str = field(default="", metadata={"input": "corpus"})
    """The image corpus to pair (its texts are ignored; labels are kept for the classifier and for `accuracy`)."""
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    """Splits of `corpus` to pair (each keeps its split in the output corpus)."""
    texts: str = field(default="", metadata={"input": "file"})
    """The external text corpus: a .txt file (one text a line), a .csv/.tsv/.jsonl file (`texts_column`), or a
    medvl corpus directory (each row's texts joined with a space)."""
    texts_column: str = "text"
    """Column of a CSV/TSV/JSONL text file holding the texts."""
    texts_label_column: Optional[str] = None
    """Column of a CSV/TSV/JSONL text file holding each text's class (an index or a class name of `corpus`; empty
    for distractors), or the `labels` key of a medvl text corpus (its class index, matched by class name): enables
    `accuracy` (evaluation only)."""
    texts_split: Optional[str] = None
    """Split of a medvl text corpus to read (None: all)."""
    checkpoint: Optional[str] = field(default=None, metadata={"input": "file"})
    """Instead of a `model` input: a user's local open_clip checkpoint (state dict or .safetensors) ..."""
    model_name: Optional[str] = None
    """... of this open_clip architecture (built-in, or from `model_config_dir`)."""
    model_config_dir: Optional[str] = field(default=None, metadata={"path": True})
    """Directory of extra open_clip model JSON configs for `model_name`."""
    k: int = 1
    """Pair each image with its k-th most similar text (1: the nearest; the paper's ablation uses 2..5)."""
    min_similarity: Optional[float] = None
    """Cosine cutoff: an image whose k-th similarity is below it gets no text (counted in `below_cutoff`)."""
    batch_size: int = 128
    """Images per model call (and texts per call when embedding the texts)."""
    actors: int = 1
    """Ray Data actor pool size (each actor holds one copy of the pairing model)."""
    cpus_per_actor: float = 1.0
    use_gpu: bool = False
    """One GPU per actor (and the text embedding on the GPU of this process, when there is one)."""
    decode_tasks: int = 1
    """Concurrent Ray Data read + decode tasks feeding the actors."""
    shard_size: int = 2048
    """Rows per Parquet shard of the output corpus."""

    def validate(self) -> None:
        if not self.splits:
            raise ConfigError("splits: name at least one split")
        if not self.texts:
            raise ConfigError("texts: name the external text corpus (a .txt/.csv/.jsonl file or a corpus)")
        if self.k < 1:
            raise ConfigError("k must be >= 1")
        if self.min_similarity is not None and not -1.0 <= self.min_similarity <= 1.0:
            raise ConfigError("min_similarity must be a cosine in [-1, 1] (or null)")
        for key in ("batch_size", "actors", "decode_tasks", "shard_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1")
        if self.cpus_per_actor <= 0:
            raise ConfigError("cpus_per_actor must be > 0")
        if self.checkpoint and not self.model_name:
            raise ConfigError("checkpoint: also name its architecture with model_name")


# --------------------------------------------------------------------------- pure pieces (tested directly)


def kth_neighbour(image_features: np.ndarray, text_features: np.ndarray, k: int = 1,
                  min_similarity: Optional[float] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each image row: (index of its k-th most similar text, that cosine, whether it passes the cutoff).
    Features are L2-normalised, so the dot product is the cosine. Ties go to the lower text index (a stable sort:
    the same pairing on every run). An image below `min_similarity` gets index -1 (its similarity is kept)."""
    n_text = text_features.shape[0]
    if not 1 <= k <= n_text:
        raise ValueError(f"k={k}: the text corpus has {n_text} distinct texts")
    sims = image_features.astype(np.float32) @ text_features.astype(np.float32).T
    order = np.argsort(-sims, axis=1, kind="stable")
    idx = order[:, k - 1]
    sim = sims[np.arange(len(idx)), idx]
    ok = np.ones(len(idx), bool) if min_similarity is None else sim >= min_similarity
    return np.where(ok, idx, -1), sim, ok


@dataclass
class TextCorpus:
    texts: list[str]
    """Distinct texts, in first-seen order (the `text_index` of the output)."""
    labels: list[Optional[int]]
    """Class index of each distinct text (None: unknown / distractor); the first occurrence's class wins."""
    read: int
    """Texts as read, duplicates included."""
    has_labels: bool


def read_texts(path: str, column: str = "text", label_column: Optional[str] = None, split: Optional[str] = None,
               classnames: Optional[list[str]] = None) -> TextCorpus:
    """The external text corpus, deduplicated; an empty one (or a file that is missing or has no such column) is
    a ConfigError naming the file."""
    p = Path(path)
    classnames = list(classnames or [])
    raw: list[tuple[str, Any]] = []
    has_labels = False
    if p.is_dir():
        from medvl.data.corpus import iter_rows, load_manifest, shard_paths
        m = load_manifest(p)
        has_labels = bool(label_column)
        for row in iter_rows(shard_paths(p, split), columns=["texts", "labels"]):
            text = " ".join(t.strip() for t in (row.get("texts") or []) if isinstance(t, str) and t.strip())
            lab = dict(row.get("labels") or []).get(label_column) if label_column else None
            if lab is not None and m.classnames and 0 <= int(lab) < len(m.classnames):
                lab = m.classnames[int(lab)]  # the text corpus's class index -> its class name
            raw.append((text, lab))
    elif not p.is_file():
        raise ConfigError(f"texts: {p}: text corpus not found")
    elif p.suffix.lower() == ".txt":
        if label_column:
            raise ConfigError(f"texts_label_column: {p} is a plain .txt file (one text a line) and has no columns")
        raw = [(line.strip(), None) for line in p.read_text(encoding="utf-8").splitlines()]
    elif p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".ndjson"):
        from medvl.data.ingest import _read_table
        has_labels = bool(label_column)
        for rowno, rec in _read_table(p, "\t" if p.suffix.lower() == ".tsv" else None):
            if "__error__" in rec:
                raise ConfigError(f"texts: {p} row {rowno}: {rec['__error__']}")
            if column not in rec:
                raise ConfigError(f"texts_column: {p} has no column {column!r} (columns: {', '.join(rec)})")
            if label_column and label_column not in rec:
                raise ConfigError(f"texts_label_column: {p} has no column {label_column!r} "
                                  f"(columns: {', '.join(rec)})")
            text = rec.get(column)
            raw.append((text.strip() if isinstance(text, str) else "", rec.get(label_column) if label_column else None))
    else:
        raise ConfigError(f"texts: {p}: expected a .txt, .csv, .tsv or .jsonl file, or a medvl corpus directory")
    index: dict[str, int] = {}
    texts: list[str] = []
    labels: list[Optional[int]] = []
    read = 0
    for text, lab in raw:
        if not text:
            continue  # blank lines are not texts
        read += 1
        if text in index:
            continue
        index[text] = len(texts)
        texts.append(text)
        labels.append(_class_index(lab, classnames, p))
    if not texts:
        raise ConfigError(f"texts: {p}: the text corpus is empty (no non-blank text)")
    return TextCorpus(texts, labels, read, has_labels)


def _class_index(lab: Any, classnames: list[str], where: Path) -> Optional[int]:
    if lab is None or (isinstance(lab, float) and math.isnan(lab)) or (isinstance(lab, str) and not lab.strip()):
        return None
    if isinstance(lab, str) and lab.strip() in classnames:
        return classnames.index(lab.strip())
    try:
        f = float(lab)
    except (TypeError, ValueError):
        raise ConfigError(f"texts_label_column: {where}: class {lab!r} is neither an index nor a class name of "
                          f"the image corpus ({', '.join(classnames)})") from None
    return int(f)


def count_tokens(tok: Any, text: str) -> int:
    """Tokens of `text` including start/end tokens, before the tokenizer truncates it to its context."""
    inner = getattr(tok, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers tokenizer
    if inner is not None and callable(inner):
        return len(inner(text)["input_ids"])
    enc = getattr(tok, "encode", None)  # open_clip's SimpleTokenizer: BPE ids without <sot>/<eot>
    if callable(enc):
        return len(enc(text)) + 2
    return 0  # unknown tokenizer: truncation is not counted


def embed_texts(encode_text, tok, texts: list[str], batch_size: int, device) -> tuple[np.ndarray, int]:
    """(L2-normalised text features [T, D] float32, how many texts the tokenizer truncated), without grad."""
    import torch
    import torch.nn.functional as F
    ctx = int(getattr(tok, "context_length", 0) or 0)
    truncated = sum(1 for t in texts if ctx and count_tokens(tok, t) > ctx)
    feats = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            ids = tok(texts[i:i + batch_size]).to(device)
            feats.append(F.normalize(encode_text(ids).float(), dim=-1).cpu())
    return torch.cat(feats).numpy().astype(np.float32), truncated


# --------------------------------------------------------------------------- the stage


@register_stage
class PairStage(Stage):
    kind = "pair"
    version = "1"
    config_cls = PairConfig
    executor = "driver"  # it runs a Ray Data job (decode tasks + an actor pool) and matches what streams back
    inputs = {"model": Input("a train stage whose CLIP-style model pairs images with texts (or set `checkpoint`)",
                             required=False, kinds=("train",))}
    ignore_keys = ("actors", "cpus_per_actor", "decode_tasks", "use_gpu", "batch_size")

    def resources(self) -> dict[str, float]:
        c = self.config
        return {"CPU": float(c.actors * c.cpus_per_actor + c.decode_tasks),
                "GPU": float(c.actors if c.use_gpu else 0)}

    def metric_names(self) -> set[str]:
        c = self.config
        names = {"rows", "texts", "texts_input", "texts_truncated", "skipped", "below_cutoff", "pair_s",
                 "similarity_mean"} | {f"rows/{s}" for s in c.splits}
        if c.texts_label_column:
            names.add("accuracy")
        return names

    def _model(self, ctx: StageContext) -> tuple[Any, Any, Any, Optional[str], Optional[dict]]:
        """(recipe, method, model, model_dir, recipe dict) of the pairing model; a checkpoint that does not fit
        the named architecture is a ConfigError naming both."""
        from medvl.pipelines.kinds.embed import load_encoder
        c = self.config
        model_dir = ctx.inputs.get("model")
        if model_dir is not None and c.checkpoint:
            raise ConfigError("pair: give either a `model` input or `checkpoint`, not both")
        if model_dir is None and not c.checkpoint:
            raise ConfigError("pair: needs a pairing model: `inputs: {model: <train stage>}` or `checkpoint` + "
                              "`model_name`")
        if model_dir is not None:
            r, m, model = load_encoder(str(model_dir))
            return r, m, model, str(model_dir), None
        spec = {"method": "clip", "data": {"corpus": c.corpus},
                "model": {"name": c.model_name, "pretrained": str(c.checkpoint), "config_dir": c.model_config_dir}}
        try:
            r, m, model = load_encoder(None, spec)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"checkpoint {c.checkpoint} does not fit model_name {c.model_name!r}: "
                              f"{str(e)[:1500]}") from None
        return r, m, model, None, spec

    def run(self, ctx: StageContext) -> dict[str, float]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        from medvl.data.corpus import iter_rows, load_manifest, shard_paths
        from medvl.data.ingest import Ingestor
        from medvl.models.factory import tokenizer
        from medvl.pipelines.kinds.embed import embedding_stream

        c = self.config
        recipe, method, model, model_dir, spec = self._model(ctx)
        clip = getattr(model, "clip", model)
        if not callable(getattr(clip, "encode_text", None)):
            raise ConfigError(f"pair: the {recipe.method} model has no text tower (encode_text) to pair with")
        manifest = load_manifest(c.corpus)
        missing = [s for s in c.splits if s not in manifest.splits]
        if missing:
            raise ConfigError(f"splits: {c.corpus} has no split {', '.join(missing)} "
                              f"(splits: {', '.join(sorted(manifest.splits))})")
        label_field = manifest.label_field
        corpus_texts = read_texts(c.texts, c.texts_column, c.texts_label_column, c.texts_split, manifest.classnames)
        if c.k > len(corpus_texts.texts):
            raise ConfigError(f"k={c.k}: {c.texts} holds only {len(corpus_texts.texts)} distinct texts")

        t0 = time.perf_counter()
        device = torch.device("cuda" if c.use_gpu and torch.cuda.is_available() else "cpu")
        clip.to(device)
        tok = tokenizer(recipe.model)
        text_feats, truncated = embed_texts(clip.encode_text, tok, corpus_texts.texts, c.batch_size, device)
        self._save_teacher(ctx.out / "teacher", clip, recipe)
        clip.to("cpu")
        del model, clip

        ds = embedding_stream(method, c.corpus, c.splits, label_field, seed=recipe.train.seed,
                              batch_size=c.batch_size, decode_tasks=c.decode_tasks, actors=c.actors,
                              cpus_per_actor=c.cpus_per_actor, use_gpu=c.use_gpu, normalize=True,
                              model_dir=model_dir, recipe=spec)
        pairs: dict[str, tuple[int, float, int]] = {}  # sample id -> (text index or -1, similarity, label)
        tables = []
        for b in ds.iter_batches(batch_format="numpy", batch_size=None):
            idx, sim, ok = kth_neighbour(np.asarray(b["features"], np.float32), text_feats, c.k, c.min_similarity)
            sids = [str(x) for x in b["sample_id"]]
            labels = np.asarray(b["label"], np.int64)
            for sid, i, s, lab in zip(sids, idx, sim, labels):
                pairs[sid] = (int(i), float(s), int(lab))
            tables.append(pa.table({"sample_id": pa.array(sids, pa.string()),
                                    "split": pa.array([str(x) for x in b["split"]], pa.string()),
                                    "label": pa.array(labels), "text_index": pa.array(idx.astype(np.int64)),
                                    "similarity": pa.array(sim.astype(np.float32))}))
        pair_s = time.perf_counter() - t0
        if not pairs:
            raise RuntimeError(f"pair: no image of {c.corpus} ({', '.join(c.splits)}) could be decoded")
        pq.write_table(pa.concat_tables(tables), ctx.out / "pairs.parquet")
        with open(ctx.out / "texts.jsonl", "w") as f:
            for i, (t, lab) in enumerate(zip(corpus_texts.texts, corpus_texts.labels)):
                f.write(json.dumps({"index": i, "text": t, "label": lab}) + "\n")

        # a second, streaming pass writes the paired corpus (image bytes are never all held in memory)
        ing = Ingestor(ctx.out / "corpus", source=f"pair({c.corpus} x {c.texts})", shard_size=c.shard_size)
        rows = {s: 0 for s in c.splits}
        skipped = below = 0
        for split in c.splits:
            for row in iter_rows(shard_paths(c.corpus, split)):
                got = pairs.get(str(row["sample_id"]))
                if got is None:
                    skipped += 1  # failed to decode in the pairing job: no row, never a wrong text
                    continue
                i = got[0]
                below += i < 0
                row = {**row, "labels": dict(row.get("labels") or []),
                       "texts": [corpus_texts.texts[i]] if i >= 0 else []}
                ing.add(row)
                rows[split] += 1
        ing.finish(label_field=manifest.label_field, classnames=list(manifest.classnames), text_kind="report")

        metrics = {"rows": float(sum(rows.values())), **{f"rows/{s}": float(n) for s, n in rows.items()},
                   "texts": float(len(corpus_texts.texts)), "texts_input": float(corpus_texts.read),
                   "texts_truncated": float(truncated), "skipped": float(skipped), "below_cutoff": float(below),
                   "pair_s": pair_s, "similarity_mean": float(np.mean([v[1] for v in pairs.values()]))}
        if corpus_texts.has_labels:
            hits = [corpus_texts.labels[i] == lab for i, _, lab in pairs.values() if i >= 0 and lab >= 0]
            metrics["accuracy"] = float(np.mean(hits)) if hits else float("nan")
        info = {"corpus": c.corpus, "splits": c.splits, "texts": c.texts, "k": c.k,
                "min_similarity": c.min_similarity, "model_stage_key": ctx.upstream.get("model", {}).get("key"),
                "checkpoint": c.checkpoint, "model": asdict(recipe.model), "dim": int(text_feats.shape[1]),
                "metrics": metrics}
        (ctx.out / "info.json").write_text(json.dumps(info, indent=1))
        return metrics

    @staticmethod
    def _save_teacher(out: Path, clip: Any, recipe: Any) -> None:
        """The pairing model as CLIP-IT's frozen teacher: weights + architecture, loadable without unpickling."""
        from safetensors.torch import save_file
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in clip.state_dict().items()},
                  str(out / "model.safetensors"))
        model_cfg = {**asdict(recipe.model), "pretrained": None}
        (out / "teacher.json").write_text(json.dumps({"model": model_cfg}, indent=1))
