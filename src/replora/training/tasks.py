"""TaskData: a dataset's splits as the training loop reads them (data.py and commonsense.py make them)."""
from __future__ import annotations

from dataclasses import dataclass, field

SPLIT_SEED = 1234  # splits are fixed, whatever --seed a run uses
# --task names (settings) and the TaskData kinds they read as
KIND_OF_TASK = {"classification": "classification", "multiple-choice": "multiple_choice", "sft": "sft"}
TASK_OF_KIND = {kind: task for task, kind in KIND_OF_TASK.items()}


@dataclass
class TaskData:
    name: str
    kind: str  # "classification", "multiple_choice" or "sft"
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    label_names: list[str] = field(default_factory=list)
    # Warnings from reading the data (image files skipped), logged when read and again into the run's log.txt
    # once the run folder exists (the data is read before it is made).
    notes: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.kind == "classification" else 1

    @property
    def images(self) -> bool:
        """Image classification: examples hold an "image" (training/images.py) instead of text."""
        return bool(self.train) and "image" in self.train[0]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}
