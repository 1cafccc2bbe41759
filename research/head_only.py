"""Which part of a finished classification run does the learning: the adapter, or the new head?

For each run folder given (a text, multiple-choice or image classification run of `python -m research
sample-efficiency`), scores the test set the run was scored on twice: as trained, and with the adapter's
update switched off while the trained head stays. Also reports the adapter's size, ||s B A||_F / ||W0||_F
averaged over the adapted layers (DoRA: its merged change). The model, data and collator are the training
pipeline's own (its ScoreHead objective), so the numbers are made as the run's were.
Needs the run's adapter/ folder, which the grids keep beside metrics.json; adapters are not committed, so
in a fresh clone run the grid into a new folder (`--runs <folder>`). Usage, from the repository root:

    python research/head_only.py research/results/smollm2-siqa/runs/lora-lr0.001-f*-s* > head_only.md
"""
import dataclasses
import json
import sys
from pathlib import Path

from accelerate import Accelerator

from replora import load_adapter
from replora.model import adapted_layers
from replora.training import load_task
from replora.training.data import capped
from replora.training.objectives import ScoreHead, evaluate
from replora.training.settings import TrainSettings


def relative_update(model) -> float:
    sizes = []
    for layer in adapted_layers(model).values():
        W0 = layer.weight.float()  # merged_weight is in the base layer's layout, as is .weight
        sizes.append(((layer.merged_weight(layer.active_adapter).float() - W0).norm() / W0.norm()).item())
    return sum(sizes) / len(sizes)


def main(folders: list[str]) -> None:
    accelerator = Accelerator(cpu=True)  # one process; the model and batches stay on the CPU
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    print("| run | test as trained (%) | head only, adapter off (%) | adapter ‖ΔW‖/‖W0‖ |")
    print("|---|---|---|---|")
    for folder in map(Path, folders):
        saved = json.loads((folder / "settings.json").read_text())
        s = TrainSettings(**{k: v for k, v in saved.items() if k in names})
        task = load_task(s.dataset, s.text_column, s.label_column, s.choices_column)
        objective = ScoreHead(s, task)  # the run's model (with a fresh head) and collator
        model = objective.model
        load_adapter(model, folder / "adapter")  # the adapter and the trained head
        loader = objective.eval_loader(capped(task.test, s.max_eval_examples))
        trained = evaluate(model, loader, accelerator)
        layers = adapted_layers(model).values()
        for layer in layers:  # the adapter's update off; the saved head keeps its trained weights
            layer.disabled = True
        head_only = evaluate(model, loader, accelerator)
        for layer in layers:
            layer.disabled = False
        print(f"| {folder.name} | {100 * trained:.1f} | {100 * head_only:.1f} | {relative_update(model):.4f} |",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
