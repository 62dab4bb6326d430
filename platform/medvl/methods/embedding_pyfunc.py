"""The MLflow model of a contrastive run: an MLflow pyfunc that embeds images and texts (imports mlflow, so it
lives apart from `embedding.py` and is imported only when a model is exported or loaded).

Input (a DataFrame; `dataframe_split` / `dataframe_records` JSON when served): optional columns `image` (encoded
PNG/JPEG/... bytes; base64 strings in JSON) and `text` (str). Output: `image_embedding` and `text_embedding`, lists
of float (L2-normalised; None where a row had no image / no text). Inside the model: `recipe.json` +
`model.safetensors` (no pickled module) and medvl's code (`code_paths`); loading needs torch, open_clip, timm.

    mlflow models serve -m runs:/<run id>/model --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_split": {"columns": ["image", "text"], "data": [["<base64 PNG>", "a photo of the digit 3."]]}}'
"""
from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path
from typing import Optional

import mlflow.pyfunc
import pandas as pd
from torch import nn

from medvl.methods.base import Method
from medvl.methods.embedding import Embedder, embed_frame, write_model_files

MODEL_CODE = str(Path(__file__).with_name("embedding_model_code.py"))
"""The `python_model` file of the logged model (MLflow's models from code: nothing is unpickled at load time)."""

EMBED_REQUIREMENTS = ["torch", "open_clip_torch", "timm", "safetensors", "pillow", "pandas", "numpy"]
"""What the exported model needs (listed, so mlflow does not spend a subprocess inferring it)."""


class EmbeddingPyfuncModel(mlflow.pyfunc.PythonModel):
    """Images and/or texts in, L2-normalised embeddings out (see the module docstring)."""

    def load_context(self, context) -> None:
        self.embedder = Embedder.from_files(context.artifacts["recipe"], context.artifacts["weights"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return embed_frame(self.embedder, model_input)


def embedding_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image", required=False),
                       ColSpec(DataType.string, "text", required=False)]),
        outputs=Schema([ColSpec(Array(DataType.float), "image_embedding", required=False),
                        ColSpec(Array(DataType.float), "text_embedding", required=False)]))


def example_png(size: int = 32) -> bytes:
    """A small grey gradient PNG (the logged input example)."""
    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def log_embedding_model(method: Method, model: nn.Module, tracking_uri: str, run_id: str,
                        name: str = "model") -> None:
    """Log `model` (the method's whole module) as the run's MLflow model: `EmbeddingPyfuncModel` with a signature
    and an input example (an image and a text)."""
    import mlflow

    import medvl
    example = pd.DataFrame({"image": [example_png()], "text": ["an example caption"]})
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_model_files(method, model, tmp)
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            # medvl travels with the model (code_paths): loading needs torch/open_clip/timm, not a checkout
            # python_model as code (a file MLflow runs at load time), not a pickled object
            mlflow.pyfunc.log_model(name=name, python_model=MODEL_CODE, artifacts=artifacts,
                                    signature=embedding_signature(), input_example=example,
                                    code_paths=[str(Path(medvl.__file__).parent)],
                                    pip_requirements=EMBED_REQUIREMENTS)


def register_run_model(tracking_uri: str, run_id: str, registered_name: Optional[str],
                       name: str = "model") -> Optional[str]:
    """Register the run's logged model `name` under `registered_name` in the Model Registry (a new version);
    returns the version, or None when no name is asked for."""
    if not registered_name:
        return None
    import mlflow
    from mlflow.tracking import MlflowClient
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    # the run's logged model by id (MLflow 3 keeps logged models outside the run's artifacts; registering
    # `runs:/<run>/model` works too, with a warning that it fell back to this)
    exp = client.get_run(run_id).info.experiment_id
    found = [m for m in client.search_logged_models(experiment_ids=[exp],
                                                    filter_string=f"source_run_id = '{run_id}'")
             if m.name == name]
    uri = f"models:/{found[-1].model_id}" if found else f"runs:/{run_id}/{name}"
    mv = mlflow.register_model(uri, registered_name)
    return str(mv.version)


def b64(data: bytes) -> str:
    """Encoded image bytes as the base64 string a served model takes in JSON."""
    return base64.b64encode(data).decode("ascii")
