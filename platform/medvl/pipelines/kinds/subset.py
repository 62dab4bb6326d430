"""`kind: subset`: a deterministic part of a corpus, as a new corpus (e.g. CLIP-IT's two disjoint halves of one
labelled set: one trains the pairing CLIP, the other becomes the image-only set that is paired with texts).

    clip_part:
      kind: subset
      corpus: ../runs/corpora/digits
      fraction: 0.5              # of each split in `apply_to`, chosen by a hash of (seed, sample id)
      apply_to: [train]          # other splits are copied whole (the held-out split stays shared)
    image_part:
      kind: subset
      corpus: ../runs/corpora/digits
      fraction: 0.5
      complement: true           # exactly the rows the first part left out
      drop_texts: true           # image-only: captions removed (texts = [])

A row is in the part when `sha1("subset:<seed>:<sample_id>") < fraction` (salted, so independent of ingest's split hash), so a part and
its complement are disjoint and cover the split, and a row's membership does not depend on the other rows.
Runs in the pipeline's process without Ray (streaming: one row group at a time). Output: `corpus/` (manifest +
shards, through the ingest `Ingestor`). Metrics: `rows`, `rows/<split>`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

from medvl.config import ConfigError
from medvl.pipelines.stage import Stage, StageContext, register_stage


@dataclass
class SubsetConfig:
    corpus: str = field(default="", metadata={"input": "corpus"})
    """The corpus to take a part of."""
    fraction: float = 0.5
    """Fraction of each split in `apply_to` kept (by a hash of the sample id)."""
    complement: bool = False
    """Keep the rows the same `fraction` + `seed` leave out instead."""
    apply_to: list[str] = field(default_factory=lambda: ["train"])
    """Splits that are partitioned; the other splits are copied whole."""
    splits: Optional[list[str]] = None
    """Splits written at all (None: every split of the corpus)."""
    drop_texts: bool = False
    """Write `texts = []` (an image-only corpus; labels are kept)."""
    seed: int = 0
    """Seed of the membership hash."""
    shard_size: int = 2048

    def validate(self) -> None:
        if not self.corpus:
            raise ConfigError("corpus: name the corpus to take a part of")
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError("fraction must be in (0, 1)")


def in_part(sample_id: str, fraction: float, seed: int) -> bool:
    h = hashlib.sha1(f"subset:{seed}:{sample_id}".encode()).digest()  # salted: independent of the split hash
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


@register_stage
class SubsetStage(Stage):
    kind = "subset"
    version = "1"
    config_cls = SubsetConfig
    executor = "driver"
    needs_ray = False  # plain streaming file work in the pipeline's process

    def metric_names(self) -> set[str]:
        return {"rows"} | {f"rows/{s}" for s in (self.config.splits or [])}

    def run(self, ctx: StageContext) -> dict[str, float]:
        from medvl.data.corpus import iter_rows, load_manifest, shard_paths
        from medvl.data.ingest import Ingestor
        c = self.config
        m = load_manifest(c.corpus)
        splits = c.splits or sorted(m.splits)
        missing = [s for s in splits + list(c.apply_to) if s not in m.splits]
        if missing:
            raise ConfigError(f"{c.corpus} has no split {', '.join(sorted(set(missing)))} "
                              f"(splits: {', '.join(sorted(m.splits))})")
        ing = Ingestor(ctx.out / "corpus", source=f"subset({c.corpus})", shard_size=c.shard_size)
        rows = {s: 0 for s in splits}
        for split in splits:
            for row in iter_rows(shard_paths(c.corpus, split)):
                if split in c.apply_to and in_part(str(row["sample_id"]), c.fraction, c.seed) == c.complement:
                    continue
                row = {**row, "labels": dict(row.get("labels") or [])}
                if c.drop_texts:
                    row["texts"] = []
                ing.add(row)
                rows[split] += 1
        ing.finish(label_field=m.label_field, classnames=list(m.classnames), templates=list(m.templates),
                   text_kind=m.text_kind)
        return {"rows": float(sum(rows.values())), **{f"rows/{s}": float(n) for s, n in rows.items()}}
