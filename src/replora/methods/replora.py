"""RepLoRA (Truong et al., ICML 2025), as this project reads it (docs/methods.md; the authors published no code).

The targets of one block (found from the module path: `encoder.layer.3.…`, `model.layers.3.…`) form a
*group*. The group has seeds A = diag(a), B = diag(b); an MLP g_A maps each seed row to one head per
target, giving the rows of A_t; g_B does the same for the columns of B_t: dW_t = s B_t A_t.

Where the parameters live, so that wrapping a block (FSDP, activation checkpointing) keeps them with
it: a group (its seeds, and its generators unless shared) is held by its block, in the block's
`lora_shared[adapter name]`; by its first target's adapter when the group has no block (a lone target,
or no sharing) or the block is a container (nn.Sequential, nn.ModuleList: a new child would change
what it runs). Generators shared by several blocks ("model" sharing) are held by the blocks' nearest
common ancestor that is not a container (by the first group when there is none).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, Option, like, lora_A_init_
from .sharing import CONTAINERS, common_home, group_key, groups_of

ACTIVATIONS = {"tanh": torch.tanh, "gelu": F.gelu, "relu": F.relu, "identity": lambda z: z}


class Generator(nn.Module):
    """g_theta: an MLP applied to each seed row, with one output head per target role.

    The heads are one fused weight (`head`, rows role after role as listed in `head_sizes`): one
    matmul and one weight per generator however many targets it serves, which is what keeps RepLoRA's
    step within a few percent of LoRA's.

    Project choice (the paper is silent on init and biases; research/RESULTS.md, "RepLoRA's rank collapse",
    shows the measurement): by default neither layer has a bias and the hidden layer starts orthogonal,
    so the r seed rows' features start orthonormal (up to sigma's curvature). Then A_t = Z H_t^T and
    B_t = G_t Z_B^T start as LoRA's factors up to a rotation, and an Adam step on a head moves them as
    much as it moves LoRA's. A head bias (one vector added to every row of A_t, every column of B_t)
    made replora 0.2's update rank one, with Adam steps several times LoRA's; nn.Linear's uniform init
    of the hidden layer, features far from orthogonal, concentrates it too.
    """

    def __init__(self, seed_width: int, hidden: int, activation: str, head_sizes: dict[str, int], rows: int,
                 hidden_init: str = "orthogonal", hidden_bias: str = "none", head_bias: str = "none", **like):
        super().__init__()
        self.activation = activation
        self.head_sizes = dict(head_sizes)
        self.hidden = nn.Linear(seed_width, hidden, bias=hidden_bias == "shared", **like)
        if hidden_init != "uniform":  # "uniform" keeps nn.Linear's draw (replora 0.2), bias included
            init = nn.init.orthogonal_ if hidden_init == "orthogonal" else nn.init.eye_
            with torch.no_grad():  # orthogonal_ draws in float32 at least (it needs a QR decomposition)
                self.hidden.weight.copy_(init(torch.empty(self.hidden.weight.shape)))
            if self.hidden.bias is not None:
                nn.init.zeros_(self.hidden.bias)
        # Each role's rows are drawn as nn.Linear(hidden, size) draws them, role after role.
        parts = [nn.Linear(hidden, size, **like) for size in self.head_sizes.values()]
        total = sum(self.head_sizes.values())
        self.head = nn.utils.skip_init(nn.Linear, hidden, total, bias=head_bias == "shared", **like)
        with torch.no_grad():
            self.head.weight.copy_(torch.cat([p.weight for p in parts]))
            if self.head.bias is not None:
                self.head.bias.copy_(torch.cat([p.bias for p in parts]))
        # "per_row": each generated row (a row of A_t, a column of B_t) has a bias of its own, from zero.
        self.row_bias = nn.Parameter(torch.zeros(rows, total, **like)) if head_bias == "per_row" else None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Its parameters, read directly: parameters() walks the module tree (tens of µs), and the factor
        cache's key reads them at every target's forward. Read at each call, never kept: FSDP swaps them."""
        found = (self.hidden.weight, self.hidden.bias, self.head.weight, self.head.bias, self.row_bias)
        return tuple(t for t in found if t is not None)

    def features(self, seed: torch.Tensor) -> torch.Tensor:
        """sigma(hidden(row)) for each seed row; a diagonal seed (a vector) is read as diag(seed),
        without building it: row i is sigma(seed_i W[:, i] + b)."""
        if seed.dim() == 1:
            rows = seed.unsqueeze(1) * self.hidden.weight.T if self.hidden.bias is None else \
                torch.addcmul(self.hidden.bias, seed.unsqueeze(1), self.hidden.weight.T)
            return ACTIVATIONS[self.activation](rows)
        return ACTIVATIONS[self.activation](self.hidden(seed))

    def outputs(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each role's (rows, size) output of its head, as views of one matmul."""
        out = self.head(features)
        if self.row_bias is not None:
            out = out + self.row_bias
        return dict(zip(self.head_sizes, out.split(list(self.head_sizes.values()), dim=1)))

    def output(self, features: torch.Tensor, role: str) -> torch.Tensor:
        """One role's output alone: its rows of the fused head."""
        start = 0
        for name, size in self.head_sizes.items():
            if name == role:
                part = slice(start, start + size)
                bias = None if self.head.bias is None else self.head.bias[part]
                out = F.linear(features, self.head.weight[part], bias)
                return out if self.row_bias is None else out + self.row_bias[:, part]
            start += size
        raise KeyError(role)


class RepLoRAGenerators(nn.Module):
    """The pair (g_thetaA, g_thetaB) of one sharing unit (a block, a target, or all blocks of one shape)."""

    def __init__(self, config: AdapterConfig, seed_widths: tuple[int, int], in_sizes: dict[str, int],
                 out_sizes: dict[str, int], **like):
        super().__init__()
        h, act = config.replora_hidden_size or config.r, config.replora_activation
        design = {"rows": config.r, "hidden_init": config.replora_hidden_init,
                  "hidden_bias": config.replora_hidden_bias, "head_bias": config.replora_head_bias}
        self.lora_A_generator = Generator(seed_widths[0], h, act, in_sizes, **design, **like)
        self.lora_B_generator = Generator(seed_widths[1], h, act, out_sizes, **design, **like)
        # B heads start at zero (weights and bias): dW = 0 at init, as LoRA's B = 0.
        nn.init.zeros_(self.lora_B_generator.head.weight)
        if self.lora_B_generator.head.bias is not None:
            nn.init.zeros_(self.lora_B_generator.head.bias)

    @torch.no_grad()
    def calibrate_A_heads(self, A_seed: torch.Tensor) -> None:
        """Project choice: scale each A head so that the generated A_t has LoRA's init scale,
        std 1 / sqrt(3 in_t) (the std of U(-1/sqrt(in), 1/sqrt(in)))."""
        generator = self.lora_A_generator
        z = generator.features(A_seed).float()
        if generator.head.bias is not None:
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

    Under torch.compile none of this state is read: its key (version counters, data pointers) and its
    dicts would become guards that fail at every optimizer step (a recompile each time, until dynamo's
    limit) and data-pointer comparisons break the graph. Traced, every target generates its factors
    inside the graph. With grad, each generates its whole group as eager does, and the compiler's
    common-subexpression pass (AOT autograd's partitioner, for aot_eager and inductor) leaves one
    generation per group per graph; a checkpoint's recompute is traced too, so it is consistent by
    construction. Without grad (no partitioner, no such pass), each target computes its own head's
    rows only, so a group costs one generation per call, not one per target: a compiled unmerged model
    pays the generators on every call (merge it to serve at the base model's cost).
    """

    def __init__(self, config: AdapterConfig, generators: RepLoRAGenerators, seed_widths: tuple[int, int],
                 owns_generators: bool, **like):
        super().__init__()
        r = config.r
        if config.replora_seed == "diagonal":
            self.lora_A_seed = nn.Parameter(torch.ones(r, **like))
            self.lora_B_seed = nn.Parameter(torch.ones(r, **like))
        else:
            self.lora_A_seed = nn.Parameter(lora_A_init_(torch.empty(r, seed_widths[0], **like)))
            self.lora_B_seed = nn.Parameter(lora_A_init_(torch.empty(r, seed_widths[1], **like)))
        if owns_generators:
            self.generators = generators
        else:  # "model" sharing: a reference; the generators are registered once, where all their groups are
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
        gA, gB = self.generators.lora_A_generator, self.generators.lora_B_generator
        params = (self.lora_A_seed, self.lora_B_seed, *gA.tensors(), *gB.tensors())
        return (torch.is_grad_enabled(), *((p._version, p.data_ptr()) for p in params))

    def generate_role(self, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One role's factors alone (the group's features, that role's rows of each head)."""
        gA, gB = self.generators.lora_A_generator, self.generators.lora_B_generator
        return (gA.output(gA.features(self.lora_A_seed), role), gB.output(gB.features(self.lora_B_seed), role).T)

    def factors(self, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():  # no cache state in a graph: see the class docstring
            return self.generate()[role] if torch.is_grad_enabled() else self.generate_role(role)
        key = self._state_key()
        # Without grad the generated factors hold no graph, so they stay valid for as long as no
        # parameter changes (version counters, storage); with grad each forward needs its own graph.
        stale = key != self._cache_key or role not in self._cache
        if stale or (role in self._served and key[0]):
            self._cache = self.generate()
            self._served, self._cache_key = set(), key
        self._served.add(role)
        return self._cache[role]


class RepLoRA(Method):
    """RepLoRA on one target: its factors come from its group's generators."""

    name = "replora"
    summary = "s·B_t A_t, [A_Q, A_V] = g_A(A), [B_Q, B_V] = g_B(B)"
    options = {
        "replora_hidden_size": Option(None, "hidden width h of the generators (default: h = r)", type=int),
        "replora_activation": Option("tanh", "generator activation; identity = the paper's linear "
                                             "reparameterization", tuple(ACTIVATIONS)),
        "replora_seed": Option("diagonal", "seed matrices: diagonal (the paper's diag(a), diag(b)) or full",
                               ("diagonal", "full")),
        "replora_sharing": Option("block", "generator sharing: block (a block's targets share them), none (one "
                                           "pair per target) or model (blocks of equal shapes share them; seeds "
                                           "stay per block)", ("block", "none", "model")),
        # The generator's design (Generator's docstring says why the defaults; replora 0.2 used uniform /
        # shared / shared, which trains a rank-one update: files saved by it load with those values).
        "replora_hidden_init": Option("orthogonal", "init of the generators' hidden layer: orthogonal, identity, "
                                                    "or uniform (nn.Linear's, replora 0.2)",
                                      ("orthogonal", "identity", "uniform")),
        "replora_hidden_bias": Option("none", "bias of the hidden layer: none, or shared (one vector added to "
                                              "every seed row's features, replora 0.2)", ("none", "shared")),
        "replora_head_bias": Option("none", "bias of the output heads: none, shared (one vector added to every row "
                                            "of A_t and column of B_t, replora 0.2) or per_row (one per row)",
                                    ("none", "shared", "per_row")),
    }

    def __init__(self, config: AdapterConfig, group: RepLoRAGroup, role: str, owns_group: bool):
        super().__init__(config)
        if owns_group:
            self.group = group
        else:
            object.__setattr__(self, "group", group)  # held by its block (or its first target)
        self.role = role

    def factors(self):
        return self.group.factors(self.role)

    def extra_repr(self) -> str:
        return f"role={self.role!r}"

    @classmethod
    def build(cls, config, layers, model):
        adapters, shared = {}, {}
        generators_of: dict[tuple, RepLoRAGenerators] = {}  # "model" sharing: one pair per block shape
        sharers: dict[tuple, list[str]] = defaultdict(list)  # the blocks each shared pair serves
        first_group: dict[tuple, RepLoRAGroup] = {}
        for group_path, members in groups_of(layers, config.replora_sharing != "none").items():
            group_layers = {group_key(role): layers[path] for role, path in members.items()}
            if len(group_layers) < len(members):
                raise ValueError(f"module names under {group_path!r} collide once dots become underscores; "
                                 "use replora_sharing='none' or target these layers in separate adapters")
            in_sizes = {role: layer.in_features for role, layer in group_layers.items()}
            out_sizes = {role: layer.out_features for role, layer in group_layers.items()}
            new_like = like(next(iter(group_layers.values())))
            # Project choice: a full seed is as wide as the group's widest input (A) and output (B).
            widths = ((config.r, config.r) if config.replora_seed == "diagonal"
                      else (max(in_sizes.values()), max(out_sizes.values())))
            signature = (tuple(in_sizes.items()), tuple(out_sizes.items()))
            model_shared = config.replora_sharing == "model" and group_path not in layers  # a block, not a lone target
            generators = generators_of.get(signature) if model_shared else None
            calibrate = generators is None
            if generators is None:
                generators = RepLoRAGenerators(config, widths, in_sizes, out_sizes, **new_like)
            group = RepLoRAGroup(config, generators, widths, owns_generators=not model_shared, **new_like)
            if calibrate:
                generators.calibrate_A_heads(group.lora_A_seed)
            if model_shared:
                if signature not in generators_of:
                    generators_of[signature], first_group[signature] = generators, group
                sharers[signature].append(group_path)
            home = model.get_submodule(group_path) if group_path not in layers else None
            in_block = home is not None and not isinstance(home, CONTAINERS)
            if in_block:
                shared[group_path] = {"group": group}
            for i, (role, path) in enumerate(members.items()):
                adapters[path] = cls(config, group, group_key(role), owns_group=not in_block and i == 0)
        for signature, generators in generators_of.items():
            home = common_home(model, sharers[signature])
            if home is None:  # no plain module above all the blocks: the first group holds them
                first_group[signature].shared_generators = generators
            else:
                parts = shared.setdefault(home, {})
                parts[f"generators{sum(k.startswith('generators') for k in parts) or ''}"] = generators
        return adapters, shared

    @classmethod
    def parameter_count(cls, config, shapes):
        r, h = config.r, config.replora_hidden_size or config.r
        counted, n = set(), 0
        for group_path, members in groups_of(shapes, config.replora_sharing != "none").items():
            ins = [shapes[p][0] for p in members.values()]
            outs = [shapes[p][1] for p in members.values()]
            seed_a, seed_b = (r, r) if config.replora_seed == "diagonal" else (max(ins), max(outs))
            n += r * (seed_a + seed_b) if config.replora_seed == "full" else 2 * r
            signature = tuple((role, shapes[path]) for role, path in members.items())
            if config.replora_sharing == "model" and group_path not in shapes:
                if signature in counted:
                    continue
                counted.add(signature)
            # Each generator: hidden (seed width -> h) and one fused head (h -> the targets' sizes), and biases.
            hidden_bias = h if config.replora_hidden_bias == "shared" else 0
            head_bias = {"none": 0, "shared": 1, "per_row": r}[config.replora_head_bias]
            n += sum(w * h + hidden_bias + (h + head_bias) * sum(sizes) for w, sizes in ((seed_a, ins), (seed_b, outs)))
        return n
