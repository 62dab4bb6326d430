"""The embedding pyfunc as MLflow "model from code": MLflow runs this file when it loads the model (nothing is
unpickled). Logged by `medvl.methods.embedding_pyfunc.log_embedding_model`; medvl travels in the model's `code/`."""
import mlflow

from medvl.methods.embedding_pyfunc import EmbeddingPyfuncModel

mlflow.models.set_model(EmbeddingPyfuncModel())
