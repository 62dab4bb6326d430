"""Multi-stage pipelines with cached, shared stages (the layer between `train` and `tune`).

A pipeline recipe (`jobs/pipeline_*.yaml`, see `recipe.py`) lists stages; each stage is an instance of a
registered stage kind (`stage.py`; built-ins in `kinds/`: `train` = a Ray Train job running a method,
`embed` = Ray Data batch inference, `linear_probe` = a Ray task). Each stage's output is cached under
`<cache root>/<stage>/<key>/` (`store.py`), key = hash(stage name, code version, config slice, upstream output
ids, input fingerprints) (`fingerprint.py`); builds are locked per key across processes and nodes (`locks.py`);
`runner.py` plans and runs, `tracking.py` records one MLflow parent run per pipeline run with a nested run per
stage. `medvl pipeline RECIPE [overrides] [--only S] [--force S] [--dry-run]` is `cli.py`.
"""
from medvl.pipelines.recipe import (Pipeline, StageNode, dump_pipeline, is_pipeline_data,  # noqa: F401
                                    is_pipeline_file, load_pipeline, pipeline_to_dict)
from medvl.pipelines.runner import PipelineOutcome, StageFailed, plan_pipeline, run_pipeline  # noqa: F401
from medvl.pipelines.stage import Input, PipelineError, Stage, StageContext, register_stage, stage_kinds  # noqa: F401
