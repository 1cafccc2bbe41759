"""Fine-tuning: one function, `train(settings)`, behind `replora train`. Runs on one process or many
under `accelerate launch` / `torchrun` (Accelerate; gloo on CPU, NCCL on GPU; data-parallel, or FSDP
with an accelerate FSDP config: distributed.py) with the global batch kept equal: each global batch is
split across the processes, so the data order and the optimizer steps are the same whatever the number
of processes.

An output folder per run holds settings.json, metrics.json, log.txt, the final adapter (save_adapter
format) and checkpoints/epoch-N (written atomically each epoch; `latest` names the newest).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from safetensors.torch import load_file, save_file

from ..model import count_parameters, inject
from ..files import remove_stale_temporaries, write_text
from ..saving import WEIGHTS_NAME, load_adapter, write_adapter, write_folder
from . import generative
from .distributed import (adapter_tensors, is_sharded, load_adapter_tensors, load_optimizer_state, make_accelerator,
                          optimizer_state, without_repeats)
from .data import TaskData, capped, load_task, training_examples
from .images import open_image
from .pretrained import head_name, load_causal_lm, load_model
from .vision_models import load_image_classifier
from .settings import FULL, HEAD, TrainSettings
from .tasks import TASK_OF_KIND

log = logging.getLogger("replora.training")


class TrainingDiverged(RuntimeError):
    pass


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


def adamw(params, **options) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all the tensors: an adapter has many small ones, and its step on CPU
    takes about 0.4x the time of the default multi-tensor one) where torch has it for these tensors."""
    try:
        return torch.optim.AdamW(params, fused=True, **options)
    except RuntimeError:  # (a device or dtype without the fused kernel)
        return torch.optim.AdamW(params, **options)


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
        """(the batch's mean loss, how many units it counts: examples here, response tokens for sft). Labels
        of generative.IGNORE (-100) count in neither (rows repeated to even out a last batch: distributed.without_repeats)."""
        labels = batch["labels"]
        count = int((labels != generative.IGNORE).sum())
        loss = torch.nn.functional.cross_entropy(forward_logits(model, batch).float(), labels, reduction="sum")
        return loss / max(count, 1), count

    score, higher_is_better = "validation_accuracy", True  # what picks the best adapter

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

    score, higher_is_better = "validation_loss", False

    def validate(self, model, loader, accelerator) -> dict:
        return {"validation_loss": generative.mean_loss(model, loader, accelerator)}

    def test(self, model, loader, examples, accelerator) -> dict:
        from accelerate.utils import gather_object

        result = {"test_loss": generative.mean_loss(model, loader, accelerator)}
        # Under FSDP every forward is a collective: each process gets as many prompts (the last repeated) and
        # generation goes on in all of them until every one is done (synced_gpus).
        sharded = is_sharded(accelerator)
        with accelerator.split_between_processes(list(range(len(examples))), apply_padding=sharded) as mine:
            features = self.features[id(examples)]  # encoded once, in prepare()
            prompts = [generative.prompt_of(features[i]) for i in mine]
            answers = generative.generate(accelerator.unwrap_model(model), self.tokenizer, prompts,
                                          self.s.max_new_tokens, self.s.eval_batch_size, synced=sharded)
            scored = [(i, a, generative.is_correct(a, examples[i])) for i, a in zip(mine, answers)]
        scored = sorted(dict((i, (i, a, ok)) for i, a, ok in gather_object(scored)).values())  # (repeats once)
        result["test_exact_match"] = sum(ok for _, _, ok in scored) / max(len(scored), 1)
        for i, answer, ok in scored[:5]:  # a sample, for the log
            log.info("test answer %s: %r -> %r", "right" if ok else "wrong",
                     generative.first_words(generative.render(examples[i], self.tokenizer)[0]), answer.strip())
        model.train()
        return result


# --- checkpoints: safetensors + JSON only -------------------------------------------------------

def _save_checkpoint(folder: Path, model, contents: tuple[dict, dict], scheduler, state: dict) -> None:
    """contents: the adapter's and the optimizer's tensors, whole (adapter_tensors, optimizer_state: every
    process gathers them under FSDP; only the main process writes)."""
    adapter, opt_state = contents
    tensors, groups = {}, []
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
        write_adapter(model, tmp / "adapter", None, adapter)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "training_state.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps(payload, indent=2))

    write_folder(folder, write)


def _load_checkpoint(folder: Path, model, scheduler) -> tuple[dict, dict]:
    """Load a checkpoint's adapter (into the model before accelerator.prepare: FSDP shards what it finds),
    scheduler and random state; return the run's state and the optimizer's, which load_optimizer_state
    puts into the prepared optimizer (whose parameters FSDP replaces)."""
    load_adapter(model, folder / "adapter")
    tensors = load_file(folder / "training_state.safetensors")
    payload = json.loads((folder / "trainer_state.json").read_text())
    opt_state = {"state": {}, "param_groups": payload.pop("optimizer_param_groups")}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state["state"].setdefault(int(index), {})[name] = value
    scheduler.load_state_dict(payload.pop("scheduler"))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return payload, opt_state


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


# Settings a run folder's settings.json may lack (written before they existed), with the values that
# reproduce what such a run did: resumed, it goes on as it began.
LEGACY = {"min_steps": 0, "keep": "last", "eval_steps": None, "early_stopping_patience": None}


def _saved_settings(s: TrainSettings, out: Path) -> dict | None:
    settings_file = out / "settings.json"
    return json.loads(settings_file.read_text()) if s.resume and settings_file.is_file() else None


def _as_begun(s: TrainSettings, saved: dict | None) -> TrainSettings:
    """A resumed run keeps what it began with for the settings its settings.json does not name."""
    if saved is None:
        return s
    return dataclasses.replace(s, **{k: v for k, v in LEGACY.items() if k not in saved})


def _prepare_output(s: TrainSettings, out: Path, saved: dict | None) -> Path | None:
    """Check the output folder; return the checkpoint to resume from, if any."""
    if s.resume:
        if saved is None:
            return None  # nothing to resume: start fresh
        saved = dict(saved)
        mine = {k: v for k, v in s.to_dict().items() if k != "resume"}
        saved.pop("resume", None)
        # A setting missing from the saved file is newer than the run: it had no say in it.
        changed = sorted(k for k in saved.keys() | mine.keys() if k in saved and saved.get(k) != mine.get(k))
        if changed:
            raise ValueError(f"--resume with settings that differ from the run in {out}: {', '.join(changed)}; "
                             "resume with the same settings, or start a new run in another --output")
        remove_stale_temporaries(out / "checkpoints")  # half-written by a run that was killed
        latest = out / "checkpoints" / "latest"
        return out / "checkpoints" / latest.read_text().strip() if latest.is_file() else None
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} already holds a run; pass --resume to continue it, or choose "
                         "another --output (nothing there is overwritten)")
    return None


# --- the best adapter by validation -------------------------------------------------------------

BEST_PREFIX = "best-step-"


class BestKeeper:
    """Keeps the best adapter by validation so the run can end with it. An adapter run writes it, when
    found, to checkpoints/best-step-N (a new folder, whole or absent: save_adapter); the checkpoints'
    state names the current one, so a resumed run knows its best, and folders no checkpoint names are
    removed once a newer checkpoint is whole. Only the main process writes; every process loads it back.
    Full fine-tuning and --method head keep no checkpoints: each process holds a copy of the trained
    tensors in memory instead."""

    def __init__(self, checkpoints: Path, accelerator, on_disk: bool):
        self.checkpoints, self.accelerator, self.on_disk = checkpoints, accelerator, on_disk
        self.copy: dict | None = None

    def save(self, model, step: int) -> str | None:
        if not self.on_disk:
            self.copy = {**{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                         **{n: b.detach().clone() for n, b in model.named_buffers()}}
            return None
        name = f"{BEST_PREFIX}{step}"
        tensors = adapter_tensors(model)  # (every process: gathered whole under FSDP)
        if self.accelerator.is_main_process:
            if (self.checkpoints / name).exists():  # from a run killed before a checkpoint named it
                shutil.rmtree(self.checkpoints / name)
            write_adapter(model, self.checkpoints / name, None, tensors)
        return name

    def restore(self, model, best: dict) -> None:
        if not self.on_disk:
            model.load_state_dict(self.copy, strict=False)
            return
        self.accelerator.wait_for_everyone()  # the main process has written it
        load_adapter_tensors(model, load_file(self.checkpoints / best["folder"] / WEIGHTS_NAME))

    def prune(self, current: str | None) -> None:
        """Remove the best-step folders but the one the latest checkpoint names (main process only)."""
        for folder in self.checkpoints.glob(f"{BEST_PREFIX}*"):
            if folder.name != current:
                shutil.rmtree(folder, ignore_errors=True)


def _new_window() -> dict:
    """What the training steps since the last validation add up to (kept in checkpoints, so a resumed
    run reports the same train loss)."""
    return {"loss_sum": 0.0, "batches": 0, "examples": 0, "tokens": 0, "seconds": 0.0}


def run_notes(metrics: dict) -> list[str]:
    """Lines for the end of a run (log.txt and the command line): which adapter was kept, an early stop,
    and a validation score still improving at the end (more steps may help)."""
    history = metrics.get("history") or []
    if not history:
        return []
    score = next((k for k in ("validation_accuracy", "validation_loss") if k in history[-1]), None)
    if score is None:
        return []
    name, last = score.replace("_", " "), history[-1]
    notes = []
    if metrics.get("kept") == "best" and metrics.get("best_step") not in (None, metrics["steps"]):
        notes.append(f"kept the adapter of step {metrics['best_step']} of {metrics['steps']}, the best {name} "
                     f"({metrics[score]:.4f}; the last step's: {last[score]:.4f})")
    if metrics.get("stopped_early"):
        notes.append(f"stopped early at step {metrics['steps']} of {metrics['planned_steps']}: no better {name} in "
                     f"the last {metrics['early_stopping_patience']} validations")
    if metrics.get("still_improving"):
        trend = "falling" if score.endswith("loss") else "rising"
        notes.append(f"{name} was still {trend} at the end ({history[-2][score]:.4f} -> {last[score]:.4f} at the "
                     "last validation): more steps may help (--epochs, --max-steps or --min-steps)")
    return notes


def train(settings: TrainSettings, on_step: Callable[[nn.Module, int], None] | None = None) -> dict:
    """Run one fine-tuning job; returns the metrics also written to <output>/metrics.json.

    on_step(model, step): called on the main process after each optimizer step with the unwrapped model, to
    observe training (research/update_rank.py reads the adapters' updates); it must not change the model."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    s = settings
    s.validate()
    accelerator = make_accelerator(s.grad_accum, s.mixed_precision)
    if s.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size {s.batch_size} (the global batch) must divide evenly among "
                         f"{accelerator.num_processes} processes")
    task = load_task(s.dataset, s.text_column, s.label_column, s.choices_column, s.task)
    kind = TASK_OF_KIND[task.kind]
    s = dataclasses.replace(s, model=s.model_name(kind, task.images), task=kind)  # recorded as run, defaults resolved
    out = s.output_dir()
    saved = _saved_settings(s, out)
    s = _as_begun(s, saved)
    train_examples = training_examples(task.train, s.max_train_examples, s.fraction, s.seed)
    steps_per_epoch = math.ceil(math.ceil(len(train_examples) / s.batch_size) / s.grad_accum)
    if s.max_steps is None:  # the budget in passes, resolved and recorded: 2, or more for small data
        s = dataclasses.replace(s, epochs=s.planned_epochs(steps_per_epoch))
    resume_from = _prepare_output(s, out, saved)
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
    optimizer = adamw(params, lr=s.lr, weight_decay=s.weight_decay)
    total_steps = s.max_steps or steps_per_epoch * s.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(s.warmup_ratio * total_steps), total_steps)
    checkpoints = out / "checkpoints"
    keeper = BestKeeper(checkpoints, accelerator, on_disk=config is not None)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if saved is None:  # (a resumed run's settings are the saved ones: checked equal above)
            _write_json(out / "settings.json", s.to_dict())
        handler = logging.FileHandler(out / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        state, resumed_optimizer = {"epoch": 0, "step": 0, "history": [], "seconds": 0.0}, None
        if resume_from is not None and config is not None:
            state, resumed_optimizer = _load_checkpoint(resume_from, model, scheduler)
            log.info("resumed from %s (epoch %d, step %d)", resume_from, state["epoch"], state["step"])
        for key, value in (("window", _new_window()), ("best", None), ("stale", 0), ("last_validation", None),
                           ("stopped_early", False), ("train_tokens", 0)):
            state.setdefault(key, value)  # (a checkpoint of an older release lacks them)
        log.info("%s on %s (%s): %d train / %d validation / %d test examples; %s; trainable %d of %d parameters; "
                 "%d processes on %s%s; %d steps (%d a pass), validation %s", s.model, task.name, task.kind,
                 len(train_examples), len(validation), len(test), s.method, trainable, total,
                 accelerator.num_processes, accelerator.device, " (FSDP)" if is_sharded(accelerator) else "",
                 total_steps, steps_per_epoch,
                 f"every {s.eval_steps} steps" if s.eval_steps else "each pass")
        if cut := {k: v for k, v in objective.stats.items() if k.endswith("_cut")}:
            log.info("sequences longer than --max-length %d (prompts lose their start, responses their end): %s",
                     s.max_length, ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in cut.items()))

        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        params = [p for p in model.parameters() if p.requires_grad]  # (FSDP replaces them with its sharded ones)
        if resumed_optimizer is not None:
            load_optimizer_state(optimizer, resumed_optimizer)
        val_loader, test_loader = accelerator.prepare(objective.eval_loader(validation), objective.eval_loader(test))
        progress = tqdm(total=total_steps, initial=state["step"], disable=not accelerator.is_local_main_process,
                        desc=s.method, unit="step", dynamic_ncols=True)
        started = time.perf_counter() - state["seconds"]
        tick = time.perf_counter()  # training time is counted from here to the next validation

        def validate(epoch: int) -> None:
            """Validate, record it in the history, keep the adapter if it is the best so far, and count
            the validations without a better score (early stopping)."""
            nonlocal tick
            window = state["window"]
            window["seconds"] += time.perf_counter() - tick
            scores = objective.validate(model, val_loader, accelerator)  # (gathered: the same on every process)
            seconds = max(window["seconds"], 1e-9)
            state["history"].append({"epoch": epoch + 1, "step": state["step"],
                                     "train_loss": window["loss_sum"] / max(window["batches"], 1), **scores,
                                     "train_examples_per_second": window["examples"] / seconds,
                                     "train_tokens_per_second": window["tokens"] / seconds,
                                     "seconds": time.perf_counter() - started})
            state["window"], state["last_validation"] = _new_window(), state["step"]
            value, best = scores[objective.score], state["best"]
            better = best is None or (value > best["value"] if objective.higher_is_better else value < best["value"])
            if better:
                folder = keeper.save(accelerator.unwrap_model(model), state["step"]) if s.keep == "best" else None
                state["best"], state["stale"] = {"step": state["step"], "epoch": epoch + 1, "value": value,
                                                 "folder": folder}, 0
            else:
                state["stale"] += 1
            if s.early_stopping_patience and state["stale"] >= s.early_stopping_patience:
                state["stopped_early"] = True
            log.info("step %d (epoch %d): train loss %.4f, %s%s", state["step"], epoch + 1,
                     state["history"][-1]["train_loss"],
                     ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in scores.items()),
                     " (best so far)" if better else f" ({state['stale']} without a better one)")
            tick = time.perf_counter()

        model.train()
        for epoch in range(state["epoch"], epochs):
            if state["step"] >= total_steps or state["stopped_early"]:
                break
            loader = accelerator.prepare(objective.train_loader(train_examples, epoch))
            recent, seen, tokens, epoch_start = [], 0, 0, time.perf_counter()  # (for the progress bar)
            for batch in loader:
                if state["step"] >= total_steps or state["stopped_early"]:
                    break
                with accelerator.accumulate(model):
                    loss, units = objective.loss(model, without_repeats(batch, accelerator))
                    if accelerator.num_processes > 1:
                        # Each process's loss is a mean over its own examples (response tokens for sft), and the
                        # processes' gradients are averaged: weigh each by its share of the global batch's, as
                        # one process would (they differ in a last short batch, and in tokens for sft).
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
                window = state["window"]
                window["loss_sum"] += loss.item()
                window["batches"] += 1
                recent = (recent + [loss.item()])[-20:]
                examples = len(batch["labels"]) * accelerator.num_processes
                window["examples"] += examples
                seen += examples
                if "attention_mask" in batch:  # (images have no tokens)
                    count = int(batch["attention_mask"].sum()) * accelerator.num_processes
                    window["tokens"] += count
                    tokens += count
                    state["train_tokens"] += count
                if accelerator.sync_gradients:
                    state["step"] += 1
                    progress.update(1)
                    if on_step is not None and accelerator.is_main_process:
                        on_step(accelerator.unwrap_model(model), state["step"])
                    elapsed = time.perf_counter() - epoch_start
                    postfix = dict(loss=f"{sum(recent) / len(recent):.4f}", ex_per_s=f"{seen / elapsed:.1f}")
                    if tokens:
                        postfix["tok_per_s"] = f"{tokens / elapsed:.0f}"
                    progress.set_postfix(**postfix)
                    if s.eval_steps and state["step"] % s.eval_steps == 0:
                        validate(epoch)
            # The end of a pass (or of the run): validate unless done at this step already, then checkpoint.
            if state["last_validation"] != state["step"] and (s.eval_steps is None or state["step"] >= total_steps):
                validate(epoch)
            state["epoch"] = epoch + 1
            state["seconds"] = time.perf_counter() - started
            state["window"]["seconds"] += time.perf_counter() - tick
            contents = ((adapter_tensors(accelerator.unwrap_model(model)), optimizer_state(optimizer))
                        if config is not None else None)  # (every process: gathered whole under FSDP)
            if accelerator.is_main_process and config is not None:  # (full fine-tuning keeps no checkpoints)
                name = f"epoch-{epoch + 1}"
                if (checkpoints / name).exists():  # a stale copy from a run killed before `latest` named it
                    shutil.rmtree(checkpoints / name)
                _save_checkpoint(checkpoints / name, accelerator.unwrap_model(model), contents, scheduler, state)
                latest = checkpoints / "latest"
                previous = latest.read_text().strip() if latest.is_file() else None
                write_text(latest, name)  # the new checkpoint counts only once it is whole
                if previous and previous != name:
                    shutil.rmtree(checkpoints / previous, ignore_errors=True)
                keeper.prune(state["best"]["folder"] if state["best"] else None)
            accelerator.wait_for_everyone()
            tick = time.perf_counter()
        progress.close()
        best = state["best"]
        if s.keep == "best" and best is not None and best["step"] != state["step"]:
            keeper.restore(accelerator.unwrap_model(model), best)  # (every process: all of them test it)
        test_metrics = objective.test(model, test_loader, test, accelerator)
        history = state["history"]
        tested = next((h for h in history if best and s.keep == "best" and h["step"] == best["step"]),
                      history[-1] if history else {})
        metrics = {
            **test_metrics, **{k: tested.get(k) for k in tested if k.startswith("validation_")},
            "history": history, "trainable_parameters": trainable, "total_parameters": total,
            "wall_time_seconds": time.perf_counter() - started, "steps": state["step"],
            "planned_steps": total_steps, "epochs": s.epochs, "kept": s.keep, "adapter_step": tested.get("step"),
            "best_step": best["step"] if best else None, "best_epoch": best["epoch"] if best else None,
            "validations": len(history), "stopped_early": state["stopped_early"],
            "early_stopping_patience": s.early_stopping_patience,
            # The last validation is the best, and better than the one before: more steps may help.
            "still_improving": bool(best and len(history) >= 2 and best["step"] == history[-1]["step"]),
            "train_examples": len(train_examples), "validation_examples": len(validation), "test_examples": len(test),
            "num_processes": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
            "method": s.method, "model": s.model, "lr": s.lr,
            "output": str(out),
            "dataset": task.name, "task": kind, "seed": s.seed, "fraction": s.fraction,
            "train_tokens": state["train_tokens"],
            "train_tokens_per_second": state["train_tokens"] / max(state["seconds"], 1e-9),
            **{k: v for k, v in objective.stats.items() if k != "train"},
            "adapter_config": config.to_dict() if config else None,
        }
        final = adapter_tensors(accelerator.unwrap_model(model)) if config is not None else None  # (every process: gathered under FSDP)
        if accelerator.is_main_process:
            if config is not None:
                write_adapter(accelerator.unwrap_model(model), out / "adapter", None, final)
            _write_json(out / "metrics.json", metrics)
            log.info("%s; wall time %.1f s", ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in test_metrics.items()),
                     metrics["wall_time_seconds"])
            for note in run_notes(metrics):
                log.info("%s", note)
        accelerator.wait_for_everyone()
    finally:  # a failed run (diverged, interrupted) must not leave its log file attached to the next run
        for handler in list(log.handlers):
            if isinstance(handler, logging.FileHandler):
                log.removeHandler(handler)
                handler.close()
    return metrics
