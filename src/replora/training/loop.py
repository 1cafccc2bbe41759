"""Fine-tuning: one function, `train(settings)`, behind `replora train`. Runs on one process or many
under `accelerate launch` / `torchrun` (Accelerate; gloo on CPU, NCCL on GPU) with the global batch
kept equal: each global batch is split across the processes, so the data order and the optimizer
steps are the same whatever the number of processes.

An output folder per run holds settings.json, metrics.json, log.txt, the final adapter (save_adapter
format) and checkpoints/epoch-N (written atomically each epoch; `latest` names the newest).
"""
from __future__ import annotations

import dataclasses
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
from . import generative
from .data import SPLIT_SEED, TaskData, capped, load_task, stratified_fraction
from .images import open_image
from .pretrained import head_name, load_causal_lm, load_model
from .vision_models import load_image_classifier
from .settings import FULL, HEAD, TrainSettings
from .tasks import TASK_OF_KIND

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


class ImageCollator:
    """Decodes a list of image examples to RGB and makes pixel_values as the model's processor says."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, examples: list[dict]) -> dict:
        pixels = self.processor(images=[open_image(e) for e in examples], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor([e["label"] for e in examples])}


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Class logits (classification) or one score per choice, masked past each question's choices."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "choice_mask")}
    if "choice_mask" not in batch:
        return model(**inputs).logits
    b, c = batch["choice_mask"].shape
    scores = model(**{k: v.view(b * c, -1) for k, v in inputs.items()}).logits.view(b, c)
    return scores.masked_fill(~batch["choice_mask"], torch.finfo(scores.dtype).min)


def freeze_batch_norm_statistics(model) -> None:
    """BatchNorm layers of a frozen base (EfficientNet) normalize with their pretrained statistics in
    training too: in train mode they would update their running statistics, which no adapter file holds,
    so the saved adapter on a fresh base would not give the trained model. (Full fine-tuning and
    modules_to_save copies train theirs.)"""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()):
            module.register_forward_pre_hook(_eval_mode)


def _eval_mode(module, args) -> None:
    module.training = False


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


# --- what a run trains for: a score head (classification, multiple choice) or the text (sft) ---------

class ScoreHead:
    """Classification and multiple choice: a new score head on the model, cross-entropy over the classes
    (or the choices' scores), accuracy on validation and test."""

    def __init__(self, s: TrainSettings, task: TaskData):
        self.s, self.task = s, task
        self.default_targets = None
        if task.images:
            self.model, processor, self.default_targets = load_image_classifier(s.model, task.num_labels, s.image_size)
            self.collate = ImageCollator(processor)
        else:
            self.model, self.tokenizer = load_model(s.model, task.num_labels)
            self.collate = Collator(self.tokenizer, task.kind, s.max_length)
        self.head = head_name(self.model)
        self.stats: dict = {}

    def prepare(self, train, validation, test) -> None:
        """Whatever can fail on the data, done before the run writes anything."""

    def train_loader(self, examples, epoch: int):
        # The epoch's order depends on (seed, epoch) only, so a resumed run sees the same batches.
        return make_loader(examples, self.collate, self.s.batch_size, self.s.seed * 1000 + epoch)

    def eval_loader(self, examples):
        return make_loader(examples, self.collate, self.s.eval_batch_size, None)

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        """(the batch's loss, how many units it counts: examples here, response tokens for sft)."""
        return torch.nn.functional.cross_entropy(forward_logits(model, batch).float(), batch["labels"]), len(batch["labels"])

    def validate(self, model, loader, accelerator) -> dict:
        return {"validation_accuracy": evaluate(model, loader, accelerator)}

    def test(self, model, loader, examples, accelerator) -> dict:
        return {"test_accuracy": evaluate(model, loader, accelerator)}


class Generative:
    """sft: the causal-LM loss on the response tokens, length-grouped batches; validation loss each
    epoch; test loss and greedy answers scored by exact match at the end (generative.py)."""

    def __init__(self, s: TrainSettings, task: TaskData):
        self.s, self.task = s, task
        self.model, self.tokenizer = load_causal_lm(s.model)
        self.collate = generative.SFTCollator(self.tokenizer.pad_token_id)
        self.head = None  # the model's own output layer writes the answers: nothing new to train in full
        self.stats: dict = {}

    def prepare(self, train, validation, test) -> None:
        """Tokenize every set once (a template or a row that cannot be rendered stops the run here, before
        anything is written), counting the sequences cut to --max-length."""
        self.features = {}
        for name, examples in (("train", train), ("validation", validation), ("test", test)):
            self.features[id(examples)], cut = generative.encode_all(examples, self.tokenizer, self.s.max_length)
            for what, n in cut.items():
                self.stats[f"{name}_{what}"] = n  # (prompts lose their start, responses their end)

    def train_loader(self, examples, epoch: int):
        ordered = generative.length_grouped(self.features[id(examples)], self.s.batch_size, self.s.seed * 1000 + epoch)
        self.stats["padding_fraction"] = generative.padding_fraction(ordered, self.s.batch_size)
        return make_loader(ordered, self.collate, self.s.batch_size, None)

    def eval_loader(self, examples):
        ordered = generative.length_grouped(self.features[id(examples)], self.s.eval_batch_size, 0)
        return make_loader(ordered, self.collate, self.s.eval_batch_size, None)

    def loss(self, model, batch):
        return generative.response_loss(model, batch)

    def validate(self, model, loader, accelerator) -> dict:
        return {"validation_loss": generative.mean_loss(model, loader, accelerator)}

    def test(self, model, loader, examples, accelerator) -> dict:
        from accelerate.utils import gather_object

        result = {"test_loss": generative.mean_loss(model, loader, accelerator)}
        with accelerator.split_between_processes(list(range(len(examples)))) as mine:
            features = self.features[id(examples)]  # encoded once, in prepare()
            prompts = [generative.prompt_of(features[i]) for i in mine]
            answers = generative.generate(accelerator.unwrap_model(model), self.tokenizer, prompts,
                                          self.s.max_new_tokens, self.s.eval_batch_size)
            scored = [(i, a, generative.is_correct(a, examples[i])) for i, a in zip(mine, answers)]
        scored = sorted(gather_object(scored))
        result["test_exact_match"] = sum(ok for _, _, ok in scored) / max(len(scored), 1)
        for i, answer, ok in scored[:5]:  # a sample, for the log
            log.info("test answer %s: %r -> %r", "right" if ok else "wrong",
                     generative.first_words(generative.render(examples[i], self.tokenizer)[0]), answer.strip())
        model.train()
        return result


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
        # A setting missing from the saved file is newer than the run: it had no say in it.
        changed = sorted(k for k in saved.keys() | mine.keys() if k in saved and saved.get(k) != mine.get(k))
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
    task = load_task(s.dataset, s.text_column, s.label_column, s.choices_column, s.task)
    kind = TASK_OF_KIND[task.kind]
    s = dataclasses.replace(s, model=s.model_name(kind, task.images), task=kind)  # recorded as run, defaults resolved
    out = s.output_dir()
    resume_from = _prepare_output(s, out)
    train_examples = _training_examples(task, s)
    validation, test = capped(task.validation, s.max_eval_examples), capped(task.test, s.max_eval_examples)

    set_seed(s.seed)
    objective = (Generative if kind == "sft" else ScoreHead)(s, task)
    objective.prepare(train_examples, validation, test)
    model = objective.model
    if s.method == FULL:
        config = None
        model.requires_grad_(True)
    elif s.method == HEAD:
        if objective.head is None:
            raise ValueError(f"method 'head' trains the new classification head alone, but {s.model} has no "
                             "'classifier' or 'score' head (generative runs have none); choose an adapter method")
        config = None
        model.requires_grad_(False)
        getattr(model, objective.head).requires_grad_(True)
        freeze_batch_norm_statistics(model)
    else:
        config = s.adapter_config(objective.head, getattr(objective, "default_targets", None))
        inject(model, config)
        freeze_batch_norm_statistics(model)
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
    try:
        state = {"epoch": 0, "step": 0, "history": [], "seconds": 0.0}
        if resume_from is not None and config is not None:
            state = _load_checkpoint(resume_from, model, optimizer, scheduler)
            log.info("resumed from %s (epoch %d, step %d)", resume_from, state["epoch"], state["step"])
        log.info("%s on %s (%s): %d train / %d validation / %d test examples; %s; trainable %d of %d parameters; "
                 "%d processes on %s", s.model, task.name, task.kind, len(train_examples), len(validation), len(test),
                 s.method, trainable, total, accelerator.num_processes, accelerator.device)
        if cut := {k: v for k, v in objective.stats.items() if k.endswith("_cut")}:
            log.info("sequences longer than --max-length %d (prompts lose their start, responses their end): %s",
                     s.max_length, ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in cut.items()))

        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        val_loader, test_loader = accelerator.prepare(objective.eval_loader(validation), objective.eval_loader(test))
        progress = tqdm(total=total_steps, initial=state["step"], disable=not accelerator.is_local_main_process,
                        desc=s.method, unit="step", dynamic_ncols=True)
        started = time.perf_counter() - state["seconds"]
        model.train()
        for epoch in range(state["epoch"], epochs):
            loader = accelerator.prepare(objective.train_loader(train_examples, epoch))
            losses, seen, tokens, epoch_start = [], 0, 0, time.perf_counter()
            for batch in loader:
                if state["step"] >= total_steps:
                    break
                with accelerator.accumulate(model):
                    loss, units = objective.loss(model, batch)
                    if kind == "sft" and accelerator.num_processes > 1:
                        # Each process's loss is a mean over its own response tokens, and DDP averages the
                        # processes: weigh each by its share of the global batch's tokens, as one process would.
                        everyone = accelerator.reduce(torch.tensor([float(units)], device=accelerator.device), "sum")
                        loss = loss * units * accelerator.num_processes / max(everyone.item(), 1.0)
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
                if "attention_mask" in batch:  # (images have no tokens)
                    tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
                if accelerator.sync_gradients:
                    state["step"] += 1
                    progress.update(1)
                    elapsed = time.perf_counter() - epoch_start
                    postfix = dict(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", ex_per_s=f"{seen / elapsed:.1f}")
                    if tokens:
                        postfix["tok_per_s"] = f"{tokens / elapsed:.0f}"
                    progress.set_postfix(**postfix)
            train_seconds = max(time.perf_counter() - epoch_start, 1e-9)  # (throughput without validation)
            validation_metrics = objective.validate(model, val_loader, accelerator)
            state["epoch"] = epoch + 1
            state["seconds"] = time.perf_counter() - started
            state["train_tokens"] = state.get("train_tokens", 0) + tokens
            state["history"].append({"epoch": epoch + 1, "step": state["step"],
                                     "train_loss": sum(losses) / max(len(losses), 1), **validation_metrics,
                                     "train_examples_per_second": seen / train_seconds,
                                     "train_tokens_per_second": tokens / train_seconds,
                                     "seconds": state["seconds"]})
            log.info("epoch %d: train loss %.4f, %s", epoch + 1, state["history"][-1]["train_loss"],
                     ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in validation_metrics.items()))
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
        test_metrics = objective.test(model, test_loader, test, accelerator)
        last = state["history"][-1] if state["history"] else {}
        metrics = {
            **test_metrics, **{k: last.get(k) for k in last if k.startswith("validation_")},
            "history": state["history"], "trainable_parameters": trainable, "total_parameters": total,
            "wall_time_seconds": time.perf_counter() - started, "steps": state["step"],
            "train_examples": len(train_examples), "validation_examples": len(validation), "test_examples": len(test),
            "num_processes": accelerator.num_processes, "method": s.method, "model": s.model, "lr": s.lr,
            "output": str(out),
            "dataset": task.name, "task": kind, "seed": s.seed, "fraction": s.fraction,
            "train_tokens": state.get("train_tokens", 0),
            "train_tokens_per_second": state.get("train_tokens", 0) / max(state["seconds"], 1e-9),
            **{k: v for k, v in objective.stats.items() if k != "train"},
            "adapter_config": config.to_dict() if config else None,
        }
        if accelerator.is_main_process:
            if config is not None:
                save_adapter(accelerator.unwrap_model(model), out / "adapter")
            _write_json(out / "metrics.json", metrics)
            log.info("%s; wall time %.1f s", ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in test_metrics.items()),
                     metrics["wall_time_seconds"])
        accelerator.wait_for_everyone()
    finally:  # a failed run (diverged, interrupted) must not leave its log file attached to the next run
        for handler in list(log.handlers):
            if isinstance(handler, logging.FileHandler):
                log.removeHandler(handler)
                handler.close()
    return metrics
