"""`replora eval`: score a generative adapter (or the base model) on each task of a dataset, the
papers' way: one accuracy per test set, their average, and the adapter's trainable share.

Scoring by generation: greedy answers (KV cache, batched), right when they name the right choice
(commonsense) or equal the reference after normalization. Scoring by log-likelihood (`loglik`,
choice items only): the candidate response of each choice is scored by its mean log-probability per
token given the prompt, and the best one is the model's answer: no new head, no generation.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..model import count_parameters, merge
from ..saving import load_adapter, read_adapter, write_folder
from . import generative
from .data import load_task
from .pretrained import load_causal_lm
from .settings import EvalSettings

log = logging.getLogger("replora.training")


def model_and_adapter(adapter: str | None, model: str | None) -> tuple[str, Path | None, dict]:
    """(model, adapter folder or None, the run's settings if `adapter` is a run folder): `--adapter` and `--model`
    resolved, `model` (when given) over what the folder records."""
    if adapter is None:
        if model is None:
            raise ValueError("give --adapter (a run folder or an adapter folder) or, for the base model's own row, --model")
        return model, None, {}
    folder = Path(adapter)
    if (folder / "settings.json").is_file() and (folder / "adapter").is_dir():
        run = json.loads((folder / "settings.json").read_text())
        return model or run["model"], folder / "adapter", run
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {folder}: neither a run folder (settings.json and adapter/) nor an adapter "
                                "folder (adapter_config.json)")
    config = json.loads((folder / "adapter_config.json").read_text())
    model = model or config.get("base_model_name_or_path")
    if not model:
        raise ValueError(f"--adapter {folder} does not say its base model: give --model")
    return model, folder, {}


def _by_task(examples: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for e in examples:
        groups[e["task"]].append(e)
    return groups


def scored_items(s: EvalSettings) -> dict[str, list[dict]]:
    """The test items an evaluation scores, by task: a seeded sample of each set, the same for every model."""
    from .commonsense import capped_per_task

    task = load_task(s.dataset, task="sft")
    test = [e if "task" in e else {**e, "task": task.name} for e in task.test]  # a user's data: one task
    return _by_task(capped_per_task(test, s.max_eval_examples, s.seed))


def evaluate_generative(s: EvalSettings) -> dict:
    """Score per task; returns (and writes, as JSON and Markdown) the row."""
    from .commonsense import candidate_responses

    s.validate()
    model_name, adapter, run = model_and_adapter(s.adapter, s.model)
    max_length = s.max_length or run.get("max_length", 256)
    quantize = s.quantize or run.get("quantize")  # the base model as the run trained it, unless asked otherwise
    groups = scored_items(s)
    if s.scoring == "loglik" and not all("choices" in e for examples in groups.values() for e in examples):
        raise ValueError(f"--scoring loglik needs items with choices (e.g. --dataset commonsense); {s.dataset!r} has "
                         "free-form answers: use --scoring generate")
    if s.output:
        out = Path(s.output)
    elif run:  # beside the run it scores
        out = Path(s.adapter) / f"eval-{s.dataset.replace(':', '-')}-{s.scoring}-adapter"
    else:
        out = Path("runs") / "eval" / f"eval-{s.dataset.replace(':', '-')}-{s.scoring}-{Path(model_name).name}"
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} already holds an evaluation; choose another --output (nothing is overwritten)")

    torch.manual_seed(s.seed)
    model, tokenizer = load_causal_lm(model_name, quantize)
    base_total = count_parameters(model)[1]  # (a 4-bit weight counted by its values: count_parameters)
    trainable = 0
    if adapter is not None:
        load_adapter(model, adapter)
        trainable = count_parameters(model)[0]
        if quantize is None:  # (into quantized layers a merge is refused: the adapter runs beside them)
            merge(model)  # inference then costs what the base model costs (RepLoRA's generators do not run)
    model.eval()
    started = time.perf_counter()
    scores, samples = {}, {}
    for name, examples in groups.items():
        if s.scoring == "generate":
            prompts = [generative.prompt_of(generative.encode(e, tokenizer, max_length)) for e in examples]
            answers = generative.generate(model, tokenizer, prompts, s.max_new_tokens, s.batch_size)
            right = [generative.is_correct(a, e) for a, e in zip(answers, examples)]
            samples[name] = [{"answer": a.strip(), "right": r} for a, r in zip(answers[:3], right[:3])]
        else:
            right = []
            for e in examples:
                logliks = generative.choice_logliks(model, tokenizer, e, candidate_responses(e), max_length)
                right.append(max(range(len(logliks)), key=logliks.__getitem__) == e["label"])
        scores[name] = sum(right) / len(right)
        log.info("%s: %.4f on %d items (%s)", name, scores[name], len(right), s.scoring)
    row = {
        "model": model_name, "adapter": str(adapter) if adapter else None, "method": run.get("method") or (
            read_adapter(adapter)[0].method if adapter else "base"),
        "dataset": s.dataset, "scoring": s.scoring, "items_per_task": {k: len(v) for k, v in groups.items()},
        "accuracy": scores, "average": statistics.fmean(scores.values()),
        "trainable_percent": 100 * trainable / base_total, "seed": s.seed, "max_length": max_length,
        "quantize": quantize,
        "seconds": time.perf_counter() - started, "samples": samples,
    }

    def write(folder: Path) -> None:
        (folder / "eval.json").write_text(json.dumps(row, indent=2) + "\n")
        (folder / "eval.md").write_text(table([row]) + "\n")
    write_folder(out, write)
    row["output"] = str(out)
    return row


def table(rows: list[dict]) -> str:
    """The paper-style table: one accuracy (%) per task, their average, the trainable share."""
    tasks = list(rows[0]["accuracy"])
    lines = ["| model | " + " | ".join(tasks) + " | average | trainable % |", "|---" * (len(tasks) + 3) + "|"]
    for r in rows:
        label = r["method"] if r["adapter"] else f"{Path(r['model']).name} base"
        lines.append(f"| {label}, {r['scoring']} | " + " | ".join(f"{100 * r['accuracy'][t]:.1f}" for t in tasks)
                     + f" | {100 * r['average']:.1f} | {r['trainable_percent']:.2f} |")
    return "\n".join(lines)

