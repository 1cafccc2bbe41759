"""`python -m research.sft_throughput`: generative fine-tuning throughput, `replora train --task sft` against
TRL's SFTTrainer with PEFT LoRA (issue 18, point 3).

Both train SmolLM2 with LoRA (r 8 on q_proj / v_proj, fp32, AdamW) on the same items of the commonsense
mix, rendered by the same template, with the same sequence length and batch size, for the same number
of optimizer steps, one after the other in alternating order over several rounds (drift cancels; a
round's ratio is taken within it). TRL runs with its best settings for a CPU: packing on (best-fit
decreasing: whole examples packed into rows of `max_length` tokens, no padding at all, the examples kept
apart by position ids), the loss on the completions only, no data-loader workers. replora runs as a user
would run it (length-grouped batches, not packed).

The figure compared is **real tokens per second of training** (tokens that are not padding, prompt and
response, through forward, backward and the optimizer step): replora's from its training window (the
time between validations, so neither validation nor the final test counts), TRL's from its own
`num_tokens` over its training time. Each side's padding fraction is reported too (TRL's is 0 by
construction: packing leaves no padding). Writes sft_throughput.json / .md under --output.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "sft-throughput"


def replora_run(items: int, steps: int, batch: int, max_length: int, seed: int) -> dict:
    from replora.training import TrainSettings, train

    with tempfile.TemporaryDirectory() as out:
        m = train(TrainSettings(task="sft", model="smollm2", dataset="commonsense", method="lora", adapter={"r": 8, "lora_alpha": 16},
                                max_train_examples=items, max_steps=steps, batch_size=batch, max_length=max_length,
                                max_eval_examples=8, max_new_tokens=2, seed=seed, keep="last", output=out))
    window = m["history"][-1]  # one window: --max-steps within one pass, validated once, at the end
    return {"tokens_per_second": window["train_tokens_per_second"], "padding_fraction": m["padding_fraction"],
            "steps": m["steps"]}


def trl_rows(items: int, seed: int) -> list[dict]:
    """The same training items replora trains on, as TRL's prompt / completion rows."""
    from replora.training import TrainSettings
    from replora.training.data import load_task
    from replora.training.loop import _training_examples

    settings = TrainSettings(task="sft", dataset="commonsense", max_train_examples=items, seed=seed)
    return [{"prompt": e["prompt"], "completion": e["response"]}
            for e in _training_examples(load_task("commonsense"), settings)]


def trl_run(rows: list[dict], steps: int, batch: int, max_length: int, seed: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from replora.training.pretrained import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2")
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, max_length=max_length,
                         packing=True, completion_only_loss=True, learning_rate=1e-3, lr_scheduler_type="linear",
                         seed=seed, report_to=[], save_strategy="no", logging_steps=steps,
                         dataloader_num_workers=0, bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
                         disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                    task_type="CAUSAL_LM"))
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
    tokens = max(float(h.get("num_tokens", 0)) for h in trainer.state.log_history)  # (TRL's count, cumulative)
    return {"tokens_per_second": tokens / result.metrics["train_runtime"], "padding_fraction": 0.0,
            "steps": trainer.state.global_step, "seconds_with_setup": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.sft_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2000, help="training items of the commonsense mix")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = trl_rows(args.items, 0)
    rounds = []
    for r in range(args.rounds):
        order = ("replora", "trl") if r % 2 == 0 else ("trl", "replora")
        got = {}
        for who in order:
            got[who] = (replora_run if who == "replora" else
                        lambda *a: trl_run(rows, *a[1:]))(args.items, args.steps, args.batch_size, args.max_length, 0)
            print(f"round {r + 1} {who}: {got[who]['tokens_per_second']:.0f} tokens/s, padding "
                  f"{got[who]['padding_fraction']:.3f}", flush=True)
        rounds.append(got)
    ratios = [g["replora"]["tokens_per_second"] / g["trl"]["tokens_per_second"] for g in rounds]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    summary = {"settings": vars(args), "torch_threads": torch.get_num_threads(), "machine": platform.platform(),
               "rounds": rounds, "ratio_median": statistics.median(ratios), "ratio_quartiles": [q[0], q[2]]}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_throughput.json").write_text(json.dumps(summary, indent=2) + "\n")
    med = lambda who, k: statistics.median(g[who][k] for g in rounds)  # noqa: E731
    text = "\n".join([
        "# Generative fine-tuning throughput: replora against TRL SFTTrainer + PEFT LoRA", "",
        f"SmolLM2-135M, LoRA r 8 on q/v, batch {args.batch_size}, max length {args.max_length}, {args.steps} steps, "
        f"{args.items} commonsense items, {args.rounds} rounds in alternating order, {torch.get_num_threads()} "
        "threads. Real (non-padding) tokens per second of training, median over rounds.", "",
        "| | tokens/s | padding fraction |", "|---|---|---|",
        f"| replora (length-grouped) | {med('replora', 'tokens_per_second'):.0f} | {med('replora', 'padding_fraction'):.3f} |",
        f"| TRL SFTTrainer + PEFT LoRA (packing) | {med('trl', 'tokens_per_second'):.0f} | 0 |", "",
        f"replora / TRL: median {summary['ratio_median']:.2f}x (quartiles {q[0]:.2f}–{q[2]:.2f}) over "
        f"{args.rounds} rounds.", ""])
    (out / "sft_throughput.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
