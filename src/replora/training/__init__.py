"""The fine-tuning pipeline behind `replora train`: settings (settings.py), data (data.py), pretrained
models (pretrained.py), the training loop (loop.py) and the command line (cli.py)."""
from .data import TaskData, load_task
from .loop import TrainingDiverged, evaluate, train
from .pretrained import load_model, model_path
from .settings import FULL, TrainSettings

__all__ = ["train", "TrainSettings", "FULL", "TrainingDiverged", "evaluate", "load_task", "TaskData", "load_model",
           "model_path"]
