"""CLIP-IT's MLflow pyfunc model class (imports mlflow, so it lives apart from `clip_it.py` and is imported only
when a model is exported or loaded). See `medvl.methods.clip_it.ClipItPyfunc` for the input and output."""
from __future__ import annotations

import mlflow.pyfunc

from medvl.methods.clip_it import ClipItPyfunc


class ClipItPyfuncModel(ClipItPyfunc, mlflow.pyfunc.PythonModel):
    """Images in (column `image`: encoded bytes or base64), class probabilities out (`p_<class>`)."""
