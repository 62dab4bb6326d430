"""`kind: linear_probe`: a Ray task fitting scikit-learn's logistic regression on an embed stage's features.

    probe:
      kind: linear_probe
      inputs: {features: embed}
      C: 1.0                      # inverse regularisation strength (sweepable: `probe.C`)

Fits on `train_split` (a stratified `label_fraction` of it, for label-efficiency curves), scores on `test_split`
(`medvl.eval.probe.linear_probe`: standardised features, `LogisticRegression`). Reports `accuracy`,
`train_rows`, `test_rows` and `chance` (the majority-class rate of the test split); writes them to `probe.json`.
Rows without a label (-1) are left out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from medvl.config import ConfigError
from medvl.pipelines.stage import Input, Stage, StageContext, register_stage


@dataclass
class ProbeConfig:
    train_split: str = "train"
    """Features the classifier is fitted on."""
    test_split: str = "val"
    """Features it is scored on."""
    C: float = 1.0
    """Inverse L2 regularisation strength of the logistic regression."""
    label_fraction: float = 1.0
    """Fraction of the training rows whose labels the probe may use (stratified, seeded)."""
    seed: int = 0
    """Seed of the label subsampling."""
    cpus: float = 1.0
    """CPUs of the Ray task."""

    def validate(self) -> None:
        if self.C <= 0:
            raise ConfigError("C must be > 0")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError("label_fraction must be in (0, 1]")


@register_stage
class LinearProbeStage(Stage):
    kind = "linear_probe"
    version = "1"
    config_cls = ProbeConfig
    executor = "task"
    inputs = {"features": Input("an embed stage (its <split>.parquet feature files)", kinds=("embed",))}
    ignore_keys = ("cpus",)

    def resources(self) -> dict[str, float]:
        return {"CPU": float(self.config.cpus)}

    def metric_names(self) -> set[str]:
        return {"accuracy", "train_rows", "test_rows", "chance"}

    def run(self, ctx: StageContext) -> dict[str, float]:
        from medvl.eval.probe import linear_probe
        from medvl.pipelines.kinds.embed import read_features
        c = self.config
        d = ctx.inputs["features"]
        split_files = {s: d / f"{s}.parquet" for s in (c.train_split, c.test_split)}
        for s, p in split_files.items():
            if not p.is_file():
                have = sorted(x.stem for x in d.glob("*.parquet"))
                raise ConfigError(f"split {s!r}: the features stage has no {p.name} (splits: {', '.join(have)})")
        xtr, ytr, _ = read_features(split_files[c.train_split])
        xte, yte, _ = read_features(split_files[c.test_split])
        xtr, ytr = xtr[ytr >= 0], ytr[ytr >= 0]
        xte, yte = xte[yte >= 0], yte[yte >= 0]
        if not len(ytr) or not len(yte):
            raise ConfigError("the features have no labels (label -1 everywhere): nothing to probe")
        m = linear_probe(xtr, ytr, xte, yte, label_fraction=c.label_fraction, seed=c.seed, C=c.C)
        chance = float(np.bincount(yte).max() / len(yte))
        out = {"accuracy": m["accuracy"], "train_rows": m["train_rows"], "test_rows": float(len(yte)),
               "chance": chance}
        (ctx.out / "probe.json").write_text(json.dumps(out, indent=1))
        ctx.log_artifact(ctx.out / "probe.json", "probe")
        return out
