"""`kind: train`: a Ray Train job, i.e. one method run through the seam (`medvl.train.launcher.run_training`).

    clip:
      kind: train
      base: digits_clip.yaml        # a training recipe in jobs/ (any method); the keys below override it
      train: {epochs: 3, num_workers: 1}

The stage's config *is* a training recipe (every key validated like `medvl train`'s, overridable and sweepable as
`<stage>.optim.lr`, ...). The cache key hashes the resolved recipe except what cannot change the trained model
(`name`, `track.*`, `runtime.*`, logging/checkpoint intervals, checkpoints kept, restarts allowed) plus the
method's (and enabled plug-ins') code versions; its corpora (`data.corpus`, `data.val_corpus`) and files
(`model.pretrained`, `model.config_dir`, a method section's paths) are fingerprinted. `data.corpus` may be bound to
an upstream output (`inputs: {data.corpus: pair/corpus}`, CLIP-IT's pairing stage).

The training run *is* the stage's MLflow run (nested under the pipeline run, with every curve the trainer logs).
Its Ray Train run name is `<stage>-<key[:12]>`, so a build interrupted half-way resumes from its last checkpoint
when the key is built again; `--force` starts it over. Output: `model/state.pt` (the final model and method state,
readable by `medvl.train.launcher.load_model_from_checkpoint`), `recipe.yaml` (the resolved recipe),
`metrics.json` (the final metrics, also the stage's reported metrics).
"""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

from medvl.config import ConfigError, Recipe, dump_yaml, field_type, from_dict, get_path, path_keys, set_path, to_dict
from medvl.pipelines.stage import Stage, StageContext, register_stage

_SKIP_CORPUS = "<bound to an upstream output>"


@register_stage
class TrainStage(Stage):
    kind = "train"
    version = "1"
    config_cls = Recipe
    executor = "driver"  # it starts the TorchTrainer (its workers are Ray actors) from the pipeline process
    owns_mlflow_run = True
    ignore_keys = ("name", "track.", "runtime.", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
                   "train.max_failures", "data.decoded_buffer_mb", "data.decoded_block_mb")  # the last two:
    # memory and speed settings added later (so caches built before them keep their keys)
    reserved_keys = ("name", "track.", "runtime.", "train.num_workers", "train.cpus_per_worker", "train.use_gpu")

    @classmethod
    def parse_config(cls, raw: dict) -> Recipe:
        return from_dict(Recipe, raw)  # validated in `validate` (a bound corpus is empty until run time)

    @classmethod
    def path_keys(cls, raw: dict) -> list[str]:
        return path_keys(raw)

    @classmethod
    def key_type(cls, key: str) -> Any:
        return field_type(key)

    def config_dict(self) -> dict:
        return to_dict(self.config)

    def validate(self) -> None:
        r = self.config
        empty = [k for k in sorted(self.bound) if not get_path(to_dict(r), k)]
        if empty:  # keys bound to an upstream output are empty until run time (data.corpus, clip_it.teacher, ...)
            d = to_dict(r)
            for k in empty:
                set_path(d, k, _SKIP_CORPUS)
            r = from_dict(Recipe, d)
        r.validate()

    def code_version(self) -> str:
        from medvl.methods import registered
        methods = registered()
        parts = [f"{self.kind}:{self.version}"]
        m = methods.get(self.config.method)
        parts.append(f"method {self.config.method}:{getattr(m, 'version', '1')}")
        for name, cls in methods.items():
            if cls.plugin and cls.enabled(self.config):
                parts.append(f"plugin {name}:{getattr(cls, 'version', '1')}")
        return " ".join(parts)

    def corpora(self) -> dict[str, str]:
        d = self.config.data
        out = {"data.corpus": d.corpus}
        if d.val_corpus:
            out["data.val_corpus"] = d.val_corpus
        return {k: v for k, v in out.items() if v and k not in self.bound}

    def files(self) -> dict[str, str]:
        from medvl.config import get_path
        flat = to_dict(self.config)
        keys = [k for k in path_keys(flat) if k not in ("data.corpus", "data.val_corpus")]
        return {k: str(get_path(flat, k)) for k in keys if get_path(flat, k) and k not in self.bound}

    def bindable_keys(self) -> list[str]:
        return path_keys(to_dict(self.config))

    def bind(self, key: str, path: str) -> None:
        d = to_dict(self.config)
        set_path(d, key, path)
        self.config = from_dict(Recipe, d)

    def resources(self) -> dict[str, float]:
        t = self.config.train
        # the workers, plus one CPU for the Ray Data decode tasks that feed them
        return {"CPU": float(t.num_workers * t.cpus_per_worker + 1), "GPU": float(t.num_workers if t.use_gpu else 0)}

    def metric_names(self) -> set[str]:
        """What the trainer reports last: step, epoch, the loss terms, and the method's evaluation metrics."""
        from medvl.data.corpus import CorpusError
        from medvl.methods import resolve_method
        r = self.config
        if "data.corpus" in self.bound:
            r = copy.deepcopy(r)
            r.data.corpus = r.data.val_corpus or r.data.corpus
        names = {"step", "epoch", "train/loss"}
        try:
            method = resolve_method(r)
            names |= {f"train/{t}" for t in method.loss_terms()}
            names |= method.metric_names()
        except (CorpusError, OSError):
            pass  # the corpus does not exist yet (an upstream output): only the trainer's own names are known
        return names

    def run(self, ctx: StageContext) -> dict[str, float]:

        from medvl.track import runs
        from medvl.train.launcher import run_training
        from medvl.train import checkpoint as ck

        r = copy.deepcopy(self.config)
        r.track.experiment = ctx.experiment
        r.track.tracking_uri = ctx.tracking_uri
        r.track.run_name = f"{ctx.stage}-{ctx.key[:12]}"
        r.runtime.run_root = ctx.run_root
        r.validate()
        root = runs.run_root(r)
        if ctx.forced:  # start over: no resume from an earlier build's Ray Train state or MLflow run
            shutil.rmtree(root / "ray" / r.run_name, ignore_errors=True)
            shutil.rmtree(root / "jobs" / r.run_name, ignore_errors=True)
        job, metrics = run_training(r, parent_run_id=ctx.parent_run_id, tags=ctx.run_tags)
        ctx.mlflow_run_id = job.mlflow_run_id
        client = runs._client(job.tracking_uri)
        if ctx.parent_run_id:  # a resumed build continues its old run: file it under this pipeline run
            client.set_tag(job.mlflow_run_id, "mlflow.parentRunId", ctx.parent_run_id)
        latest, _bad = ck.latest_valid_checkpoint(job.storage_path / r.run_name)  # registered and verified
        if latest is None:
            raise RuntimeError(f"training run {r.run_name} reported no checkpoint that verifies under "
                               f"{job.storage_path}")
        state = ck.load_checkpoint(latest, map_location="cpu")
        keep = {k: state[k] for k in ("format", "version", "model", "method", "method_name", "step", "epoch")
                if k in state}
        # the model only (no optimizer state in the cache), checksummed like every checkpoint
        ck.write_checkpoint(ctx.out / "model", keep, {"step": state.get("step"), "epoch": state.get("epoch")})
        (ctx.out / "recipe.yaml").write_text(dump_yaml(r))
        out = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        (ctx.out / "metrics.json").write_text(json.dumps(out, indent=1, sort_keys=True))
        return out


def load_trained(model_dir: str | Path):
    """(recipe, method, model in eval mode) from a train stage's output directory."""
    import yaml

    from medvl.config import recipe_from_dict
    from medvl.train.launcher import load_model_from_checkpoint
    d = Path(model_dir)
    try:
        recipe = recipe_from_dict(yaml.safe_load((d / "recipe.yaml").read_text()))
    except ConfigError as e:
        raise ConfigError(f"{d / 'recipe.yaml'}: {e}") from None
    method, model, _ = load_model_from_checkpoint(recipe, str(d / "model"))
    return recipe, method, model
