"""How each method produces the factors (A, B) of one target layer.

Every adapter here answers `factors() -> (A, B)` with A: (r, in) and B: (out, r); the adapted layer
(layer.py) does the rest the same way for all methods. DoRA is LoRA's factors plus `lora_magnitude`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig


class TargetAdapter(nn.Module):
    """One adapter on one target layer."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_magnitude: nn.Parameter | None = None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A, shaped (out, in) like nn.Linear's weight."""
        A, B = self.factors()
        return (B * self.scaling) @ A

    def init_magnitude(self, base_weight: torch.Tensor) -> None:
        """DoRA: m starts at the row norms of W0, so the adapted layer starts as the base layer."""
        norm = base_weight.detach().float().norm(dim=1)
        self.lora_magnitude = nn.Parameter(norm.to(base_weight.dtype))


def lora_A_init_(A: torch.Tensor) -> torch.Tensor:
    # LoRA's init (and PEFT's): kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    return nn.init.kaiming_uniform_(A, a=math.sqrt(5))


class LoRAFactors(TargetAdapter):
    """LoRA (and DoRA's directions): A and B are the parameters; B = 0 at init."""

    def __init__(self, config: AdapterConfig, in_features: int, out_features: int, **like):
        super().__init__(config)
        self.lora_A = nn.Parameter(lora_A_init_(torch.empty(config.r, in_features, **like)))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, **like))

    def factors(self):
        return self.lora_A, self.lora_B


class MoSLoRAFactors(LoRAFactors):
    """MoSLoRA: dW = s B M A with a learnable r x r mixer M; materialized as A' = M A."""

    def __init__(self, config: AdapterConfig, in_features: int, out_features: int, **like):
        super().__init__(config, in_features, out_features, **like)
        mixer = torch.empty(config.r, config.r, **like)
        if config.moslora_mixer_init == "orthogonal":
            # orthogonal_ needs QR, which has no half-precision kernel on every device.
            mixer.copy_(nn.init.orthogonal_(torch.empty(config.r, config.r, device=mixer.device)))
        else:
            lora_A_init_(mixer)
        self.lora_mixer = nn.Parameter(mixer)

    def factors(self):
        return self.lora_mixer @ self.lora_A, self.lora_B


ACTIVATIONS = {"tanh": torch.tanh, "gelu": F.gelu, "relu": F.relu, "identity": lambda z: z}


class Generator(nn.Module):
    """g_theta: an MLP applied to each seed row, with one output head per target role.

    The heads are one fused weight (`head`, rows role after role as listed in `head_sizes`): one
    matmul and two parameter tensors per generator however many targets it serves, which is what
    keeps RepLoRA's step within a few percent of LoRA's.
    """

    def __init__(self, seed_width: int, hidden: int, activation: str, head_sizes: dict[str, int], **like):
        super().__init__()
        self.activation = activation
        self.head_sizes = dict(head_sizes)
        self.hidden = nn.Linear(seed_width, hidden, **like)
        # Each role's rows are drawn as nn.Linear(hidden, size) draws them, role after role.
        parts = [nn.Linear(hidden, size, **like) for size in self.head_sizes.values()]
        self.head = nn.utils.skip_init(nn.Linear, hidden, sum(self.head_sizes.values()), **like)
        with torch.no_grad():
            self.head.weight.copy_(torch.cat([p.weight for p in parts]))
            self.head.bias.copy_(torch.cat([p.bias for p in parts]))

    def features(self, seed: torch.Tensor) -> torch.Tensor:
        """sigma(hidden(row)) for each seed row; a diagonal seed (a vector) is read as diag(seed),
        without building it: row i is sigma(seed_i W[:, i] + b)."""
        if seed.dim() == 1:
            return ACTIVATIONS[self.activation](torch.addcmul(self.hidden.bias, seed.unsqueeze(1), self.hidden.weight.T))
        return ACTIVATIONS[self.activation](self.hidden(seed))

    def outputs(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each role's (rows, size) output of its head, as views of one matmul."""
        return dict(zip(self.head_sizes, self.head(features).split(list(self.head_sizes.values()), dim=1)))


class RepLoRAGenerators(nn.Module):
    """The pair (g_thetaA, g_thetaB) of one sharing unit (a block, a target, or all blocks of one shape)."""

    def __init__(self, config: AdapterConfig, seed_widths: tuple[int, int], in_sizes: dict[str, int],
                 out_sizes: dict[str, int], **like):
        super().__init__()
        h, act = config.hidden_size, config.replora_activation
        self.lora_A_generator = Generator(seed_widths[0], h, act, in_sizes, **like)
        self.lora_B_generator = Generator(seed_widths[1], h, act, out_sizes, **like)
        # B heads start at zero (weights and bias): dW = 0 at init, as LoRA's B = 0.
        nn.init.zeros_(self.lora_B_generator.head.weight)
        nn.init.zeros_(self.lora_B_generator.head.bias)

    @torch.no_grad()
    def calibrate_A_heads(self, A_seed: torch.Tensor) -> None:
        """Project choice: scale each A head so that the generated A_t has LoRA's init scale,
        std 1 / sqrt(3 in_t) (the std of U(-1/sqrt(in), 1/sqrt(in)))."""
        generator = self.lora_A_generator
        z = generator.features(A_seed).float()
        nn.init.zeros_(generator.head.bias)
        for weight in generator.head.weight.split(list(generator.head_sizes.values())):  # views: one per role
            std = (z @ weight.float().T).pow(2).mean().sqrt().item()  # the RMS: defined for a single entry too
            if std > 0:
                weight.mul_(1.0 / math.sqrt(3 * weight.shape[0]) / std)


class RepLoRAGroup(nn.Module):
    """The seeds of one group (the targets of one block) and the factors generated from them.

    Diagonal seed: A = diag(a), B = diag(b) with a = b = 1 at init; the generators see their rows.
    Full seed: free (r, width) matrices through the same row-wise MLP, initialized as LoRA's A.
    The first target of the group that runs generates the factors of all its targets; the others
    reuse them. A target asking again (the block runs again, or is recomputed by gradient
    checkpointing), changed parameters or another grad mode start a new generation, so generators
    run once per group per forward, in the same order in a checkpoint's recompute as in its forward.
    Under no_grad (inference) the factors are kept until a parameter changes, so an unmerged RepLoRA
    model serves at LoRA's cost. Changes are seen through version counters, which in-place edits of
    `param.data` bypass: edit parameters under torch.no_grad() instead (as torch.optim does).
    """

    def __init__(self, config: AdapterConfig, generators: RepLoRAGenerators, seed_widths: tuple[int, int], **like):
        super().__init__()
        r = config.r
        if config.replora_seed == "diagonal":
            self.lora_A_seed = nn.Parameter(torch.ones(r, **like))
            self.lora_B_seed = nn.Parameter(torch.ones(r, **like))
        else:
            self.lora_A_seed = nn.Parameter(lora_A_init_(torch.empty(r, seed_widths[0], **like)))
            self.lora_B_seed = nn.Parameter(lora_A_init_(torch.empty(r, seed_widths[1], **like)))
        # A reference, not a submodule: generators may be shared by several groups ("model" sharing)
        # and are registered once, in the bank.
        object.__setattr__(self, "generators", generators)
        self.__dict__.update(self._empty_cache())

    @staticmethod
    def _empty_cache() -> dict:
        """The generated factors by role, the roles served since, and the state they were made in."""
        return {"_cache": {}, "_served": set(), "_cache_key": None}

    def __getstate__(self):  # copies and pickles never carry generated tensors (or their graphs)
        return {**self.__dict__, **self._empty_cache()}

    def generate(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        gA, gB = self.generators.lora_A_generator, self.generators.lora_B_generator
        # Row i of A_t is head_t(z_i); column j of B_t is head_t(z_j).
        A, B = gA.outputs(gA.features(self.lora_A_seed)), gB.outputs(gB.features(self.lora_B_seed))
        return {role: (A[role], B[role].T) for role in A}

    def _state_key(self) -> tuple:
        params = (self.lora_A_seed, self.lora_B_seed, *self.generators.parameters())
        return (torch.is_grad_enabled(), *((p._version, p.data_ptr()) for p in params))

    def factors(self, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._state_key()
        # Without grad the generated factors hold no graph, so they stay valid for as long as no
        # parameter changes (version counters, storage); with grad each forward needs its own graph.
        stale = key != self._cache_key or role not in self._cache
        if stale or (role in self._served and key[0]):
            self._cache = self.generate()
            self._served, self._cache_key = set(), key
        self._served.add(role)
        return self._cache[role]


class GeneratedFactors(TargetAdapter):
    """RepLoRA on one target: its factors come from its group's shared generators."""

    def __init__(self, config: AdapterConfig, group: RepLoRAGroup, role: str):
        super().__init__(config)
        object.__setattr__(self, "group", group)  # registered in the bank, not here
        self.role = role

    def factors(self):
        return self.group.factors(self.role)

    def extra_repr(self) -> str:
        return f"role={self.role!r}"
