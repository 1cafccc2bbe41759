"""Which part of a finished SmolLM2 run does the learning: the adapter, or the new score head?

For each run folder given, scores the test questions the run was scored on twice: as trained, and with
the adapter's update switched off while the trained score head stays. Also reports the adapter's
size, ||s B A||_F / ||W0||_F averaged over the adapted layers (DoRA: its merged change).
Needs the run's adapter/ folder, which `python -m research sample-efficiency` keeps beside metrics.json;
adapters are not committed, so in a fresh clone run the grid into a new folder (`--runs <folder>`). Usage,
from the repository root:

    python research/head_only.py research/results/smollm2-siqa/runs/lora-lr0.001-f*-s* > head_only.md
"""
import json
import sys
from pathlib import Path

from accelerate import Accelerator

from replora import load_adapter
from replora.model import adapted_layers
from replora.training import load_model, load_task
from replora.training.data import capped
from replora.training.loop import Collator, evaluate, make_loader


def relative_update(model) -> float:
    sizes = []
    for layer in adapted_layers(model).values():
        W0 = layer.weight.float()  # merged_weight is in the base layer's layout, as is .weight
        sizes.append(((layer.merged_weight(layer.active_adapter).float() - W0).norm() / W0.norm()).item())
    return sum(sizes) / len(sizes)


def main(folders: list[str]) -> None:
    accelerator = Accelerator(cpu=True)  # one process; the model and batches stay on the CPU
    print("| run | test as trained (%) | head only, adapter off (%) | adapter ‖ΔW‖/‖W0‖ |")
    print("|---|---|---|---|")
    for folder in map(Path, folders):
        s = json.loads((folder / "settings.json").read_text())
        task = load_task(s["dataset"], s["text_column"], s["label_column"], s["choices_column"])
        model, tokenizer = load_model(s["model"], task.num_labels)
        load_adapter(model, folder / "adapter")
        loader = make_loader(capped(task.test, s["max_eval_examples"]),
                             Collator(tokenizer, task.kind, s["max_length"]), s["eval_batch_size"], None)
        trained = evaluate(model, loader, accelerator)
        layers = adapted_layers(model).values()
        for layer in layers:  # the adapter's update off; the saved score head keeps its trained weights
            layer.disabled = True
        head_only = evaluate(model, loader, accelerator)
        for layer in layers:
            layer.disabled = False
        print(f"| {folder.name} | {100 * trained:.1f} | {100 * head_only:.1f} | {relative_update(model):.4f} |",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
