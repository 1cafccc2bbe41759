"""`python -m research bench`: training-step time, peak memory and inference latency against Hugging Face PEFT,
measured side by side in one process: the contenders are built once from the same base weights and run
on the same batch, sequence length, seed and thread count. Each contender is timed right beside its
reference (PEFT LoRA; PEFT DoRA for replora's DoRA; the bare model or PEFT's unmerged adapter for
inference), in an order that alternates every round so that drift cancels; a ratio is taken within each
pair and summarized by its median and quartiles over the rounds. A control pairs the reference with
itself: its spread is the noise floor of the machine, against which the other ratios are read.

Peak memory: on CUDA, torch.cuda.max_memory_allocated over a training step; on CPU (where torch keeps
no allocator statistics) the bytes a training step holds beyond the frozen model: the tensors saved
for backward (each storage counted once), plus the trainable parameters, their gradients and AdamW's
two moments.
"""
from __future__ import annotations

import copy
import json
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

REPLORA_METHODS = tuple(METHODS)  # every registered method is benchmarked


@dataclass
class BenchSettings:
    models: tuple[str, ...] = ("minilm", "smollm2")
    ranks: tuple[int, ...] = (8, 16, 64)
    batch_size: int = 4
    seq_len: int = 32
    rounds: int = 15
    steps: int = 2  # at least; more when a step is short, so each timing spans >= min_time
    min_time: float = 0.2
    warmup: int = 2
    seed: int = 0
    threads: int = field(default_factory=torch.get_num_threads)


def _targets(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return ["query", "value"] if "query" in names else ["q_proj", "v_proj"]


def _contenders(base, r: int, device) -> dict:
    """name -> (model, optimizer or None): PEFT LoRA / DoRA and every replora method, same targets."""
    from peft import LoraConfig, get_peft_model

    targets = _targets(base)
    built = {}
    for use_dora in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                              use_dora=use_dora, init_lora_weights=True))
        built["peft-dora" if use_dora else "peft-lora"] = model
    for method in REPLORA_METHODS:
        torch.manual_seed(0)
        built[f"replora-{method}"] = replora.inject(
            copy.deepcopy(base), replora.AdapterConfig(method=method, r=r, lora_alpha=2 * r, target_modules=targets))
    out = {}
    for name, model in built.items():
        model.to(device).train()
        with torch.no_grad():  # B = 0 at init would let a lazy implementation skip work: start from non-zero
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1e-3 * torch.randn_like(p))
        out[name] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _train_step(model, optimizer, batch):
    loss = model(**batch).logits.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _timed(fn, device, repeat: int) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeat


def _step_memory(model, optimizer, batch, device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _train_step(model, optimizer, batch)
        return torch.cuda.max_memory_allocated() - before
    seen, saved = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            saved[0] += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).logits.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return saved[0] + 4 * trainable  # parameters, gradients, two AdamW moments


def _summary(pairs: list[tuple[float, float]], reference: str) -> dict:
    """One contender's (time, reference's time) pairs: its median time and the ratio's median and quartiles."""
    per_round = [t / ref for t, ref in pairs]
    q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [per_round[0]] * 3
    return {"reference": reference, "median_s": statistics.median(t for t, _ in pairs),
            "ratio": {"median": statistics.median(per_round), "q1": q[0], "q3": q[2], "rounds": len(per_round)}}


# Each contender's reference; a reference paired with itself is the control (the noise floor). replora's
# DoRA is timed against PEFT's DoRA, every other replora method against PEFT's LoRA.
TRAIN_REFERENCES = {"peft-lora": "peft-lora", "peft-dora": "peft-lora",
                    **{f"replora-{m}": "peft-dora" if m == "dora" else "peft-lora" for m in REPLORA_METHODS}}
INFER_REFERENCES = {"base": "base", "peft-lora-unmerged": "base", "replora-lora-merged": "base",
                    "replora-replora-merged": "base", "replora-lora-unmerged": "peft-lora-unmerged",
                    "replora-replora-unmerged": "peft-lora-unmerged"}


def _paired_rounds(run: dict, references: dict, rounds: int, device, repeat: int) -> dict:
    """{contender: [(its time, its reference's time), ...]}, one pair per round, timed back to back;
    which of the two goes first alternates by round, and the order of the pairs rotates."""
    timings = {name: [] for name in references}
    names = list(references)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            first, second = (name, references[name]) if round_ % 2 == 0 else (references[name], name)
            t_first, t_second = _timed(run[first], device, repeat), _timed(run[second], device, repeat)
            timings[name].append((t_first, t_second) if first == name else (t_second, t_first))
    return timings


def bench_model(model_name: str, s: BenchSettings, device, log=print) -> dict:
    from replora.training import load_model

    torch.manual_seed(s.seed)
    base, _ = load_model(model_name, num_labels=2)
    base.requires_grad_(False)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(s.seed)
    batch = {"input_ids": torch.randint(5, vocab, (s.batch_size, s.seq_len), generator=g).to(device),
             "attention_mask": torch.ones(s.batch_size, s.seq_len, dtype=torch.long, device=device)}
    result = {"model": model_name, "parameters": sum(p.numel() for p in base.parameters()), "ranks": {}}
    for r in s.ranks:
        contenders = _contenders(base, r, device)
        steps = {name: (lambda m=model, o=opt: _train_step(m, o, batch)) for name, (model, opt) in contenders.items()}
        for name in steps:
            for _ in range(s.warmup):
                steps[name]()
        repeat = max(s.steps, math.ceil(s.min_time / _timed(steps["peft-lora"], device, 1)))
        timings = _paired_rounds(steps, TRAIN_REFERENCES, s.rounds, device, repeat)
        memory = {n: _step_memory(*contenders[n], batch, device) for n in contenders}
        train = {name: {**_summary(timings[name], reference), "peak_bytes": memory[name],
                        "memory_ratio": memory[name] / memory[reference]}
                 for name, reference in TRAIN_REFERENCES.items()}
        # Inference: the bare base model, replora (lora and replora) unmerged and merged, PEFT unmerged.
        infer_models = {"base": base.to(device).eval(), "peft-lora-unmerged": contenders["peft-lora"][0].eval()}
        for method in ("lora", "replora"):
            model = contenders[f"replora-{method}"][0].eval()
            infer_models[f"replora-{method}-unmerged"] = model
            merged = copy.deepcopy(model)
            replora.merge(merged)
            infer_models[f"replora-{method}-merged"] = merged
        calls = {name: (lambda m=model: m(**batch)) for name, model in infer_models.items()}
        with torch.no_grad():
            for name in calls:
                for _ in range(s.warmup):
                    calls[name]()
            repeat = max(s.steps, math.ceil(s.min_time / _timed(calls["base"], device, 1)))
            timings = _paired_rounds(calls, INFER_REFERENCES, s.rounds, device, repeat)
        inference = {name: _summary(timings[name], reference) for name, reference in INFER_REFERENCES.items()}
        result["ranks"][r] = {"train": train, "inference": inference}
        log(f"{model_name} r={r}: " + ", ".join(f"{n} {v['ratio']['median']:.3f}x" for n, v in train.items()))
    return result


def run_bench(s: BenchSettings, root: Path, log=print) -> str:
    torch.set_num_threads(s.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"settings": {k: v for k, v in s.__dict__.items()}, "device": str(device),
               "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "models": []}
    for name in s.models:
        results["models"].append(bench_model(name, s, device, log))
    report = _report(results)

    def publish(folder: Path) -> None:  # each file replaced whole (replora.saving.write_folder)
        (folder / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
        (folder / "bench.md").write_text(report)
        _plot(results, folder / "bench.png")
    write_folder(root, publish)
    return report


def _report(results: dict) -> str:
    s = results["settings"]
    lines = [f"# replora vs PEFT: {results['device']}, {s['threads']} threads, batch {s['batch_size']} x "
             f"{s['seq_len']} tokens, {s['rounds']} rounds of back-to-back pairs (each timing >= {s['min_time']} s)",
             "", "Ratio = time of the contender / time of its reference, timed back to back: median [quartiles] "
             "over the rounds. A reference's own row times it against itself (a control): its spread is the "
             "noise floor. Training step = forward, backward and AdamW; memory as the module docstring says.", ""]
    for m in results["models"]:
        for r, data in m["ranks"].items():
            lines += [f"**{m['model']}** ({m['parameters'] / 1e6:.1f}M parameters), r = {r}", "",
                      "| training step | reference | step (ms) | time ratio | memory ratio |", "|---|---|---|---|---|"]
            for n, v in data["train"].items():
                q = v["ratio"]
                lines.append(f"| {n} | {v['reference']} | {1000 * v['median_s']:.1f} | {q['median']:.3f} "
                             f"[{q['q1']:.3f}, {q['q3']:.3f}] | {v['memory_ratio']:.3f} |")
            lines += ["", "| inference | reference | latency (ms) | time ratio |", "|---|---|---|---|"]
            for n, v in data["inference"].items():
                q = v["ratio"]
                lines.append(f"| {n} | {v['reference']} | {1000 * v['median_s']:.1f} | {q['median']:.3f} "
                             f"[{q['q1']:.3f}, {q['q3']:.3f}] |")
            lines.append("")
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["models"]), figsize=(5.2 * len(results["models"]), 4), squeeze=False)
    for ax, m in zip(axes[0], results["models"]):
        ranks = [int(r) for r in m["ranks"]]
        for name in next(iter(m["ranks"].values()))["train"]:
            ax.plot(ranks, [1000 * m["ranks"][r]["train"][name]["median_s"] for r in m["ranks"]], marker="o",
                    linestyle="--" if name.startswith("peft") else "-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel("training step (ms)")
        ax.set_title(f"{m['model']} ({m['parameters'] / 1e6:.0f}M parameters)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
