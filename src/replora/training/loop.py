"""Fine-tuning: one function, `train(settings)`, behind `replora train`. Runs on one process or many
under `accelerate launch` / `torchrun` (Accelerate; gloo on CPU, NCCL on GPU) with the global batch
kept equal: each global batch is split across the processes, so the data order and the optimizer
steps are the same whatever the number of processes.

An output folder per run holds settings.json, metrics.json, log.txt, the final adapter (save_adapter
format) and checkpoints/epoch-N (written atomically each epoch; `latest` names the newest).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..model import count_parameters, inject
from ..saving import load_adapter, save_adapter, write_folder
from .data import SPLIT_SEED, TaskData, capped, load_task, stratified_fraction
from .pretrained import head_name, load_model
from .settings import FULL, TrainSettings

log = logging.getLogger("replora.training")


class TrainingDiverged(RuntimeError):
    pass


def _training_examples(task: TaskData, s: TrainSettings) -> list[dict]:
    examples = task.train
    if s.max_train_examples and s.max_train_examples < len(examples):
        # The cap is the same training set for every seed and fraction (a fixed stratified subset).
        examples = stratified_fraction(examples, s.max_train_examples / len(examples), SPLIT_SEED)
    return stratified_fraction(examples, s.fraction, s.seed)


class Collator:
    """Tokenizes a list of examples; multiple choice pads every question to the batch's most choices."""

    def __init__(self, tokenizer, kind: str, max_length: int):
        self.tokenizer, self.kind, self.max_length = tokenizer, kind, max_length

    def __call__(self, examples: list[dict]) -> dict:
        labels = torch.tensor([e["label"] for e in examples])
        options = dict(padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        if self.kind == "classification":
            batch = self.tokenizer([e["text"] for e in examples], **options)
            return {**batch, "labels": labels}
        width = max(len(e["choices"]) for e in examples)
        questions, answers, mask = [], [], torch.zeros(len(examples), width, dtype=torch.bool)
        for i, e in enumerate(examples):
            for j in range(width):
                questions.append(e["text"])
                answers.append(e["choices"][j] if j < len(e["choices"]) else "")
                mask[i, j] = j < len(e["choices"])
        batch = self.tokenizer(questions, answers, **options)
        batch = {k: v.view(len(examples), width, -1) for k, v in batch.items()}
        return {**batch, "labels": labels, "choice_mask": mask}


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Class logits (classification) or one score per choice, masked past each question's choices."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "choice_mask")}
    if "choice_mask" not in batch:
        return model(**inputs).logits
    b, c = batch["choice_mask"].shape
    scores = model(**{k: v.view(b * c, -1) for k, v in inputs.items()}).logits.view(b, c)
    return scores.masked_fill(~batch["choice_mask"], torch.finfo(scores.dtype).min)


def make_loader(examples, collate, batch_size: int, seed: int | None):
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=seed is not None,
                                       generator=generator, collate_fn=collate)


def evaluate(model, loader, accelerator) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            predictions = forward_logits(model, batch).argmax(-1)
            predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
            correct += (predictions == labels).sum().item()
            total += labels.numel()
    model.train()
    return correct / max(total, 1)


# --- checkpoints: safetensors + JSON only -------------------------------------------------------

def _save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict) -> None:
    tensors, groups = {}, []
    opt_state = optimizer.state_dict()
    for index, values in opt_state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    for group in opt_state["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    payload = {**state, "optimizer_param_groups": groups, "scheduler": scheduler.state_dict()}

    def write(tmp: Path) -> None:
        save_adapter(model, tmp / "adapter")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "training_state.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps(payload, indent=2))

    write_folder(folder, write)


def _load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    load_adapter(model, folder / "adapter")
    tensors = load_file(folder / "training_state.safetensors")
    payload = json.loads((folder / "trainer_state.json").read_text())
    opt_state = {"state": {}, "param_groups": payload.pop("optimizer_param_groups")}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(payload.pop("scheduler"))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return payload


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _prepare_output(s: TrainSettings, out: Path) -> Path | None:
    """Check the output folder; return the checkpoint to resume from, if any."""
    settings_file = out / "settings.json"
    if s.resume:
        if not settings_file.is_file():
            return None  # nothing to resume: start fresh
        saved = json.loads(settings_file.read_text())
        mine = {k: v for k, v in s.to_dict().items() if k != "resume"}
        saved.pop("resume", None)
        changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if changed:
            raise ValueError(f"--resume with settings that differ from the run in {out}: {', '.join(changed)}; "
                             "resume with the same settings, or start a new run in another --output")
        for stale in (out / "checkpoints").glob(".*.tmp-*"):  # half-written by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        latest = out / "checkpoints" / "latest"
        return out / "checkpoints" / latest.read_text().strip() if latest.is_file() else None
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} already holds a run; pass --resume to continue it, or choose "
                         "another --output (nothing there is overwritten)")
    return None


def train(settings: TrainSettings) -> dict:
    """Run one fine-tuning job; returns the metrics also written to <output>/metrics.json."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    s = settings
    s.validate()
    out = s.output_dir()
    # Accelerate picks the device; on a machine with no accelerator it must be told so, or a torchrun /
    # accelerate-launch run on CPUs would not form its gloo process group.
    has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    # Accelerate keeps its settings (mixed precision, ...) in a process-wide singleton; a second train() in
    # one process (experiments, notebooks) may ask for others. The process group itself is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=s.grad_accum, mixed_precision=s.mixed_precision,
                              cpu=not has_accelerator, dataloader_config=DataLoaderConfiguration(split_batches=True))
    if s.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size {s.batch_size} (the global batch) must divide evenly among "
                         f"{accelerator.num_processes} processes")
    resume_from = _prepare_output(s, out)
    task = load_task(s.dataset, s.text_column, s.label_column, s.choices_column)
    train_examples = _training_examples(task, s)
    validation, test = capped(task.validation, s.max_eval_examples), capped(task.test, s.max_eval_examples)

    set_seed(s.seed)
    model, tokenizer = load_model(s.model, task.num_labels)
    if s.method == FULL:
        config = None
        model.requires_grad_(True)
    else:
        config = s.adapter_config(head_name(model))
        inject(model, config)
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(train_examples) / s.batch_size) / s.grad_accum)
    total_steps = s.max_steps or steps_per_epoch * s.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(s.warmup_ratio * total_steps), total_steps)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "settings.json", s.to_dict())
        handler = logging.FileHandler(out / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    state = {"epoch": 0, "step": 0, "history": [], "seconds": 0.0}
    if resume_from is not None and config is not None:
        state = _load_checkpoint(resume_from, model, optimizer, scheduler)
        log.info("resumed from %s (epoch %d, step %d)", resume_from, state["epoch"], state["step"])
    log.info("%s on %s (%s): %d train / %d validation / %d test examples; %s; trainable %d of %d parameters; "
             "%d processes on %s", s.model, task.name, task.kind, len(train_examples), len(validation), len(test),
             s.method, trainable, total, accelerator.num_processes, accelerator.device)

    collate = Collator(tokenizer, task.kind, s.max_length)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    val_loader, test_loader = accelerator.prepare(make_loader(validation, collate, s.eval_batch_size, None),
                                                  make_loader(test, collate, s.eval_batch_size, None))
    progress = tqdm(total=total_steps, initial=state["step"], disable=not accelerator.is_local_main_process,
                    desc=s.method, unit="step", dynamic_ncols=True)
    started = time.perf_counter() - state["seconds"]
    model.train()
    for epoch in range(state["epoch"], epochs):
        # The epoch's order depends on (seed, epoch) only, so a resumed run sees the same batches.
        loader = accelerator.prepare(make_loader(train_examples, collate, s.batch_size, s.seed * 1000 + epoch))
        losses, seen, epoch_start = [], 0, time.perf_counter()
        for batch in loader:
            if state["step"] >= total_steps:
                break
            with accelerator.accumulate(model):
                logits = forward_logits(model, batch)
                loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"the loss became {loss.item()} at step {state['step'] + 1} (epoch "
                                           f"{epoch + 1}); the last good checkpoint is kept. Try a lower --lr or "
                                           "--max-grad-norm")
                accelerator.backward(loss)
                if accelerator.sync_gradients and s.max_grad_norm:
                    accelerator.clip_grad_norm_(params, s.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.item())
            seen += len(batch["labels"]) * accelerator.num_processes
            if accelerator.sync_gradients:
                state["step"] += 1
                progress.update(1)
                progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}",
                                     ex_per_s=f"{seen / (time.perf_counter() - epoch_start):.1f}")
        val_accuracy = evaluate(model, val_loader, accelerator)
        state["epoch"] = epoch + 1
        state["seconds"] = time.perf_counter() - started
        state["history"].append({"epoch": epoch + 1, "step": state["step"],
                                 "train_loss": sum(losses) / max(len(losses), 1),
                                 "validation_accuracy": val_accuracy, "seconds": state["seconds"]})
        log.info("epoch %d: train loss %.4f, validation accuracy %.4f", epoch + 1,
                 state["history"][-1]["train_loss"], val_accuracy)
        if accelerator.is_main_process and config is not None:  # (full fine-tuning keeps no checkpoints)
            checkpoints = out / "checkpoints"
            name = f"epoch-{epoch + 1}"
            if (checkpoints / name).exists():  # a stale copy from a run killed before `latest` named it
                shutil.rmtree(checkpoints / name)
            _save_checkpoint(checkpoints / name, accelerator.unwrap_model(model), optimizer, scheduler, state)
            latest = checkpoints / "latest"
            previous = latest.read_text().strip() if latest.is_file() else None
            tmp = checkpoints / ".latest.tmp"
            tmp.write_text(name)
            os.replace(tmp, latest)  # the new checkpoint counts only once it is whole
            if previous and previous != name:
                shutil.rmtree(checkpoints / previous, ignore_errors=True)
        accelerator.wait_for_everyone()
        if state["step"] >= total_steps:
            break
    progress.close()
    test_accuracy = evaluate(model, test_loader, accelerator)
    metrics = {
        "test_accuracy": test_accuracy,
        "validation_accuracy": state["history"][-1]["validation_accuracy"] if state["history"] else None,
        "history": state["history"], "trainable_parameters": trainable, "total_parameters": total,
        "wall_time_seconds": time.perf_counter() - started, "steps": state["step"],
        "train_examples": len(train_examples), "validation_examples": len(validation), "test_examples": len(test),
        "num_processes": accelerator.num_processes, "method": s.method, "model": s.model, "lr": s.lr,
        "dataset": task.name, "seed": s.seed, "fraction": s.fraction,
        "adapter_config": config.to_dict() if config else None,
    }
    if accelerator.is_main_process:
        if config is not None:
            save_adapter(accelerator.unwrap_model(model), out / "adapter")
        _write_json(out / "metrics.json", metrics)
        log.info("test accuracy %.4f; wall time %.1f s", test_accuracy, metrics["wall_time_seconds"])
    accelerator.wait_for_everyone()
    for handler in list(log.handlers):
        if isinstance(handler, logging.FileHandler):
            log.removeHandler(handler)
            handler.close()
    return metrics
