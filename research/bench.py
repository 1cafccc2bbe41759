"""`python -m research bench`: replora's training step, decoding speed and memory against Hugging Face PEFT
and against the floor no adapter can beat, measured side by side in one process. The contenders are built
once from the same base weights and run on the same batch, seed and thread count; the grid is models x
batches (batch size x tokens) x ranks (`--quick`: one of each, few rounds).

Pairing. Each contender is timed right beside its reference (PEFT LoRA; PEFT DoRA for replora's DoRA)
and the floor, the three back to back, in an order that cycles through all six orders round by round
(and the order of the contenders rotates), so that drift cancels; every ratio is taken within one round
and summarized by its median and quartiles over the rounds. A control times the reference against
itself (PEFT LoRA vs PEFT LoRA, with the floor): its spread is the noise of the machine, against which
the other ratios are read. bench.json keeps every round's raw times.

The floor: the frozen model's own training step with no adapter, forward plus the backward that every
adapter needs from the frozen network: the gradient of the loss with respect to the output of every
layer that would be adapted. An adapter on a target y = W x needs dL/dy (its factors' gradients are
built from dL/dy and the saved x); the gradient reaching a lower block passes through the blocks above
it, so autograd computes the frozen network's input gradients down to the lowest adapted layers'
outputs, and no further: not W^T dL/dy of the lowest targets, since their inputs (the embeddings) need no
gradient; nor any weight gradient, nor an optimizer step. That is what the floor does: a forward hook
adds a zero scalar that requires grad to each target output that would otherwise need no gradient (only
the lowest block's targets; higher ones already carry the gradient of the ones below), and
loss.backward() then runs exactly that backward, plus one add and one sum over those few outputs (well
under 0.1% of a step). Making the embeddings' output require grad instead would also compute the
lowest block's input gradients (three matmuls for BERT's query, key and value and its layer norms), work
no adapter does, and so raise the floor and shrink every overhead by the same amount (flattering
whoever is ahead). Setting requires_grad_ on those outputs in the hook would be exact too, but breaks
the graph under torch.compile; the zero scalar is the same floor, eager and compiled.

Reported for a training step (forward, loss, backward, AdamW over the adapter):
- time ratio: contender / reference, per round;
- above the floor: contender / floor - 1, per round;
- overhead ratio: (contender - floor) / (reference - floor), per round: the part of the step an adapter
  adds, relative to what its reference adds. A round where the reference did not come out above the floor
  (noise larger than the overhead) has no ratio: it is counted as unresolved and left out.
- memory ratio: peak of a training step, contender / reference. On CUDA, torch.cuda.max_memory_allocated
  over a training step; on CPU (where torch keeps no allocator statistics) the bytes a training step
  holds beyond the frozen model: the tensors saved for backward (each storage counted once), plus the
  trainable parameters, their gradients and AdamW's two moments.

Inference, eval mode, no gradients, paired the same way with the bare base model as the floor (it is
what a merged model costs once unloaded; `*-merged` rows keep replora's merged wrappers):
- causal LMs: greedy decoding with the KV cache (transformers' generate, the same prompts, every prompt
  decoded to exactly the same number of new tokens) of every replora method unmerged vs PEFT's unmerged
  LoRA (DoRA), reported as tokens/s (new tokens; the time includes the prompts' prefill) and ratios;
- other models: the latency of one forward pass on the training batch.

`--compile`: the training steps again with each model wrapped in torch.compile (default backend inductor),
against compiled PEFT and the compiled floor, paired the same way. Per contender: the seconds of its first
(compiling) step, the graph breaks and graphs compiled over its warm-up steps (the first plus
`warmup`), and the frames compiled again in two more steps (recompiles: 0 is a steady model). Every
contender's compiled code lives in one process, where dynamo's recompile limit counts per code object
(transformers' modules are shared by all contenders): the limit is raised to 8 per compiled model so that
no contender starves another, and after the warm-up the stance is `eager_on_recompile`, so a frame
whose guards keep failing runs eagerly, as it would for a user once the limit of 8 is hit, instead of
timing compilations. A contender that fails to compile is reported with its error, not timed.

Generative training (causal LMs; `--sft-rounds`, 0 skips): `replora train --task sft` against TRL's
SFTTrainer with PEFT LoRA on the commonsense mix, real tokens per second and padding, as
`research/sft_throughput.py` says (separate runs, so it runs last, after the contenders are freed).

`--profile N`: after the timings, N training steps of every contender under torch.profiler (self time of
each op: CPU, or the GPU's on CUDA), kept per step in bench.json; the report lists, for each contender,
its ops per step and the ops where it spends the most time beyond its reference: the profile that says
where a gap comes from (the profiler's own cost is per op, so op counts matter as much as the times).
"""
from __future__ import annotations

import copy
import gc
import importlib.util
import itertools
import json
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import replora
from replora.methods import METHODS
from replora.saving import write_folder

from .reports import quartiles

REPLORA_METHODS = tuple(METHODS)  # every registered method is benchmarked
FLOOR = "floor"  # the frozen model's step: a row of every training table
BASE = "base"  # the bare base model (= merged and unloaded): the floor of inference


@dataclass
class BenchSettings:
    models: tuple[str, ...] = ("minilm", "smollm2")
    batches: tuple[tuple[int, int], ...] = ((4, 32), (16, 64))  # (examples, tokens each)
    ranks: tuple[int, ...] = (8, 64)
    rounds: int = 15
    steps: int = 1  # timed calls per contender per timing, at least; more when a call is short (min_time)
    min_time: float = 0.2
    warmup: int = 2
    seed: int = 0
    threads: int = field(default_factory=torch.get_num_threads)
    generation: bool = True  # greedy decoding on the models that are causal LMs
    gen_prompts: int = 4  # prompts decoded together
    gen_prompt_len: int = 32  # tokens per prompt
    gen_tokens: int = 32  # new tokens per prompt
    compile: bool = False
    compile_backend: str = "inductor"
    profile: int = 0  # training steps profiled per contender (0: none)
    sft_rounds: int = 3  # rounds of generative training against TRL on each causal LM (0: none; sft_throughput.py)
    sft_steps: int = 20
    sft_items: int = 2000

    def validate(self) -> "BenchSettings":
        if not self.models:
            raise ValueError("give at least one model")
        if not self.batches or any(b < 1 or t < 2 for b, t in self.batches):
            raise ValueError("batches are examples x tokens, e.g. 4x32, with at least 1 example of 2 tokens")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError("ranks must be positive integers")
        if self.sft_rounds < 0 or self.sft_steps < 1 or self.sft_items < 1:
            raise ValueError("sft-rounds must be 0 (none) or more, sft-steps and sft-items at least 1")
        if self.sft_rounds and importlib.util.find_spec("trl") is None:
            raise ValueError("the comparison with TRL's SFTTrainer needs trl: pip install trl (or give --sft-rounds 0)")
        if self.profile < 0:
            raise ValueError(f"profile is a number of steps (0 for none), got {self.profile}")
        for name in ("rounds", "steps", "threads", "gen_prompts", "gen_prompt_len", "gen_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.min_time < 0 or self.warmup < 0:
            raise ValueError("min-time and warmup cannot be negative")
        return self


# The quick look: one model, one batch, one rank, few rounds (decoding included: SmolLM2 is a causal LM).
QUICK = {"models": ("smollm2",), "batches": ((4, 32),), "ranks": (8,), "rounds": 5, "sft_rounds": 0}

# Each contender's reference; a reference paired with itself is the control (the noise floor). replora's
# DoRA is timed against PEFT's DoRA, every other replora method against PEFT's LoRA.
TRAIN_REFERENCES = {"peft-lora": "peft-lora", "peft-dora": "peft-lora",
                    **{f"replora-{m}": "peft-dora" if m == "dora" else "peft-lora" for m in REPLORA_METHODS}}
# Inference (decoding for causal LMs, one forward pass otherwise): every contender unmerged, and replora
# merged (its wrappers kept) against the bare base model.
INFER_REFERENCES = {**TRAIN_REFERENCES, "replora-lora-merged": BASE, "replora-replora-merged": BASE}
CONTROL = "peft-lora"


def _targets(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return ["query", "value"] if "query" in names else ["q_proj", "v_proj"]


def _is_causal_lm(name: str) -> bool:
    from transformers import AutoConfig

    from replora.training.pretrained import GENERATIVE_ARCHITECTURES, resolve_model

    architectures = getattr(AutoConfig.from_pretrained(resolve_model(name)), "architectures", None) or []
    return any(a.endswith(GENERATIVE_ARCHITECTURES) for a in architectures)


def _contenders(base, r: int, device, task_type: str | None = None) -> dict:
    """name -> model: PEFT LoRA / DoRA and every replora method on the same targets, adapters non-zero."""
    from peft import LoraConfig, get_peft_model

    targets = _targets(base)
    built = {}
    for use_dora in (False, True):
        torch.manual_seed(0)
        built["peft-dora" if use_dora else "peft-lora"] = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=targets, use_dora=use_dora, init_lora_weights=True,
            task_type=task_type))
    for method in REPLORA_METHODS:
        torch.manual_seed(0)
        built[f"replora-{method}"] = replora.inject(
            copy.deepcopy(base), replora.AdapterConfig(method=method, r=r, lora_alpha=2 * r, target_modules=targets))
    for model in built.values():
        model.to(device)
        with torch.no_grad():  # B = 0 at init would let a lazy implementation skip work: start from non-zero
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1e-3 * torch.randn_like(p))
    return built


class _Floor(torch.nn.Module):
    """The frozen model with a forward hook on each target: an output that needs no gradient (the lowest
    targets') gets a zero scalar that requires grad added, so that backward reaches it (module docstring)."""

    def __init__(self, model, device):
        super().__init__()
        self.model = model
        self.zero = torch.zeros((), device=device, requires_grad=True)
        targets = tuple(_targets(model))
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets:
                module.register_forward_hook(self._reach)

    def _reach(self, module, inputs, output):
        return output if output.requires_grad else output + self.zero

    def forward(self, **batch):
        return self.model(**batch)


class _Step:
    """One contender's training step: forward, loss, backward, AdamW over its trainable parameters (none
    for the floor); `compile` wraps the model in torch.compile."""

    def __init__(self, model, batch, compile_backend: str | None = None):
        self.batch = batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None
        self.leaves = [model.zero] if isinstance(model, _Floor) else []
        self.forward = torch.compile(model, backend=compile_backend) if compile_backend else model

    def loss(self):
        return self.forward(**self.batch).logits.float().pow(2).mean()

    def finish(self, loss) -> None:
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for leaf in self.leaves:
            leaf.grad = None

    def __call__(self) -> None:
        self.finish(self.loss())

    def state_bytes(self) -> int:  # parameters, gradients, two AdamW moments
        return 4 * sum(p.numel() * p.element_size() for p in self.params)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeat: int) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeat


def _step_memory(step: _Step, device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - before
    seen, saved = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            saved[0] += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step.loss()
    step.finish(loss)
    return saved[0] + step.state_bytes()


def _group(name: str, references: dict, floor: str | None) -> list[str]:
    """Who is timed together for `name`: it, its reference and (unless the reference is it) the floor."""
    reference = references[name]
    return [name, reference] + ([floor] if floor is not None and reference != floor else [])


def _paired_rounds(calls: dict, references: dict, floor: str | None, rounds: int, device, repeat: int) -> dict:
    """{contender: [[its time, its reference's time(, the floor's time)], ...]}, one row per round, the group
    timed back to back; the group's order cycles through its permutations round by round and the order of
    the contenders rotates."""
    timings = {name: [] for name in references}
    names = list(references)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            group = _group(name, references, floor)
            orders = list(itertools.permutations(range(len(group))))
            times = [0.0] * len(group)
            for i in orders[round_ % len(orders)]:
                times[i] = _timed(calls[group[i]], device, repeat)
            timings[name].append(times)
    return timings


def _summary(rows: list[list[float]], reference: str, floor: str | None) -> dict:
    """One contender's rounds: its median time, the time ratio to its reference and, with a floor, the
    time above the floor and the overhead ratio (module docstring); the raw rows kept."""
    out = {"reference": reference, "median_s": statistics.median(r[0] for r in rows),
           "ratio": quartiles([r[0] / r[1] for r in rows]), "times_s": rows}
    if len(rows[0]) == 3:
        out["floor"] = floor
        out["above_floor"] = quartiles([r[0] / r[2] - 1 for r in rows])
        resolved = [(r[0] - r[2]) / (r[1] - r[2]) for r in rows if r[1] > r[2]]
        out["overhead_ratio"] = {**quartiles(resolved), "unresolved": len(rows) - len(resolved)}
    return out


def _floor_row(timings: dict, floor: str) -> dict:
    """The floor's own row: its median time over every round it was timed in, and its time as a fraction of
    the control's (the reference's) in the control's rounds."""
    times = [r[2] for rows in timings.values() for r in rows if len(r) == 3]
    return {"median_s": statistics.median(times), "reference": CONTROL,
            "ratio": quartiles([r[2] / r[1] for r in timings[CONTROL]])}


def _calibrate(fn, device, s: BenchSettings) -> int:
    return max(s.steps, math.ceil(s.min_time / max(_timed(fn, device, 1), 1e-9)))


def _train_block(base, batch, r: int, s: BenchSettings, device, log) -> dict:
    models = _contenders(base, r, device)
    for model in models.values():
        model.train()
    floor_model = _Floor(copy.deepcopy(base).to(device).train(), device)
    steps = {FLOOR: _Step(floor_model, batch), **{n: _Step(m, batch) for n, m in models.items()}}
    for name in steps:
        for _ in range(s.warmup):
            steps[name]()
    repeat = _calibrate(steps[CONTROL], device, s)
    timings = _paired_rounds(steps, TRAIN_REFERENCES, FLOOR, s.rounds, device, repeat)
    memory = {n: _step_memory(step, device) for n, step in steps.items()}
    train = {name: {**_summary(timings[name], reference, FLOOR), "peak_bytes": memory[name],
                    "memory_ratio": memory[name] / memory[reference]}
             for name, reference in TRAIN_REFERENCES.items()}
    floor = {**_floor_row(timings, FLOOR), "peak_bytes": memory[FLOOR], "memory_ratio": memory[FLOOR] / memory[CONTROL]}
    block = {"train": train, "floor": floor, "repeat": repeat}
    if s.profile:
        block["profile"] = {name: _profile(step, s.profile, device) for name, step in steps.items()}
    if s.compile:
        block["compiled"] = _compiled_block({FLOOR: floor_model, **models}, batch, s, device, log)
    return block, models


def _profile(step: _Step, steps: int, device) -> dict:
    """Per training step: the ops torch.profiler records, their count and self time (ms), by op name."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    ops = {e.key: {"calls": e.count / steps,
                   "self_ms": (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1000 / steps}
           for e in prof.key_averages()}
    return {"steps": steps, "clock": "gpu" if cuda else "cpu", "calls": sum(v["calls"] for v in ops.values()),
            "self_ms": sum(v["self_ms"] for v in ops.values()), "ops": ops}


class _LimitHits(logging.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        if "recompile_limit" in record.getMessage() or "cache_size_limit" in record.getMessage():
            self.count += 1


def _compiled_block(models: dict, batch, s: BenchSettings, device, log) -> dict:
    """The training steps of every model compiled, paired as the eager ones (module docstring)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    limit = dynamo.config.recompile_limit
    dynamo.config.recompile_limit = limit * len(models)
    hits = _LimitHits()
    logging.getLogger("torch._dynamo").addHandler(hits)
    steps, report = {}, {}
    try:
        for name, model in models.items():
            step = _Step(model, batch, compile_backend=s.compile_backend)
            counters.clear()
            hits.count = 0
            start = time.perf_counter()
            try:
                step()
                compile_s = time.perf_counter() - start
                for _ in range(s.warmup):
                    step()
                breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
                frames = counters["frames"]["total"]
                for _ in range(2):
                    step()
            except Exception as e:  # noqa: BLE001 - reported, not hidden: the contender is left out
                report[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
                log(f"  compile {name}: failed: {report[name]['error']}")
                continue
            report[name] = {"compile_s": compile_s, "graph_breaks": breaks, "graphs": graphs,
                            "recompiles": counters["frames"]["total"] - frames, "limit_hits": hits.count}
            steps[name] = step
        timed = {n: ref for n, ref in TRAIN_REFERENCES.items() if n in steps and ref in steps}
        if CONTROL not in steps:
            return {"error": f"{CONTROL} did not compile: nothing to pair against", "contenders": report}
        floor = FLOOR if FLOOR in steps else None
        torch.compiler.set_stance("eager_on_recompile")
        repeat = _calibrate(steps[CONTROL], device, s)
        timings = _paired_rounds(steps, timed, floor, s.rounds, device, repeat)
    finally:
        torch.compiler.set_stance("default")
        dynamo.config.recompile_limit = limit
        logging.getLogger("torch._dynamo").removeHandler(hits)
    rows = {name: {**_summary(timings[name], ref, floor), **report[name]} for name, ref in timed.items()}
    out = {"backend": s.compile_backend, "train": rows, "contenders": report, "repeat": repeat}
    if floor:
        out["floor"] = {**_floor_row(timings, floor), **report[FLOOR]}
    dynamo.reset()
    return out


def _infer_block(base, contenders: dict, run, s: BenchSettings, device) -> dict:
    """Inference of every contender (eval, no gradients) against its reference and the bare base model;
    `run(model)` is one timed call (one forward pass, or one greedy decoding)."""
    models = {BASE: base.to(device).eval(), **{n: m.eval() for n, m in contenders.items()}}
    for method in ("lora", "replora"):
        merged = copy.deepcopy(contenders[f"replora-{method}"])
        replora.merge(merged)
        models[f"replora-{method}-merged"] = merged
    calls = {name: (lambda m=model: run(m)) for name, model in models.items()}
    with torch.no_grad():
        for name in calls:
            for _ in range(s.warmup):
                calls[name]()
        repeat = _calibrate(calls[BASE], device, s)
        timings = _paired_rounds(calls, INFER_REFERENCES, BASE, s.rounds, device, repeat)
    rows = {name: _summary(timings[name], reference, BASE) for name, reference in INFER_REFERENCES.items()}
    base_times = [r[-1] for rows_ in timings.values() for r in rows_]
    rows[BASE] = {"median_s": statistics.median(base_times), "reference": CONTROL,
                  "ratio": quartiles([r[2] / r[1] for r in timings[CONTROL]])}
    return {"rows": rows, "repeat": repeat}


def _generation_block(name: str, r: int, s: BenchSettings, device, log) -> dict:
    from transformers import GenerationConfig

    from replora.training.pretrained import load_causal_lm

    torch.manual_seed(s.seed)
    base, tokenizer = load_causal_lm(name)
    base.requires_grad_(False)
    g = torch.Generator().manual_seed(s.seed + 1)
    prompts = {"input_ids": torch.randint(5, base.config.vocab_size, (s.gen_prompts, s.gen_prompt_len),
                                          generator=g).to(device),
               "attention_mask": torch.ones(s.gen_prompts, s.gen_prompt_len, dtype=torch.long, device=device)}
    config = GenerationConfig(max_new_tokens=s.gen_tokens, min_new_tokens=s.gen_tokens, do_sample=False,
                              num_beams=1, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    expected = (s.gen_prompts, s.gen_prompt_len + s.gen_tokens)

    def decode(model):
        out = model.generate(**prompts, generation_config=config)
        if tuple(out.shape) != expected:  # every contender must decode exactly the same number of tokens
            raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {expected}")
        return out

    contenders = _contenders(base, r, device, task_type="CAUSAL_LM")
    block = _infer_block(base, contenders, decode, s, device)
    new_tokens = s.gen_prompts * s.gen_tokens
    for row in block["rows"].values():
        row["tokens_per_s"] = new_tokens / row["median_s"]
    block.update(prompts=s.gen_prompts, prompt_len=s.gen_prompt_len, new_tokens=s.gen_tokens)
    log(f"{name} r={r} decoding: " + ", ".join(f"{n} {v['tokens_per_s']:.0f} tok/s" for n, v in block["rows"].items()))
    return block


def bench_model(model_name: str, s: BenchSettings, device, log=print) -> dict:
    from replora.training import load_model

    causal = _is_causal_lm(model_name)
    torch.manual_seed(s.seed)
    base, _ = load_model(model_name, num_labels=2)
    base.requires_grad_(False)
    vocab = base.config.vocab_size
    result = {"model": model_name, "parameters": sum(p.numel() for p in base.parameters()), "causal_lm": causal,
              "configs": [], "generation": []}
    for batch_size, seq_len in s.batches:
        g = torch.Generator().manual_seed(s.seed)
        batch = {"input_ids": torch.randint(5, vocab, (batch_size, seq_len), generator=g).to(device),
                 "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device)}
        if causal:  # a training step needs no KV cache (building one copies each layer's keys and values)
            batch["use_cache"] = False
        for r in s.ranks:
            block, models = _train_block(base, batch, r, s, device, log)
            if not causal:  # a classifier's inference: one forward pass (causal LMs: decoding, below)
                block["inference"] = _infer_block(base, models, lambda m: m(**batch), s, device)
            del models
            gc.collect()
            result["configs"].append({"batch": [batch_size, seq_len], "r": r, **block})
            train = block["train"]
            log(f"{model_name} {batch_size}x{seq_len} r={r}: floor {1000 * block['floor']['median_s']:.1f} ms; "
                + ", ".join(f"{n} {1000 * v['median_s']:.1f} ms (overhead ratio {_fmt(v['overhead_ratio']['median'])})"
                            for n, v in train.items()))
    del base
    gc.collect()
    if causal and s.generation:
        for r in s.ranks:
            result["generation"].append({"r": r, **_generation_block(model_name, r, s, device, log)})
            gc.collect()
    if causal and s.sft_rounds:
        from .sft_throughput import SFTComparison, measure

        result["sft"] = measure(SFTComparison(model=model_name, items=s.sft_items, steps=s.sft_steps,
                                              rounds=s.sft_rounds, seed=s.seed), log)
    return result


def run_bench(s: BenchSettings, root: Path, log=print) -> str:
    s.validate()
    torch.set_num_threads(s.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import peft

    results = {"settings": {k: v for k, v in s.__dict__.items()}, "device": str(device),
               "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "peft": peft.__version__, "models": []}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    for name in s.models:
        results["models"].append(bench_model(name, s, device, log))
    report = _report(results)

    def publish(folder: Path) -> None:  # each file replaced whole (replora.saving.write_folder)
        (folder / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
        (folder / "bench.md").write_text(report)
        _plot(results, folder / "bench.png")
    write_folder(root, publish)
    return report


# ---- the report ---------------------------------------------------------------------------------------

def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _q(stats: dict | None, digits: int = 3) -> str:
    if stats and stats.get("median") is None and stats.get("unresolved"):
        return f"unresolved in all {stats['unresolved']} rounds"
    if not stats or stats.get("median") is None:
        return "n/a"
    text = f"{_fmt(stats['median'], digits)} [{_fmt(stats['q1'], digits)}, {_fmt(stats['q3'], digits)}]"
    if stats.get("unresolved"):
        text += f" ({stats['unresolved']} of {stats['rounds'] + stats['unresolved']} rounds unresolved)"
    return text


def _band(stats: dict | None) -> str:
    if not stats or stats.get("median") is None:
        return "n/a"
    return f"[{stats['q1']:.2f}, {stats['q3']:.2f}]"


def _pct(stats: dict | None) -> str:
    return "n/a" if not stats or stats.get("median") is None else f"{100 * stats['median']:+.1f}%"


CONTENDERS = [f"replora-{m}" for m in REPLORA_METHODS]  # the summary's columns


def _summary_tables(results: dict) -> list[str]:
    lines = []
    head = "| model | batch | r | PEFT LoRA above the floor | " + " | ".join(
        f"{c.removeprefix('replora-')}{' vs PEFT DoRA' if c == 'replora-dora' else ''}" for c in CONTENDERS)
    sep = "|---|---|---|---|" + "---|" * len(CONTENDERS)
    for key, title in (("overhead_ratio", "Overhead above the floor, as a ratio to the reference's overhead"),
                       ("ratio", "Training-step time ratio to the reference")):
        lines += [f"**{title}** (median over the rounds; control = PEFT LoRA against itself, its quartiles):", "",
                  head + " | control |", sep + "---|"]
        for m in results["models"]:
            for c in m["configs"]:
                train = c["train"]
                lines.append(f"| {m['model']} | {c['batch'][0]} x {c['batch'][1]} | {c['r']} | "
                             f"{_pct(train[CONTROL]['above_floor'])} | "
                             + " | ".join(_fmt(train[n][key]["median"]) for n in CONTENDERS)
                             + f" | {_band(train[CONTROL][key])} |")
        lines.append("")
    compiled = [(m, c) for m in results["models"] for c in m["configs"] if "compiled" in c]
    if compiled:
        lines += ["**Compiled training-step time ratio to the compiled reference** (median; graph breaks, "
                  "recompiles after the warm-up):", "", head + " | control |", sep + "---|"]
        for m, c in compiled:
            rows = c["compiled"].get("train", {})
            cells = []
            for n in CONTENDERS:
                v = rows.get(n)
                cells.append("failed" if v is None else
                             f"{_fmt(v['ratio']['median'])} ({v['graph_breaks']} breaks, {v['recompiles']} recompiles)")
            control = rows.get(CONTROL, {})
            lines.append(f"| {m['model']} | {c['batch'][0]} x {c['batch'][1]} | {c['r']} | "
                         f"{_pct(control.get('above_floor'))} | " + " | ".join(cells)
                         + f" | {_band(control.get('ratio'))} |")
        lines.append("")
    generation = [(m, gen) for m in results["models"] for gen in m["generation"]]
    if generation:
        lines += ["**Greedy decoding, unmerged: time ratio to PEFT's unmerged adapter** (median; merged = the "
                  "bare model's tokens/s):", "",
                  "| model | r | merged tok/s | PEFT LoRA tok/s | " + " | ".join(c.removeprefix("replora-")
                                                                        for c in CONTENDERS) + " | control |",
                  "|---|---|---|---|" + "---|" * len(CONTENDERS) + "---|"]
        for m, gen in generation:
            rows = gen["rows"]
            lines.append(f"| {m['model']} | {gen['r']} | {rows[BASE]['tokens_per_s']:.1f} | "
                         f"{rows[CONTROL]['tokens_per_s']:.1f} | "
                         + " | ".join(_fmt(rows[n]["ratio"]["median"]) for n in CONTENDERS)
                         + f" | {_band(rows[CONTROL]['ratio'])} |")
        lines.append("")
    sft = [(m, m["sft"]) for m in results["models"] if "sft" in m]
    if sft:
        lines += ["**Generative training, real tokens/s: replora / TRL SFTTrainer + PEFT LoRA** (median "
                  "[quartiles] over the rounds; TRL at the faster of its packing strategies in each round):", "",
                  "| model | replora tokens/s | TRL tokens/s | replora / TRL |", "|---|---|---|---|"]
        for m, block in sft:
            speed = lambda who: statistics.median(g[who]["tokens_per_second"] for g in block["rounds"])  # noqa: E731
            best = block["ratios"]["trl-best"]
            lines.append(f"| {m['model']} | {speed('replora'):.0f} | {speed('trl-best'):.0f} | {best['median']:.2f} "
                         f"[{best['q1']:.2f}, {best['q3']:.2f}] |")
        lines.append("")
    return lines


def _train_table(train: dict, floor: dict, title: str, extra: bool = False) -> list[str]:
    cols = "| " + title + " | reference | step (ms) | above the floor | overhead ratio | time ratio |"
    cols += " compile (s) | graph breaks | graphs | recompiles |" if extra else " memory ratio |"
    lines = [cols, "|---" * (cols.count("|") - 1) + "|"]
    if floor:
        tail = (f" {_fmt(floor.get('compile_s'), 1)} | {floor.get('graph_breaks')} | {floor.get('graphs')} | "
                f"{floor.get('recompiles')} |" if extra else f" {floor['memory_ratio']:.3f} |")
        lines.append(f"| floor (frozen model, no adapter) | {floor['reference']} | {1000 * floor['median_s']:.1f} | "
                     f"— | — | {_q(floor['ratio'])} |" + tail)
    for n, v in train.items():
        tail = (f" {_fmt(v.get('compile_s'), 1)} | {v.get('graph_breaks')} | {v.get('graphs')} | "
                f"{v.get('recompiles')}{' (limit hit)' if v.get('limit_hits') else ''} |" if extra
                else f" {v['memory_ratio']:.3f} |")
        label = f"{n} (control)" if n == v["reference"] else n
        lines.append(f"| {label} | {v['reference']} | {1000 * v['median_s']:.1f} | {_pct(v.get('above_floor'))} | "
                     f"{_q(v.get('overhead_ratio'))} | {_q(v['ratio'])} |" + tail)
    return lines


def _profile_lines(profile: dict, top: int = 6) -> list[str]:
    """Each contender's profiled step against its reference's: ops per step, self time, and the ops it
    spends the most time on beyond the reference (or alone)."""
    lines = [f"Profiled ({next(iter(profile.values()))['steps']} steps each, self {next(iter(profile.values()))['clock']} "
             "time per step): ops and time against the reference's, then the largest excesses by op "
             "(+ms, calls per step against the reference's):", ""]
    for name, reference in TRAIN_REFERENCES.items():
        if name == reference or name not in profile:
            continue
        mine, theirs = profile[name], profile[reference]
        excess = sorted(((v["self_ms"] - theirs["ops"].get(op, {}).get("self_ms", 0.0), op, v["calls"],
                          theirs["ops"].get(op, {}).get("calls", 0.0)) for op, v in mine["ops"].items()), reverse=True)
        lines.append(f"- {name}: {mine['calls']:.0f} ops, {mine['self_ms']:.1f} ms against {reference}'s "
                     f"{theirs['calls']:.0f} ops, {theirs['self_ms']:.1f} ms; "
                     + ", ".join(f"`{op}` {extra:+.2f} ms ({c:.0f} vs {rc:.0f})"
                                 for extra, op, c, rc in excess[:top] if extra > 0))
    return lines + [""]


def _infer_table(block: dict, title: str, unit: str) -> list[str]:
    lines = [f"| {title} | reference | {unit} | above the bare model | overhead ratio | time ratio |",
             "|---|---|---|---|---|---|"]
    for n, v in block["rows"].items():
        speed = f"{v['tokens_per_s']:.1f}" if unit == "tokens/s" else f"{1000 * v['median_s']:.1f}"
        label = {BASE: "base (bare model = merged, unloaded)"}.get(n, f"{n} (control)" if n == v["reference"] else n)
        lines.append(f"| {label} | {v['reference']} | {speed} | {_pct(v.get('above_floor'))} | "
                     f"{_q(v.get('overhead_ratio'))} | {_q(v['ratio'])} |")
    return lines


def _report(results: dict) -> str:
    s = results["settings"]
    where = results.get("gpu") or results["cpu"]
    lines = [f"# replora vs PEFT: {results['device']} ({where}), {s['threads']} threads, torch {results['torch']}, "
             f"peft {results['peft']}, {s['rounds']} rounds (each timing >= {s['min_time']} s)", "",
             "Each contender is timed back to back with its reference (PEFT LoRA; PEFT DoRA for replora's dora) "
             "and the floor (the frozen model's step with no adapter: forward and the backward to the adapted "
             "layers' outputs), every round; the ratios are taken within a round, median [quartiles] over the "
             "rounds. *Overhead ratio* = (contender - floor) / (reference - floor): below 1, the contender adds "
             "less to the frozen model's step than its reference does. *Time ratio* = contender / reference. The "
             "reference's own row times it against itself (the control): its spread is the noise of the "
             "machine. Training step = forward, backward and AdamW; memory as bench.py's docstring says; "
             "raw per-round times in bench.json.", ""]
    lines += _summary_tables(results)
    for m in results["models"]:
        for c in m["configs"]:
            lines += [f"## {m['model']} ({m['parameters'] / 1e6:.1f}M parameters), batch {c['batch'][0]} x "
                      f"{c['batch'][1]} tokens, r = {c['r']}", ""]
            lines += _train_table(c["train"], c["floor"], "training step") + [""]
            if "profile" in c:
                lines += _profile_lines(c["profile"])
            if "compiled" in c:
                comp = c["compiled"]
                if "error" in comp:
                    lines += [f"Compiled ({s['compile_backend']}): {comp['error']}", ""]
                else:
                    lines += _train_table(comp["train"], comp.get("floor"),
                                          f"compiled step ({comp['backend']})", extra=True) + [""]
                failed = {n: v["error"] for n, v in comp["contenders"].items() if "error" in v}
                lines += [f"- {n} did not compile: {e}" for n, e in failed.items()] + ([""] if failed else [])
            if "inference" in c:
                lines += _infer_table(c["inference"], "inference (one forward pass)", "latency (ms)") + [""]
        if "sft" in m:
            from .sft_throughput import report_lines

            lines += [f"## {m['model']}: generative training against TRL SFTTrainer + PEFT LoRA", "",
                      *report_lines(m["sft"])]
        for gen in m["generation"]:
            lines += [f"## {m['model']}: greedy decoding, r = {gen['r']}, {gen['prompts']} prompts x "
                      f"{gen['prompt_len']} tokens, {gen['new_tokens']} new tokens each, KV cache", ""]
            lines += _infer_table(gen, "decoding", "tokens/s") + [""]
    return "\n".join(lines)


# ---- the plot ----------------------------------------------------------------------------------------

def _short(model: str) -> str:
    return Path(model).name or model  # a model folder by its name


def _plot(results: dict, path: Path) -> None:
    """Forest plots of the ratios: one row per contender and configuration, its median and quartiles; the
    control's quartiles shaded behind each configuration's rows; 1 = as fast as the reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = []  # (title, [(group label, control stats by key, [(row label, stats by key)])], keys)
    train_keys = [("overhead_ratio", "overhead above the floor / reference's"), ("ratio", "step time / reference's")]
    groups, compiled = [], []
    for m in results["models"]:
        for c in m["configs"]:
            label = f"{_short(m['model'])} {c['batch'][0]}x{c['batch'][1]} r{c['r']}"
            groups.append((label, c["train"][CONTROL], [(n, c["train"][n]) for n in CONTENDERS]))
            comp = c.get("compiled", {}).get("train")
            if comp and CONTROL in comp:
                compiled.append((label, comp[CONTROL], [(n, comp[n]) for n in CONTENDERS if n in comp]))
    sections.append(("training step", groups, train_keys))
    if compiled:
        sections.append((f"compiled training step ({results['settings']['compile_backend']})", compiled, train_keys))
    infer = []
    for m in results["models"]:
        blocks = [(f"{_short(m['model'])} {c['batch'][0]}x{c['batch'][1]} r{c['r']} forward", c["inference"])
                  for c in m["configs"] if "inference" in c]
        blocks += [(f"{_short(m['model'])} r{gen['r']} decoding", gen) for gen in m["generation"]]
        for label, block in blocks:
            rows = block["rows"]
            infer.append((label, rows[CONTROL], [(n, rows[n]) for n in CONTENDERS]
                          + [(n, rows[n]) for n in rows if n.endswith("-merged")]))
    if infer:
        sections.append(("inference, unmerged vs PEFT unmerged (merged vs bare model)", infer,
                         [("overhead_ratio", "overhead above the bare model / reference's"),
                          ("ratio", "time / reference's")]))
    heights = [sum(len(rows) + 1 for _, _, rows in groups) for _, groups, _ in sections]
    fig, axes = plt.subplots(len(sections), 2, figsize=(12, 1.2 + 0.22 * sum(heights) + 0.6 * len(sections)),
                             gridspec_kw={"height_ratios": [h + 2 for h in heights]}, squeeze=False)
    colors = {n: f"C{i}" for i, n in enumerate(CONTENDERS + ["replora-lora-merged", "replora-replora-merged"])}
    for (title, groups, keys), row_axes in zip(sections, axes):
        for ax, (key, xlabel) in zip(row_axes, keys):
            medians = [v[key]["median"] for _, _, rows in groups for _, v in rows
                       if v.get(key) and v[key].get("median") is not None]
            # The axis spans the medians (and 0.5-1.5), at most -1 to 3: noisier points are drawn at its edge.
            lo, hi = max(min([0.5] + medians), -1.0) - 0.1, min(max([1.5] + medians), 3.0) + 0.1
            y, ticks, labels = 0, [], []
            for group_label, control, rows in groups:
                top = y
                for name, stats in rows:
                    v = stats.get(key)
                    if v and v.get("median") is not None:
                        med, q1, q3 = (min(max(x, lo), hi) for x in (v["median"], v["q1"], v["q3"]))
                        color = colors.get(name, "k")
                        ax.errorbar([med], [y], xerr=[[med - q1], [q3 - med]], fmt="o", color=color, capsize=2,
                                    markersize=4)
                        if med != v["median"]:  # off the axis: its value written beside the edge
                            ax.annotate(f"{v['median']:.2f}", (med, y), xytext=(-4 if med == hi else 4, 3),
                                        textcoords="offset points", fontsize=6, color=color,
                                        ha="right" if med == hi else "left")
                    ticks.append(y)
                    labels.append(f"{group_label}: {name.removeprefix('replora-')}")
                    y += 1
                band = control.get(key)
                if band and band.get("median") is not None:
                    ax.fill_betweenx([top - 0.45, y - 0.55], max(band["q1"], lo), min(band["q3"], hi), color="0.8",
                                     zorder=0)
                y += 1
            ax.axvline(1.0, color="k", linewidth=0.8)
            ax.set_xlim(lo, hi)
            ax.set_yticks(ticks)
            ax.set_yticklabels(labels if ax is row_axes[0] else [""] * len(labels), fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(xlabel + " (< 1: ahead)", fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle("replora vs PEFT: median and quartiles over the rounds; grey = the control's quartiles "
                 "(PEFT against itself)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
