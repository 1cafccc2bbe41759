"""What training on several processes needs beyond Accelerate's prepare(): the Accelerator itself (with
FSDP turned on for CPU runs too), and the adapter's and optimizer's tensors whole, for files, however the
processes hold them.

Under FSDP (Accelerate's `fsdp_version: 2`, PyTorch's fully_shard) every parameter is a DTensor of which
each process holds one shard, and so is its optimizer state. A file must hold whole tensors, the same
ones a 1-process run writes, so that checkpoints and adapters do not depend on how the run was sharded:
saving gathers each adapter tensor (a collective: every process calls it, in the same order; only the
main process writes), and loading into a sharded model keeps each process's shard of the whole tensor.
The adapter is small, so this never gathers the frozen base model.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..saving import adapter_state_dict

FSDP_VERSION_ERROR = ("replora trains under FSDP version 2 (PyTorch's fully_shard), which Accelerate "
                      "recommends; this run asks for version {version}: set `fsdp_version: 2` in the `fsdp_config` "
                      "of your accelerate config (or FSDP_VERSION=2)")


def make_accelerator(grad_accum: int, mixed_precision: str):
    """The run's Accelerator: the devices it finds, data-parallel over the processes, or FSDP under an
    `accelerate launch` FSDP config (version 2)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DataLoaderConfiguration, DistributedType, FullyShardedDataParallelPlugin

    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # (set by accelerate launch)
    version = os.environ.get("FSDP_VERSION", "1")  # (Accelerate's default)
    if fsdp and version != "2":  # refused before Accelerate builds its plugin, which fails on CPUs for version 1
        raise ValueError(FSDP_VERSION_ERROR.format(version=version))
    # On a machine with no accelerator Accelerate must be told so, or a torchrun / accelerate-launch run
    # on CPUs would not form its gloo process group.
    has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    # Accelerate keeps its settings (mixed precision, ...) in a process-wide singleton; a second train() in
    # one process (experiments, notebooks) may ask for others. The process group itself is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision,
                              cpu=not has_accelerator, dataloader_config=DataLoaderConfiguration(split_batches=True))
    state = accelerator.state
    if fsdp and state.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate shards models only on accelerators and silently runs an FSDP config on CPUs as plain
        # data parallelism; fully_shard itself runs on CPUs (gloo), so turn it on as Accelerate would.
        plugin = FullyShardedDataParallelPlugin()  # (read from the launcher's FSDP_* settings)
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        # (as Accelerate does for accelerators: both shared states, or the next AcceleratorState() undoes it)
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    return accelerator


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every process must call it), else t itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `param` is: this process's shard if param is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    return value.to(param.device, param.dtype)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter's tensors, whole, keyed as save_adapter writes them (every process calls this)."""
    return {key: whole(p.detach()) for key, p in adapter_state_dict(model).items()}


@torch.no_grad()
def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put whole tensors saved by adapter_tensors (the same run's) back into the model, sharded or not."""
    params = adapter_state_dict(model)
    for key, value in tensors.items():
        params[key].copy_(like_param(value, params[key]))


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with whole tensors (every process calls this)."""
    state = optimizer.state_dict()
    return {"state": {i: {k: whole(v) if torch.is_tensor(v) else v for k, v in values.items()}
                      for i, values in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load an optimizer_state() into a prepared optimizer: tensors shaped as their parameter are laid out
    as it is (sharded under FSDP); its step counts stay whole."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {"state": {i: {k: like_param(v, params[i]) if torch.is_tensor(v) and v.shape == params[i].shape else v
                           for k, v in values.items()} for i, values in state["state"].items()},
             "param_groups": state["param_groups"]}
    optimizer.load_state_dict(state)


def without_repeats(batch: dict, accelerator) -> dict:
    """The batch with the labels of the rows Accelerate repeated set to -100, the ignored label, so that they
    count in no loss. With the global batch split across processes, a last batch shorter than the batch
    size is completed with the data's first rows so that every process gets as many; this process's share
    of it begins at process_index * its row count, and only the first `remainder` rows overall are real.
    (One process, or any full batch, has no repeats: the batch is returned as it is.)"""
    state = accelerator.gradient_state
    if accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
        return batch
    rows = len(batch["labels"])
    real = max(0, min(rows, state.remainder - accelerator.process_index * rows))
    if real == rows:
        return batch
    labels = batch["labels"].clone()
    labels[real:] = -100
    return {**batch, "labels": labels}
