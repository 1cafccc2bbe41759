"""`python -m research.sft_throughput`: generative fine-tuning throughput, `replora train --task sft` against
TRL's SFTTrainer with PEFT LoRA (issue 18, point 3).

Both train SmolLM2 with LoRA (r 8 on q_proj / v_proj, fp32, AdamW) on the same items of the commonsense
mix, rendered by the same template, with the same sequence length and batch size, for the same number
of optimizer steps, one after the other over several rounds, each side first in turn (drift cancels; a
round's ratio is taken within it). TRL runs with its best settings for a CPU, packing on, in both of its
packing strategies: `bfd` (its default: whole examples packed by best-fit decreasing, no padding, the
batch flattened into one row with the examples kept apart by position ids: padding-free, made for
FlashAttention's variable-length kernels) and `wrapped` (the token stream cut into rows of `max_length`,
ordinary causal attention within each row, across the examples' boundaries); the loss on the
completions only, gradient checkpointing off (TRL turns it on by default, which trades time for memory),
no data-loader workers. replora is compared with the faster TRL of each round, and with each. replora
runs as a user would run it (length-grouped batches, not packed).

The figure compared is **real tokens per second of training** (tokens that are not padding, prompt and
response, through forward, backward and the optimizer step): replora's from its training window (the
time between validations, so neither validation nor the final test counts), TRL's from its own
`num_tokens` over its training time. Each side's padding fraction is reported too (TRL's is 0 by
construction: packing leaves no padding). Writes sft_throughput.json / .md under --output.

`--profile STEPS`: instead, each side trains STEPS steps under torch.profiler (set-up included: loading the
model and preparing the data, a small share of a few steps), and sft_profile.md lists the ops where each
spends its time, to say where a gap comes from.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from replora.saving import write_folder

from .reports import quartiles

RESULTS = Path(__file__).parent / "results" / "sft-throughput"
PACKING = ("bfd", "wrapped")  # TRL's packing strategies: its default, and the one a CPU runs faster (below)


@dataclass
class SFTComparison:
    model: str = "smollm2"
    items: int = 2000  # training items of the commonsense mix
    steps: int = 20
    batch_size: int = 8
    max_length: int = 256
    rounds: int = 3
    seed: int = 0


def replora_run(c: SFTComparison, steps: int) -> dict:
    from replora.training import TrainSettings, train

    with tempfile.TemporaryDirectory() as out:
        m = train(TrainSettings(task="sft", model=c.model, dataset="commonsense", method="lora",
                                adapter={"r": 8, "lora_alpha": 16}, max_train_examples=c.items, max_steps=steps,
                                batch_size=c.batch_size, max_length=c.max_length, max_eval_examples=8,
                                max_new_tokens=2, seed=c.seed, keep="last", output=out))
    window = m["history"][-1]  # one window: --max-steps within one pass, validated once, at the end
    return {"tokens_per_second": window["train_tokens_per_second"], "padding_fraction": m["padding_fraction"],
            "steps": m["steps"]}


def trl_rows(c: SFTComparison) -> list[dict]:
    """The same training items replora trains on, as TRL's prompt / completion rows."""
    from replora.training import TrainSettings
    from replora.training.data import load_task, training_examples

    settings = TrainSettings(task="sft", dataset="commonsense", max_train_examples=c.items, seed=c.seed)
    return [{"prompt": e["prompt"], "completion": e["response"]}
            for e in training_examples(load_task("commonsense").train, settings.max_train_examples, settings.fraction,
                                          settings.seed)]


def trl_run(c: SFTComparison, rows: list[dict], steps: int, packing: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from replora.training.pretrained import load_causal_lm

    model, tokenizer = load_causal_lm(c.model)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=c.batch_size,
                         max_length=c.max_length, packing=True, packing_strategy=packing, completion_only_loss=True,
                         learning_rate=1e-3, lr_scheduler_type="linear", seed=c.seed, report_to=[],
                         save_strategy="no", logging_steps=steps, dataloader_num_workers=0, bf16=False, fp16=False,
                         use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                         gradient_checkpointing=False)  # TRL's default (True) recomputes activations: slower, only saves memory
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                    task_type="CAUSAL_LM"))
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
    tokens = max(float(h.get("num_tokens", 0)) for h in trainer.state.log_history)  # (TRL's count, cumulative)
    return {"tokens_per_second": tokens / result.metrics["train_runtime"], "padding_fraction": 0.0,
            "steps": trainer.state.global_step, "seconds_with_setup": seconds}


def _sides(c: SFTComparison, steps: int) -> dict:
    rows = trl_rows(c)
    return {"replora": lambda: replora_run(c, steps),
            **{f"trl-{p}": (lambda p=p: trl_run(c, rows, steps, p)) for p in PACKING}}


def measure(c: SFTComparison, log=print) -> dict:
    """The rounds (each side first in turn), every side's tokens/s and padding, and replora's ratio to each
    TRL and to the faster TRL of each round, median [quartiles]."""
    torch.manual_seed(c.seed)
    sides = _sides(c, c.steps)
    rounds = []
    for r in range(c.rounds):
        got = {}
        for who in list(sides)[r % len(sides):] + list(sides)[:r % len(sides)]:
            got[who] = sides[who]()
            log(f"sft round {r + 1} {who}: {got[who]['tokens_per_second']:.0f} tokens/s, padding "
                f"{got[who]['padding_fraction']:.3f}")
        got["trl-best"] = max((got[f"trl-{p}"] for p in PACKING), key=lambda g: g["tokens_per_second"])
        rounds.append(got)
    ratios = {t: quartiles([g["replora"]["tokens_per_second"] / g[t]["tokens_per_second"] for g in rounds])
              for t in [f"trl-{p}" for p in PACKING] + ["trl-best"]}
    import trl

    return {"settings": asdict(c), "torch_threads": torch.get_num_threads(), "trl": trl.__version__,
            "machine": platform.platform(), "rounds": rounds, "ratios": ratios}


def report_lines(summary: dict) -> list[str]:
    c, rounds, ratios = SFTComparison(**summary["settings"]), summary["rounds"], summary["ratios"]
    med = lambda who: statistics.median(g[who]["tokens_per_second"] for g in rounds)  # noqa: E731
    pad = statistics.median(g["replora"]["padding_fraction"] for g in rounds)
    ratio = lambda t: f"{ratios[t]['median']:.2f}x [{ratios[t]['q1']:.2f}, {ratios[t]['q3']:.2f}]"  # noqa: E731
    return [
        f"{c.model}, LoRA r 8 on q/v, batch {c.batch_size}, max length {c.max_length}, {c.steps} steps, {c.items} "
        f"commonsense items, {c.rounds} rounds (each side first in turn), {summary['torch_threads']} threads, TRL "
        f"{summary['trl']}. Real (non-padding) tokens per second of training, median over rounds; replora's / "
        "TRL's within each round, median [quartiles].", "",
        "| | tokens/s | padding fraction | replora / it |", "|---|---|---|---|",
        f"| replora (length-grouped batches) | {med('replora'):.0f} | {pad:.3f} | |",
        f"| TRL, packing `bfd` (its default: whole examples, kept apart, padding-free) | {med('trl-bfd'):.0f} | 0 | "
        f"{ratio('trl-bfd')} |",
        f"| TRL, packing `wrapped` (rows of {c.max_length} tokens cut across examples) | {med('trl-wrapped'):.0f} | 0 "
        f"| {ratio('trl-wrapped')} |",
        f"| TRL, the faster of the two in each round | {med('trl-best'):.0f} | 0 | {ratio('trl-best')} |", "",
        "Padding-free `bfd` packing puts a whole batch in one row and keeps its examples apart by position ids: "
        "fast with FlashAttention's variable-length kernels, but without them (a CPU) the attention runs over "
        f"the whole row ({c.batch_size} x {c.max_length} tokens) under a block-diagonal mask. `wrapped` "
        "attends within rows of max length, across the examples' boundaries (a different objective).", ""]


def profile_sides(c: SFTComparison, steps: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    text = [f"# Where a step goes: replora and TRL SFTTrainer + PEFT LoRA, {steps} steps each", "",
            f"{c.model}, LoRA r 8 on q/v, batch {c.batch_size}, max length {c.max_length}, "
            f"{torch.get_num_threads()} threads; self CPU time of each op over the steps and their set-up.", ""]
    for who, run in _sides(c, steps).items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = run()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        text += [f"## {who}: {got['tokens_per_second']:.0f} real tokens/s under the profiler, {total:.1f} s of "
                 "self CPU time", "", "```", events.table(sort_by="self_cpu_time_total", row_limit=20), "```", ""]
        print(text[-5], flush=True)
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.sft_throughput", description=__doc__.split("\n")[0])
    d = SFTComparison()
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--items", type=int, default=d.items, help="training items of the commonsense mix")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--max-length", type=int, default=d.max_length)
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--profile", type=int, metavar="STEPS", help="profile STEPS steps of each side instead")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    c = SFTComparison(model=args.model, items=args.items, steps=args.steps, batch_size=args.batch_size,
                      max_length=args.max_length, rounds=args.rounds)
    out = Path(args.output)
    if args.profile:
        text = profile_sides(c, args.profile)
        write_folder(out, lambda folder: (folder / "sft_profile.md").write_text(text))
        print(f"written {out / 'sft_profile.md'}")
        return 0
    summary = measure(c)
    text = "\n".join(["# Generative fine-tuning throughput: replora against TRL SFTTrainer + PEFT LoRA", "",
                      *report_lines(summary)])

    def publish(folder: Path) -> None:  # each file replaced whole
        (folder / "sft_throughput.json").write_text(json.dumps(summary, indent=2) + "\n")
        (folder / "sft_throughput.md").write_text(text)
    write_folder(out, publish)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
