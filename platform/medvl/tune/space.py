"""Search dimensions over any recipe key: checked against the recipe's types, sampled by Optuna define-by-run.

    optim.lr:               {type: loguniform, low: 1.0e-4, high: 3.0e-3}    # float keys
    model.init_logit_scale: {type: uniform, low: 1.0, high: 4.6, step: 0.1}   # float keys
    optim.warmup_steps:     {type: int, low: 0, high: 60, step: 10}           # int keys (`log: true` allowed)
    data.batch_size:        {type: choice, values: [32, 64]}                  # any scalar key, Literal keys
    loss.kind:              {type: choice, values: [clip, siglip]}
    loss.siglip_dist_impl:  {type: choice, values: [bidir, shift], when: {loss.kind: siglip}}   # conditional

Each key is looked up with `medvl.config.field_type` (unknown keys fail, naming the key), the dimension type
must suit the field type, and every bound / candidate is applied to the base recipe and validated like a
recipe (so `data.batch_size` values must divide over the workers, `optim.lr` must be > 0, Literal keys only
take their allowed values). A `when` condition refers to an earlier `choice` dimension or to a fixed recipe key.

`SearchSpace` is a plain picklable object: OptunaSearch calls it with an Optuna trial (define-by-run, which is
what makes conditional dimensions possible) and pickles it with the searcher state for `Tuner.restore`.

What the keys are checked against is a *schema*: `RecipeSchema` (a training recipe: `optim.lr`, the default) or
`PipelineSchema` (a pipeline recipe as a sweep's base: `<stage>.<key>` of any stage, e.g. `probe.C`,
`clip.optim.lr`, each checked against its stage kind's typed config and validated by loading the pipeline).
"""
from __future__ import annotations

import math
import types
import typing
from typing import Any, Optional, Union

from medvl.config import ConfigError, apply_overrides, field_type, flatten, recipe_from_dict
from medvl.tune.spec import RESERVED, ParamSpec, SweepError

Scalar = (type(None), bool, int, float, str)


def _base_type(tp: Any) -> Any:
    """Optional[X] -> X (other unions are left alone)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _type_label(tp: Any) -> str:
    return str(tp).replace("typing.", "") if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class RecipeSchema:
    """Search keys of a training recipe (the base of an ordinary sweep)."""

    what = "recipe"

    def field_type(self, path: str) -> Any:
        return field_type(path)

    def check(self, base: dict, path: str, value: Any) -> None:
        recipe_from_dict(apply_overrides(base, {path: value}))

    def flat(self, base: dict) -> dict[str, Any]:
        return flatten(base)

    def reserved(self, path: str) -> Optional[str]:
        if path == "name" or path.startswith(RESERVED) or path in RESERVED:
            return ("this key is set by the sweep itself (run names, tracking, cluster, per-trial resources via "
                    "`resources:`)")
        return None


class PipelineSchema:
    """Search keys of a pipeline recipe (a sweep whose `base:` is a pipeline): `<stage>.<key>`."""

    what = "pipeline"

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def field_type(self, path: str) -> Any:
        return self.pipeline.field_type(path)

    def check(self, base: dict, path: str, value: Any) -> None:
        from medvl.pipelines import load_pipeline
        load_pipeline(data=base, overrides={path: value})

    def flat(self, base: dict) -> dict[str, Any]:
        return self.pipeline.flat_values()

    def reserved(self, path: str) -> Optional[str]:
        return self.pipeline.reserved(path)


class SearchSpace:
    """Ordered search dimensions `{recipe key: ParamSpec}`."""

    def __init__(self, params: dict[str, ParamSpec]):
        self.params = dict(params)

    # ------------------------------------------------------------------ validation

    def validate(self, base: dict, schema=None) -> None:
        """Raise SweepError naming the first bad dimension; `base` is the nested base recipe (or pipeline) dict,
        `schema` what its keys are checked against (default: a training recipe)."""
        schema = schema or RecipeSchema()
        if not self.params:
            raise SweepError(f"search_space is empty: name at least one {schema.what} key to search")
        flat = schema.flat(base)
        for i, (path, p) in enumerate(self.params.items()):
            where = f"search_space.{path}"
            why = schema.reserved(path)
            if why:
                raise SweepError(f"{where}: {why} and cannot be searched")
            try:
                tp = schema.field_type(path)
            except ConfigError as e:
                raise SweepError(f"{where}: {e}") from None
            self._check_dim(where, path, tp, p)
            for v in self._probe_values(p):
                self._check_in_recipe(where, base, path, v, schema)
            self._check_condition(where, list(self.params)[:i], flat, p, schema)

    def _check_dim(self, where: str, path: str, tp: Any, p: ParamSpec) -> None:
        bt = _base_type(tp)
        label = _type_label(tp)
        if p.type == "choice":
            if p.low is not None or p.high is not None or p.log or p.step is not None:
                raise SweepError(f"{where}: a choice takes `values`, not low/high/log/step")
            if not p.values:
                raise SweepError(f"{where}: empty choice (give at least one value)")
            for v in p.values:
                if not isinstance(v, Scalar):
                    raise SweepError(f"{where}: choice values must be scalars (number, string, true/false, "
                                     f"null), got {v!r}")
            if len({repr(v) for v in p.values}) != len(p.values):
                raise SweepError(f"{where}: duplicate choice values {p.values}")
            if typing.get_origin(bt) in (list, dict, tuple):
                raise SweepError(f"{where}: {path} is a {label}; only scalar keys can be searched")
            return
        if p.values is not None:
            raise SweepError(f"{where}: `values` only goes with type: choice")
        if p.low is None or p.high is None:
            raise SweepError(f"{where}: type {p.type} needs low and high")
        if not (_is_number(p.low) and _is_number(p.high)):
            raise SweepError(f"{where}: low/high must be numbers, got {p.low!r}, {p.high!r}")
        if not p.low < p.high:
            raise SweepError(f"{where}: empty range: low ({p.low}) must be < high ({p.high})")
        if p.type == "int":
            if bt is not int:
                raise SweepError(f"{where}: type int needs an integer key, but {path} is {label}"
                                 + (" (use uniform or loguniform)" if bt is float else " (use choice)"))
            if not (isinstance(p.low, int) and isinstance(p.high, int)):
                raise SweepError(f"{where}: {path} is an integer: low/high must be integers, got {p.low!r}, "
                                 f"{p.high!r}")
            if p.step is not None and (not isinstance(p.step, int) or p.step < 1):
                raise SweepError(f"{where}: step must be a positive integer")
            if p.log and (p.low < 1 or p.step not in (None, 1)):
                raise SweepError(f"{where}: log: true needs low >= 1 and no step")
            return
        # uniform / loguniform
        if bt is not float:
            hint = " (use type: int)" if bt is int else " (use type: choice)"
            raise SweepError(f"{where}: type {p.type} needs a float key, but {path} is {label}{hint}")
        if p.log:
            raise SweepError(f"{where}: `log` is for type int (use type: loguniform)")
        if p.type == "loguniform":
            if p.low <= 0:
                raise SweepError(f"{where}: loguniform needs low > 0, got {p.low}")
            if p.step is not None:
                raise SweepError(f"{where}: step is not supported with loguniform")
        if p.step is not None and (not _is_number(p.step) or p.step <= 0 or p.step > p.high - p.low):
            raise SweepError(f"{where}: step must be > 0 and <= high - low")

    @staticmethod
    def _probe_values(p: ParamSpec) -> list[Any]:
        return list(p.values) if p.type == "choice" else [p.low, p.high]

    @staticmethod
    def _check_in_recipe(where: str, base: dict, path: str, value: Any, schema) -> None:
        try:
            schema.check(base, path, value)
        except ConfigError as e:
            raise SweepError(f"{where}: value {value!r} is not valid for the {schema.what}: {e}") from None

    def _check_condition(self, where: str, earlier: list[str], flat: dict, p: ParamSpec, schema) -> None:
        if not p.when:
            return
        for key, want in p.when.items():
            wants = want if isinstance(want, list) else [want]
            if key in self.params:
                if key not in earlier:
                    raise SweepError(f"{where}: condition on {key}, which must be declared before {where}")
                dep = self.params[key]
                if dep.type != "choice":
                    raise SweepError(f"{where}: condition on {key}, which is not a choice dimension")
                missing = [w for w in wants if w not in dep.values]
                if missing:
                    raise SweepError(f"{where}: condition {key} in {wants}: {missing} are not among its "
                                     f"values {dep.values}")
                continue
            try:
                schema.field_type(key)
            except ConfigError as e:
                raise SweepError(f"{where}: when: {e}") from None
            if flat.get(key) not in wants:
                raise SweepError(f"{where}: condition {key} in {wants} is never true: the base {schema.what} has "
                                 f"{key}={flat.get(key)!r} and {key} is not searched")

    # ------------------------------------------------------------------ sampling

    def active(self, path: str, sampled: dict[str, Any]) -> bool:
        """Whether `path` is sampled, given the values sampled so far (fixed-key conditions were validated)."""
        p = self.params[path]
        for key, want in (p.when or {}).items():
            wants = want if isinstance(want, list) else [want]
            if key in self.params and sampled.get(key, object()) not in wants:
                return False
        return True

    def __call__(self, trial) -> Optional[dict]:
        """Optuna define-by-run: suggest each active dimension in order (OptunaSearch captures the values)."""
        sampled: dict[str, Any] = {}
        for path, p in self.params.items():
            if not self.active(path, sampled):
                continue
            if p.type == "choice":
                sampled[path] = trial.suggest_categorical(path, list(p.values))
            elif p.type == "int":
                sampled[path] = trial.suggest_int(path, p.low, p.high, step=p.step or 1, log=p.log)
            else:
                sampled[path] = trial.suggest_float(path, float(p.low), float(p.high),
                                                    log=p.type == "loguniform", step=p.step)
        return None

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions per key (to rebuild a study from Tune results for the plots)."""
        import optuna.distributions as d
        out = {}
        for path, p in self.params.items():
            if p.type == "choice":
                out[path] = d.CategoricalDistribution(list(p.values))
            elif p.type == "int":
                out[path] = d.IntDistribution(p.low, p.high, log=p.log, step=p.step or 1)
            else:
                out[path] = d.FloatDistribution(float(p.low), float(p.high), log=p.type == "loguniform",
                                                step=p.step)
        return out

    @property
    def conditional(self) -> bool:
        return any(p.when for p in self.params.values())


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


__all__ = ["SearchSpace", "RecipeSchema", "PipelineSchema", "is_missing"]
