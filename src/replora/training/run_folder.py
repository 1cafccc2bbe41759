"""A run's folder: settings.json checked on resume, checkpoints/epoch-N (safetensors + JSON only, written
whole or not at all; `latest` names the newest), the best adapter by validation (checkpoints/best-step-N),
and the run's state that a checkpoint carries (RunState)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import remove_stale_temporaries, write_text
from ..saving import WEIGHTS_NAME, load_adapter, write_adapter, write_folder
from .distributed import adapter_tensors, load_adapter_tensors
from .settings import TrainSettings


def new_window() -> dict:
    """What the training steps since the last validation add up to (kept in checkpoints, so a resumed
    run reports the same train loss)."""
    return {"loss_sum": 0.0, "batches": 0, "examples": 0, "tokens": 0, "seconds": 0.0}


@dataclasses.dataclass
class RunState:
    """Where a run is: what a checkpoint's trainer_state.json holds besides the optimizer and scheduler."""
    epoch: int = 0  # passes done
    step: int = 0  # optimizer steps done
    history: list = dataclasses.field(default_factory=list)  # one entry per validation
    seconds: float = 0.0  # training time so far, over every process that ran it
    window: dict = dataclasses.field(default_factory=new_window)
    best: dict | None = None  # {"step", "epoch", "value", "folder"} of the best validation
    stale: int = 0  # validations since the best
    last_validation: int | None = None  # the step of the last one
    stopped_early: bool = False
    train_tokens: int = 0

    @classmethod
    def from_dict(cls, saved: dict) -> "RunState":
        """From a checkpoint; one of an older release lacks the newer fields, which start as a new run's."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


def save_checkpoint(folder: Path, model, contents: tuple[dict, dict], scheduler, state: RunState) -> None:
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
    payload = {**dataclasses.asdict(state), "optimizer_param_groups": groups, "scheduler": scheduler.state_dict()}

    def write(tmp: Path) -> None:
        write_adapter(model, tmp / "adapter", None, adapter)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "training_state.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps(payload, indent=2))

    write_folder(folder, write)


def load_checkpoint(folder: Path, model, scheduler) -> tuple[RunState, dict]:
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
    return RunState.from_dict(payload), opt_state


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


# Settings a run folder's settings.json may lack (written before they existed), with the values that
# reproduce what such a run did: resumed, it goes on as it began.
LEGACY = {"min_steps": 0, "keep": "last", "eval_steps": None, "early_stopping_patience": None, "quantize": None}


def saved_settings(s: TrainSettings, out: Path) -> dict | None:
    settings_file = out / "settings.json"
    return json.loads(settings_file.read_text()) if s.resume and settings_file.is_file() else None


def as_begun(s: TrainSettings, saved: dict | None) -> TrainSettings:
    """A resumed run keeps what it began with for the settings its settings.json does not name."""
    if saved is None:
        return s
    return dataclasses.replace(s, **{k: v for k, v in LEGACY.items() if k not in saved})


def prepare_output(s: TrainSettings, out: Path, saved: dict | None) -> Path | None:
    """Check the output folder; return the checkpoint to resume from, if any."""
    if s.resume:
        if saved is None:
            return None  # nothing to resume: start fresh
        saved = dict(saved)
        mine = {k: v for k, v in s.to_dict().items() if k != "resume"}
        saved.pop("resume", None)
        # A setting missing from the saved file is newer than the run: it had no say in it.
        changed = [k for k in saved if k != "adapter" and saved[k] != mine.get(k)]
        options, my_options = saved.get("adapter") or {}, mine.get("adapter") or {}
        changed = sorted(changed + [k for k in options.keys() | my_options.keys() if options.get(k) != my_options.get(k)])
        if changed:
            raise ValueError(f"--resume with settings that differ from the run in {out}: {', '.join(changed)}; "
                             f"`--output {out} --resume` alone continues it with its own settings; or start a new run "
                             "in another --output")
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


def write_epoch_checkpoint(epoch: int, model, contents: tuple[dict, dict], scheduler, state: RunState,
                           keeper: BestKeeper) -> None:
    """checkpoints/epoch-N (beside the keeper's best-step folders), then `latest` names it (it counts only once
    whole), then the previous checkpoint and the best-step folders it no longer names go (main process only)."""
    checkpoints, name = keeper.checkpoints, f"epoch-{epoch}"
    if (checkpoints / name).exists():  # a stale copy from a run killed before `latest` named it
        shutil.rmtree(checkpoints / name)
    save_checkpoint(checkpoints / name, model, contents, scheduler, state)
    latest = checkpoints / "latest"
    previous = latest.read_text().strip() if latest.is_file() else None
    write_text(latest, name)
    if previous and previous != name:
        shutil.rmtree(checkpoints / previous, ignore_errors=True)
    keeper.prune(state.best["folder"] if state.best else None)
