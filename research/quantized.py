"""`python -m research quantized`: what a 4-bit or 8-bit base (bitsandbytes, as `replora train --quantize` loads it)
costs and whether it still learns, on this machine's CPU (issue 33). Written to research/results/quantized/
{quantized.json, quantized.md}; rerunning the command resumes (finished cells and runs are read, not redone).

1. A training step (forward, backward, AdamW) of SmolLM2-135M and Gemma-3-270M, float32 against 4bit (NF4, float32
   compute on the CPU) and 8bit (LLM.int8), every method at its defaults (r 8, q/v), on one fixed batch of token
   ids. Each cell runs in a fresh subprocess: it loads the model through replora train's own loader
   (pretrained.load_causal_lm, which also calls prepare_for_quantized_training), injects, takes `warmup` steps,
   then times `steps` more; the step time is their median, with min and max. For one (model, method) the three
   precisions run back to back in one pass, so their ratios are measured side by side (the machine's other load
   is shared by them).
   Memory is the process's peak resident set (Linux VmHWM) over the warm-up and timed steps, its high-water mark
   reset once the model is loaded (writing 5 to /proc/self/clear_refs) and the heap loading freed given back
   (malloc_trim), so it counts the resident weights plus what the step allocates; "loaded" is the resident set
   after loading. Every unquantized tensor is copied into memory of its own after loading: transformers leaves
   them views of the memory-mapped weights file, and a quantized model, whose loading read all of that file,
   keeps its whole mapping resident through them (its float32 embeddings), which would count the float32
   weights against every precision. Why not tracemalloc: it sees only
   Python's allocator, not torch's or bitsandbytes' native buffers; torch.profiler's memory view sees torch's
   allocations only (not mapped weights) and slows the step. RSS counts everything the process holds (the
   imported libraries too, the same in every cell), so its ratios understate the weights' own saving.
2. Learning: `replora train --quantize 4bit` on the word-reversal SFT set (research/data/reverse_words.jsonl),
   SmolLM2, the settings of research/results/sft-reverse-words (whose float32 runs reach 100% exact match):
   lora and replora, test exact match read from each run's metrics.json.

Run it with OMP_NUM_THREADS=1 on a shared machine (as its results were): figures are ratios on this CPU, where
bitsandbytes has no fast kernels for training; on a GPU they differ.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MODELS = ("smollm2", "gemma3-270m")
METHODS = ("lora", "dora", "moslora", "replora")
PRECISIONS = ("float32", "4bit", "8bit")
DATA = Path(__file__).parent / "data" / "reverse_words.jsonl"
# As research/results/sft-reverse-words ran its float32 runs (README there): 3 epochs of 40 steps.
LEARNING = ["--model", "smollm2", "--dataset", str(DATA), "--epochs", "3", "--batch-size", "8", "--lr", "2e-3",
            "--max-new-tokens", "8", "--quantize", "4bit"]


@dataclass
class QuantizedSettings:
    models: tuple[str, ...] = MODELS
    methods: tuple[str, ...] = METHODS
    batch: int = 4  # sequences per step ...
    length: int = 64  # ... of this many tokens
    warmup: int = 1
    steps: int = 3
    learning_methods: tuple[str, ...] = ("lora", "replora")


# --- one cell, in its own process ------------------------------------------------------------------------------------

def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: its peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: the memory figures need Linux")


def _release_freed_heap() -> None:
    """Give the C heap's free pages back to the system (glibc malloc_trim), or RSS counts memory already freed."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then includes what the allocator keeps
        pass


def cell(model_name: str, precision: str, method: str, batch: int, length: int, warmup: int, steps: int) -> dict:
    import torch

    import gc

    import replora
    from replora.training.pretrained import load_causal_lm

    torch.manual_seed(0)
    model, _ = load_causal_lm(model_name, None if precision == "float32" else precision)
    with torch.no_grad():  # every unquantized tensor in memory of its own, none a view of the weights file (docstring)
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.clone()
    gc.collect()
    replora.inject(model, replora.AdapterConfig(method=method))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(10, model.config.vocab_size - 10, (batch, length), generator=torch.Generator().manual_seed(0))
    _release_freed_heap()  # what loading freed (a 4-bit load reads float32 weights, then packs them) ...
    loaded, loaded_file = _status("VmRSS"), _status("RssFile")  # (RssFile: mapped files, the libraries' code too)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    Path("/proc/self/clear_refs").write_text("5")  # ... so the peak from here on is the steps', the model resident
    times, losses = [], []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    timed = times[warmup:]
    return {"model": model_name, "precision": precision, "method": method, "step_seconds": timed,
            "median_seconds": statistics.median(timed), "loaded_bytes": loaded, "peak_bytes": _status("VmHWM"),
            "loaded_file_bytes": loaded_file, "weights_bytes": weights,
            "trainable": sum(p.numel() for p in params), "losses": losses,
            "threads": torch.get_num_threads()}


def _run_cell(model: str, precision: str, method: str, s: QuantizedSettings) -> dict:
    command = [sys.executable, "-m", "research.quantized", "--cell", model, precision, method,
               *map(str, (s.batch, s.length, s.warmup, s.steps))]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode:
        raise RuntimeError(f"cell {model} {precision} {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the whole measurement ------------------------------------------------------------------------------------------

def _key(row: dict) -> str:
    return f"{row['model']}/{row['method']}/{row['precision']}"


def run_quantized(s: QuantizedSettings, root: Path, parts: tuple[str, ...] = ("steps", "learning")) -> str:
    root.mkdir(parents=True, exist_ok=True)
    results_file = root / "quantized.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results["settings"] = asdict(s)
    cells = results.setdefault("cells", {})

    def save() -> None:
        tmp = results_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(results_file)

    if "steps" in parts:
        for model in s.models:
            for method in s.methods:
                for precision in PRECISIONS:  # side by side: the three precisions of one method back to back
                    key = f"{model}/{method}/{precision}"
                    if key in cells:
                        continue
                    print(f"cell {key} ...", flush=True)
                    cells[key] = _run_cell(model, precision, method, s)
                    save()
    if "learning" in parts:
        learning = results.setdefault("learning", {})
        for method in s.learning_methods:
            out = root / "runs" / f"reverse-words-{method}-4bit"
            if not (out / "metrics.json").is_file():
                print(f"learning run {out} ...", flush=True)
                command = [sys.executable, "-m", "replora", "train", *LEARNING, "--method", method,
                           "--output", str(out), "--resume"]
                done = subprocess.run(command, cwd=Path(__file__).parent.parent,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                if done.returncode:
                    raise RuntimeError(f"learning run {method} failed (exit {done.returncode}); rerun to resume")
            m = json.loads((out / "metrics.json").read_text())
            learning[method] = {k: m.get(k) for k in ("test_exact_match", "test_loss", "steps", "wall_time_seconds",
                                                      "test_examples", "trainable_parameters")}
            learning[method]["run"] = os.path.relpath(out, root)
            save()
    report = markdown(results)
    (root / "quantized.md").write_text(report + "\n")
    return report


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def markdown(results: dict) -> str:
    cells = results.get("cells", {})
    s = results["settings"]
    lines = ["# Quantized bases on this CPU: a training step, 4bit / 8bit against float32", "",
             f"One step = forward, backward, AdamW on a batch of {s['batch']} x {s['length']} tokens; median of "
             f"{s['steps']} timed steps after {s['warmup']} warm-up (min-max in brackets), OMP threads as run "
             "(see threads). Peak = the process's resident high-water mark over the steps (VmHWM, reset after "
             "loading), loaded = resident after loading; both include the libraries. Ratios: to float32, same model "
             "and method, run back to back; on a shared CPU a step's time still moves with the other load (the "
             "min-max shows how much), so read a time ratio near 1 as no difference measured. "
             "`python -m research quantized` (research/quantized.py) made it.", ""]
    for model in s["models"]:
        rows = [c for c in cells.values() if c["model"] == model]
        if not rows:
            continue
        lines += [f"## {model}", "", "| method | precision | step (s) | time ratio | peak RSS (MiB) | peak ratio | "
                  "loaded RSS (MiB) | loaded ratio | trainable | threads |", "|---" * 10 + "|"]
        for method in s["methods"]:
            base = cells.get(f"{model}/{method}/float32")
            for precision in PRECISIONS:
                c = cells.get(f"{model}/{method}/{precision}")
                if c is None:
                    continue
                ratio = (lambda k: f"{c[k] / base[k]:.2f}") if base else (lambda k: "")
                lines.append(f"| {method} | {precision} | {c['median_seconds']:.2f} ({min(c['step_seconds']):.2f}-"
                             f"{max(c['step_seconds']):.2f}) | {ratio('median_seconds')} | {_mb(c['peak_bytes'])} | "
                             f"{ratio('peak_bytes')} | {_mb(c['loaded_bytes'])} | {ratio('loaded_bytes')} | "
                             f"{c['trainable']:,} | {c['threads']} |")
        lines.append("")
    learning = results.get("learning") or {}
    if learning:
        lines += ["## Does a 4-bit base still learn? Word reversal (SFT), SmolLM2 4bit", "",
                  "`replora train " + " ".join(LEARNING[:3] + ["research/data/reverse_words.jsonl"] + LEARNING[4:])
                  + " --method M`; float32 runs with the same settings: 100% (research/results/sft-reverse-words).", "",
                  "| method | test exact match | test loss | steps | wall time (s) | test rows |", "|---" * 6 + "|"]
        for method, m in learning.items():
            lines.append(f"| {method} | {100 * m['test_exact_match']:.0f}% | {m['test_loss']:.4f} | {m['steps']} | "
                         f"{m['wall_time_seconds']:.0f} | {m['test_examples']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 9 and sys.argv[1] == "--cell":
        _, _, model, precision, method, *numbers = sys.argv
        print(json.dumps(cell(model, precision, method, *map(int, numbers))))
    else:
        sys.exit("usage: python -m research quantized (this module's --cell runs one cell, for run_quantized)")
