"""Built-in stage kinds (importing this package registers them):

- `train` (`kinds/train.py`): a Ray Train job: a method run through the seam (`run_training`), config = a training
  recipe; output: the final model + its resolved recipe.
- `embed` (`kinds/embed.py`): a Ray Data batch-inference job (actor pool): a train stage's image encoder over
  splits of a corpus; output: one Parquet file of features per split.
- `linear_probe` (`kinds/probe.py`): a Ray task: scikit-learn logistic regression on an embed stage's features;
  reports held-out accuracy.
- `slice_labels`, `cam`, `amda`, `clisc_eval` (`kinds/clisc.py`): CLISC part 1 (CLIP slice labels with Ray Data,
  LayerCAM of a `slice_classifier` train stage, adaptive masking; ground truth only in `clisc_eval`).
- `sam_labels`, `s3f`, `clisc_gt_volumes`, `clisc_seg_eval` (`kinds/clisc_seg.py`): CLISC part 2 (pseudo-labels
  from a prompt-driven segmenter with Ray Data, S3F filtering for the `unet3d` retraining, the evaluation table;
  ground truth only in `clisc_gt_volumes` and `clisc_seg_eval`).
"""
from medvl.pipelines.kinds import clisc, clisc_seg, embed, pair, probe, subset, train  # noqa: F401
