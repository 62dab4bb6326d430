"""CLIP-IT's MLflow pyfunc model class (imports mlflow, so it lives apart from `clip_it.py` and is imported only
when a model is exported or loaded). See `medvl.methods.clip_it.ClipItPyfunc` for the input and output."""
from __future__ import annotations

import mlflow.pyfunc
import pandas as pd

from medvl.methods.clip_it import ClipItPyfunc


class ClipItPyfuncModel(ClipItPyfunc, mlflow.pyfunc.PythonModel):
    """Images in (column `image`: encoded bytes or base64), class probabilities out (`p_<class>`)."""

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # annotated (a DataFrame): mlflow validates against the logged signature and does not warn at import
        return ClipItPyfunc.predict(self, context, model_input, params)
