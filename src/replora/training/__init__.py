"""The fine-tuning pipeline behind `replora train`: settings (settings.py), data (data.py), pretrained
models (pretrained.py; model_path in adapted_model.py), what a run trains for (objectives.py), its folder
(run_folder.py), the training loop (loop.py) and the command line (cli.py)."""
from .data import TaskData, load_task
from .loop import TrainingDiverged, train
from .objectives import evaluate
from .adapted_model import model_path
from .pretrained import load_model
from .settings import FULL, TrainSettings

__all__ = ["train", "TrainSettings", "FULL", "TrainingDiverged", "evaluate", "load_task", "TaskData", "load_model",
           "model_path"]
