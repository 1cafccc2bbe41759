"""Fine-tuning: one function, `train(settings)`, behind `replora train`. Runs on one process or many
under `accelerate launch` / `torchrun` (Accelerate; gloo on CPU, NCCL on GPU; data-parallel, or FSDP
with an accelerate FSDP config: distributed.py) with the global batch kept equal: each global batch is
split across the processes, so the data order and the optimizer steps are the same whatever the number
of processes.

What a run trains for is its objective (objectives.py); its folder (settings.json, checkpoints, the best
adapter, the state a resume needs) is run_folder.py's; this module is the loop. An output folder per run
holds settings.json, metrics.json, log.txt, the final adapter (save_adapter format) and
checkpoints/epoch-N (written atomically each epoch; `latest` names the newest).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..model import count_parameters, inject
from ..saving import write_adapter
from .data import capped, load_task, training_examples
from .distributed import (adapter_tensors, is_sharded, load_optimizer_state, make_accelerator, optimizer_state,
                          without_repeats)
from .objectives import Objective, evaluate, objective_for
from .run_folder import (BestKeeper, RunState, as_begun, load_checkpoint, new_window, prepare_output,
                         saved_settings, write_epoch_checkpoint, write_json)
from .settings import FULL, HEAD, TrainSettings
from .tasks import TASK_OF_KIND

__all__ = ["train", "TrainingDiverged", "evaluate", "run_notes", "freeze_batch_norm_statistics"]
log = logging.getLogger("replora.training")


class TrainingDiverged(RuntimeError):
    pass


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
    saved = saved_settings(s, out)
    s = as_begun(s, saved)
    train_examples = training_examples(task.train, s.max_train_examples, s.fraction, s.seed)
    steps_per_epoch = math.ceil(math.ceil(len(train_examples) / s.batch_size) / s.grad_accum)
    if s.max_steps is None:  # the budget in passes, resolved and recorded: 2, or more for small data
        s = dataclasses.replace(s, epochs=s.planned_epochs(steps_per_epoch))
    resume_from = prepare_output(s, out, saved)
    validation, test = capped(task.validation, s.max_eval_examples), capped(task.test, s.max_eval_examples)

    set_seed(s.seed)
    objective = objective_for(s, task)
    objective.prepare(train_examples, validation, test)
    model, config = objective.model, _make_trainable(objective, s)
    trainable, total = count_parameters(model)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=s.lr, weight_decay=s.weight_decay)
    total_steps = s.max_steps or steps_per_epoch * s.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(s.warmup_ratio * total_steps), total_steps)
    keeper = BestKeeper(out / "checkpoints", accelerator, on_disk=config is not None)

    with _run_log(out, accelerator, None if saved else s.to_dict()):
        state, resumed_optimizer = RunState(), None
        if resume_from is not None and config is not None:
            state, resumed_optimizer = load_checkpoint(resume_from, model, scheduler)
            log.info("resumed from %s (epoch %d, step %d)", resume_from, state.epoch, state.step)
        resumed_at = state.step
        for note in task.notes:  # (what reading the data skipped: the console heard it then, log.txt now)
            log.warning("%s", note, extra={"file_only": True})
        _log_plan(s, task, objective, accelerator, (len(train_examples), len(validation), len(test)),
                  (trainable, total), total_steps, steps_per_epoch)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        params = [p for p in model.parameters() if p.requires_grad]  # (FSDP replaces them with its sharded ones)
        if resumed_optimizer is not None:
            load_optimizer_state(optimizer, resumed_optimizer)
        val_loader, test_loader = accelerator.prepare(objective.eval_loader(validation), objective.eval_loader(test))
        progress = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                        desc=s.method, unit="step", dynamic_ncols=True)
        clock = Clock(state.seconds)
        validate = Validation(s, objective, model, val_loader, accelerator, keeper, clock)

        model.train()
        for epoch in range(state.epoch, epochs):
            if state.step >= total_steps or state.stopped_early:
                break
            meter = Meter()
            for batch in accelerator.prepare(objective.train_loader(train_examples, epoch)):
                if state.step >= total_steps or state.stopped_early:
                    break
                with accelerator.accumulate(model):
                    loss = _optimizer_step(objective, model, batch, accelerator, optimizer, scheduler, params, s,
                                           f"step {state.step + 1} (epoch {epoch + 1})")
                meter.count(state, loss.item(), batch, accelerator.num_processes)
                if accelerator.sync_gradients:
                    state.step += 1
                    progress.update(1)
                    progress.set_postfix(**meter.postfix())
                    if on_step is not None and accelerator.is_main_process:
                        on_step(accelerator.unwrap_model(model), state.step)
                    if s.eval_steps and state.step % s.eval_steps == 0:
                        validate(state, epoch)
            # The end of a pass (or of the run): validate unless done at this step already, then checkpoint.
            if state.last_validation != state.step and (s.eval_steps is None or state.step >= total_steps):
                validate(state, epoch)
            state.epoch, state.seconds = epoch + 1, clock.elapsed()
            state.window["seconds"] += clock.lap()
            if config is not None:  # (full fine-tuning and --method head keep no checkpoints)
                contents = adapter_tensors(accelerator.unwrap_model(model)), optimizer_state(optimizer)  # (gathered)
                if accelerator.is_main_process:
                    write_epoch_checkpoint(epoch + 1, accelerator.unwrap_model(model), contents, scheduler, state,
                                           keeper)
            accelerator.wait_for_everyone()
            clock.lap()
        progress.close()

        if s.keep == "best" and state.best is not None and state.best["step"] != state.step:
            keeper.restore(accelerator.unwrap_model(model), state.best)  # (every process: all of them test it)
        test_metrics = objective.test(model, test_loader, test, accelerator)
        metrics = _metrics(s, task, objective, state, test_metrics, config, accelerator, clock, out,
                           counts=dict(train_examples=len(train_examples), validation_examples=len(validation),
                                       test_examples=len(test), trainable_parameters=trainable,
                                       total_parameters=total, planned_steps=total_steps,
                                       resumed_at_step=resumed_at, steps_this_run=state.step - resumed_at))
        final = adapter_tensors(accelerator.unwrap_model(model)) if config is not None else None  # (gathered)
        if accelerator.is_main_process:
            if config is not None:
                write_adapter(accelerator.unwrap_model(model), out / "adapter", None, final)
            write_json(out / "metrics.json", metrics)
            # (log.txt only: the command prints the results and the notes once, at the end)
            log.info("%s; wall time %.1f s", ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in test_metrics.items()),
                     metrics["wall_time_seconds"], extra={"file_only": True})
            for note in run_notes(metrics):
                log.info("%s", note, extra={"file_only": True})
        accelerator.wait_for_everyone()
    return metrics


def _make_trainable(objective: Objective, s: TrainSettings):
    """Freeze what the method leaves frozen and adapt the model; the adapter's config (None without one)."""
    model = objective.model
    if s.method == FULL:
        model.requires_grad_(True)
        return None
    if s.method == HEAD:
        if objective.head is None:
            raise ValueError(f"method 'head' trains the new classification head alone, but {s.model} has no "
                             "'classifier' or 'score' head (generative runs have none); choose an adapter method")
        model.requires_grad_(False)
        getattr(model, objective.head).requires_grad_(True)
        freeze_batch_norm_statistics(model)
        return None
    config = s.adapter_config(objective.head, objective.default_targets)
    inject(model, config)
    freeze_batch_norm_statistics(model)
    return config


def _optimizer_step(objective: Objective, model, batch, accelerator, optimizer, scheduler, params,
                    s: TrainSettings, where: str) -> torch.Tensor:
    """One batch forward and backward, and the optimizer's step when the accumulated batch is whole."""
    loss, units = objective.loss(model, without_repeats(batch, accelerator))
    if accelerator.num_processes > 1:
        # Each process's loss is a mean over its own examples (response tokens for sft), and the processes'
        # gradients are averaged: weigh each by its share of the global batch's, as one process would (they
        # differ in a last short batch, and in tokens for sft).
        everyone = accelerator.reduce(torch.tensor([float(units)], device=accelerator.device), "sum")
        loss = loss * units * accelerator.num_processes / max(everyone.item(), 1.0)
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"the loss became {loss.item()} at {where}; the last good checkpoint is kept. "
                               "Try a lower --lr or --max-grad-norm")
    accelerator.backward(loss)
    if accelerator.sync_gradients and s.max_grad_norm:
        accelerator.clip_grad_norm_(params, s.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss


class Clock:
    """Training time: elapsed() since the run began (a resumed run's earlier time included), lap() since the
    last lap (validation and checkpoints are not training time)."""

    def __init__(self, seconds_before: float):
        self.started = time.perf_counter() - seconds_before
        self.tick = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.tick = now - self.tick, now
        return seconds


class Meter:
    """Counts one pass's batches into the run's validation window, and the progress bar's figures."""

    def __init__(self):
        self.recent, self.seen, self.tokens, self.started = [], 0, 0, time.perf_counter()

    def count(self, state: RunState, loss: float, batch: dict, processes: int) -> None:
        window = state.window
        window["loss_sum"] += loss
        window["batches"] += 1
        self.recent = (self.recent + [loss])[-20:]
        examples = len(batch["labels"]) * processes
        window["examples"] += examples
        self.seen += examples
        if "attention_mask" in batch:  # (images have no tokens)
            tokens = int(batch["attention_mask"].sum()) * processes
            window["tokens"] += tokens
            self.tokens += tokens
            state.train_tokens += tokens

    def postfix(self) -> dict:
        elapsed = time.perf_counter() - self.started
        postfix = dict(loss=f"{sum(self.recent) / len(self.recent):.4f}", ex_per_s=f"{self.seen / elapsed:.1f}")
        if self.tokens:
            postfix["tok_per_s"] = f"{self.tokens / elapsed:.0f}"
        return postfix


class Validation:
    """Validate, record it in the history, keep the adapter if it is the best so far, and count the
    validations without a better score (early stopping)."""

    def __init__(self, s: TrainSettings, objective: Objective, model, loader, accelerator, keeper: BestKeeper,
                 clock: Clock):
        self.s, self.objective, self.model, self.loader = s, objective, model, loader
        self.accelerator, self.keeper, self.clock = accelerator, keeper, clock

    def __call__(self, state: RunState, epoch: int) -> None:
        objective, window = self.objective, state.window
        window["seconds"] += self.clock.lap()
        scores = objective.validate(self.model, self.loader, self.accelerator)  # (the same on every process)
        seconds = max(window["seconds"], 1e-9)
        state.history.append({"epoch": epoch + 1, "step": state.step,
                              "train_loss": window["loss_sum"] / max(window["batches"], 1), **scores,
                              "train_examples_per_second": window["examples"] / seconds,
                              "train_tokens_per_second": window["tokens"] / seconds,
                              "seconds": self.clock.elapsed()})
        state.window, state.last_validation = new_window(), state.step
        value, best = scores[objective.score], state.best
        better = best is None or (value > best["value"] if objective.higher_is_better else value < best["value"])
        if better:
            folder = (self.keeper.save(self.accelerator.unwrap_model(self.model), state.step)
                      if self.s.keep == "best" else None)
            state.best, state.stale = {"step": state.step, "epoch": epoch + 1, "value": value, "folder": folder}, 0
        else:
            state.stale += 1
        if self.s.early_stopping_patience and state.stale >= self.s.early_stopping_patience:
            state.stopped_early = True
        log.info("step %d (epoch %d): train loss %.4f, %s%s", state.step, epoch + 1, state.history[-1]["train_loss"],
                 ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in scores.items()),
                 " (best so far)" if better else f" ({state.stale} without a better one)")
        self.clock.lap()


@contextmanager
def _run_log(out: Path, accelerator, settings_to_write: dict | None):
    """The run folder made (settings.json written for a new run) and log.txt attached to the log for the run;
    a failed run (diverged, interrupted) must not leave its log file attached to the next run."""
    handler = None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if settings_to_write is not None:  # (a resumed run's settings are the saved ones: checked equal)
            write_json(out / "settings.json", settings_to_write)
        handler = logging.FileHandler(out / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _log_plan(s: TrainSettings, task, objective: Objective, accelerator, sizes: tuple[int, int, int],
              parameters: tuple[int, int], total_steps: int, steps_per_epoch: int) -> None:
    log.info("%s on %s (%s): %d train / %d validation / %d test examples; %s; trainable %d of %d parameters; "
             "%d processes on %s%s; %d steps (%d a pass), validation %s", s.model, task.name, task.kind, *sizes,
             s.method, *parameters, accelerator.num_processes, accelerator.device,
             " (FSDP)" if is_sharded(accelerator) else "", total_steps, steps_per_epoch,
             f"every {s.eval_steps} steps" if s.eval_steps else "each pass")
    if cut := {k: v for k, v in objective.stats.items() if k.endswith("_cut")}:
        log.info("sequences longer than --max-length %d (prompts lose their start, responses their end): %s",
                 s.max_length, ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in cut.items()))


def _metrics(s: TrainSettings, task, objective: Objective, state: RunState, test_metrics: dict, config,
             accelerator, clock: Clock, out: Path, counts: dict) -> dict:
    """metrics.json: the test scores, the validation scores of the adapter tested, the history and the run."""
    best, history = state.best, state.history
    tested = next((h for h in history if best and s.keep == "best" and h["step"] == best["step"]),
                  history[-1] if history else {})
    return {
        **test_metrics, **{k: tested.get(k) for k in tested if k.startswith("validation_")},
        "history": history, "wall_time_seconds": clock.elapsed(), "steps": state.step, "epochs": s.epochs,
        "kept": s.keep, "adapter_step": tested.get("step"),
        "best_step": best["step"] if best else None, "best_epoch": best["epoch"] if best else None,
        "validations": len(history), "stopped_early": state.stopped_early,
        "early_stopping_patience": s.early_stopping_patience,
        # The last validation is the best, and better than the one before: more steps may help.
        "still_improving": bool(best and len(history) >= 2 and best["step"] == history[-1]["step"]),
        **counts,
        "num_processes": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
        "method": s.method, "model": s.model, "lr": s.lr, "output": str(out),
        "dataset": task.name, "task": s.task, "seed": s.seed, "fraction": s.fraction,
        "train_tokens": state.train_tokens,
        "train_tokens_per_second": state.train_tokens / max(state.seconds, 1e-9),
        **objective.stats,
        "adapter_config": config.to_dict() if config else None,
    }


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
