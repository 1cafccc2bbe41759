"""`python -m research.small_data_defaults`: do `replora train`'s defaults learn on small data?

Issue 17, point 4: with the old defaults (2 epochs, lr 1e-3, batch 32, the last step's adapter) a
1,100-row two-class CSV ended at 74% against a 71% majority class, while --lr 3e-3 reached 91%. This
measures, on small real data sets and MiniLM (the default model):

- old: the old defaults (2 epochs, lr 1e-3, the last step's adapter: --epochs 2 --keep last);
- new: today's defaults (2 epochs or more, until --min-steps optimizer steps; validation each pass;
  the best adapter by validation; no early stopping), lr 1e-3;
- the best of a learning-rate search {3e-4, 1e-3, 3e-3, 1e-2}, picked on validation (never test), with
  the old budget and with the new one.

Every run is an ordinary train() run in its own folder under <output>/runs (metrics.json, settings.json
and log.txt kept); a finished run is skipped and an interrupted one resumes, so the grid can be finished
over several sittings: run the same command again. Seeds run one after the other, the default settings
first. Writes runs.csv (one row per run) and small_data_defaults.md (the table) in <output>.

    python -m research.small_data_defaults                      # seed 0, every data set
    python -m research.small_data_defaults --seeds 0 1 2        # then seeds 1 and 2 (the defaults first)
    python -m research.small_data_defaults --seeds 0 1 2 --datasets rt-800
    python -m research.small_data_defaults --datasets social_iqa --budgets old   # only the old budget's search
    python -m research.small_data_defaults --report-only        # the table from the runs finished so far
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from replora.training import TrainSettings, train
from replora.training.data import capped, load_task

from .reports import write_csv

RESULTS = Path(__file__).parent / "results" / "small-data-defaults"
LRS = (3e-4, 1e-3, 3e-3, 1e-2)
DEFAULT_LR = 1e-3

# Small real data sets, all offline: Rotten Tomatoes capped to 800 training snippets (a fixed stratified
# subset; validation and test capped to 1,000 to keep the per-pass validation cheap), and the vendored
# BIG-bench multiple-choice tasks whole.
DATASETS = {
    "rt-800": dict(dataset="rotten_tomatoes", max_train_examples=800, max_eval_examples=1000),
    "strategyqa": dict(dataset="strategyqa"),
    "social_iqa": dict(dataset="social_iqa"),
}
# The two budgets compared: the old defaults and today's (TrainSettings' own).
BUDGETS = {"old": dict(epochs=2, keep="last"), "new": dict()}


def run_dir(root: Path, dataset: str, budget: str, lr: float, seed: int) -> Path:
    return root / "runs" / f"{dataset}-{budget}-lr{lr:g}-s{seed}"


def settings_of(root: Path, dataset: str, budget: str, lr: float, seed: int) -> TrainSettings:
    return TrainSettings(model="minilm", lr=lr, seed=seed, output=str(run_dir(root, dataset, budget, lr, seed)),
                         resume=True, **DATASETS[dataset], **BUDGETS[budget])


def run_one(root: Path, dataset: str, budget: str, lr: float, seed: int, report_only: bool = False) -> dict | None:
    file = run_dir(root, dataset, budget, lr, seed) / "metrics.json"
    if file.is_file():
        return json.loads(file.read_text())
    if report_only:
        return None
    started = time.perf_counter()
    metrics = train(settings_of(root, dataset, budget, lr, seed))
    print(f"{dataset} {budget} lr {lr:g} seed {seed}: test {metrics['test_accuracy']:.4f}, validation "
          f"{metrics['validation_accuracy']:.4f}, {metrics['steps']} steps, {time.perf_counter() - started:.0f} s",
          flush=True)
    return metrics


def plan(datasets, seeds, lrs) -> list[tuple[str, str, float, int]]:
    """The runs in the order they are made: the first seed whole (the two default settings on every data
    set, then the rest of the learning-rate search), then the default settings of the other seeds, then
    their searches; so a grid cut short still holds one complete comparison."""
    defaults = lambda seed: [(d, b, DEFAULT_LR, seed) for d in datasets for b in BUDGETS]  # noqa: E731
    search = lambda seed: [(d, b, lr, seed) for d in datasets for b in BUDGETS for lr in lrs if lr != DEFAULT_LR]  # noqa: E731
    order = defaults(seeds[0]) + search(seeds[0])
    for seed in seeds[1:]:
        order += defaults(seed)
    for seed in seeds[1:]:
        order += search(seed)
    return order


def finished(root: Path, lrs) -> tuple[list[str], list[int], list[float], dict]:
    """Every finished run under root/runs, whichever command made it, so that the table always covers the
    whole grid: (data sets, seeds, learning rates, {(dataset, budget, lr, seed): metrics})."""
    runs = {}
    for file in sorted((root / "runs").glob("*/metrics.json")):
        found = re.fullmatch(r"(.+)-(old|new)-lr([0-9.e+-]+)-s(\d+)", file.parent.name)
        if found and found[1] in DATASETS:
            runs[found[1], found[2], float(found[3]), int(found[4])] = json.loads(file.read_text())
    datasets = [d for d in DATASETS if any(key[0] == d for key in runs)]
    return datasets, sorted({key[3] for key in runs}), list(lrs), runs


def majority(dataset: str) -> tuple[float, int]:
    """Test accuracy of always answering the training split's most common label, and the training rows."""
    options = DATASETS[dataset]
    task = load_task(options["dataset"])
    train_rows = task.train
    if options.get("max_train_examples"):
        from replora.training.data import SPLIT_SEED, stratified_fraction
        train_rows = stratified_fraction(train_rows, options["max_train_examples"] / len(train_rows), SPLIT_SEED)
    label = Counter(e["label"] for e in train_rows).most_common(1)[0][0]
    test = capped(task.test, options.get("max_eval_examples"))
    return sum(e["label"] == label for e in test) / len(test), len(train_rows)


def patience_would_keep(history: list[dict], patience: int) -> tuple[bool, int]:
    """Had --early-stopping-patience `patience` stopped this run: would it keep the same best adapter,
    and at which step would it have stopped."""
    best, stale, stop = None, 0, len(history) - 1
    for i, h in enumerate(history):
        if best is None or h["validation_accuracy"] > history[best]["validation_accuracy"]:
            best, stale = i, 0
        else:
            stale += 1
            if stale >= patience:
                stop = i
                break
    overall = max(range(len(history)), key=lambda i: (history[i]["validation_accuracy"], -i))
    return best == overall, history[stop]["step"]


def pct(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def report(root: Path, datasets, seeds, lrs, runs: dict) -> str:
    rows = []
    for (dataset, budget, lr, seed), m in sorted(runs.items()):
        rows.append({"dataset": dataset, "budget": budget, "lr": lr, "seed": seed, "train_examples": m["train_examples"],
                     "steps": m["steps"], "epochs": m.get("epochs"), "kept": m.get("kept", "last"),
                     "adapter_step": m.get("adapter_step", m["steps"]),
                     "validation_accuracy": round(m["validation_accuracy"], 5),
                     "last_validation_accuracy": round(m["history"][-1]["validation_accuracy"], 5),
                     "test_accuracy": round(m["test_accuracy"], 5), "still_improving": m.get("still_improving"),
                     "seconds": round(m["wall_time_seconds"], 1)})
    if rows:
        write_csv(root / "runs.csv", rows)

    def picked(dataset, budget, seed):
        """The learning rate with the best validation accuracy (ties: the smaller), once all have run."""
        found = {lr: runs.get((dataset, budget, lr, seed)) for lr in lrs}
        if any(m is None for m in found.values()):
            return None
        return max(found, key=lambda lr: (found[lr]["validation_accuracy"], -lr))

    new_runs = [(key, m) for key, m in sorted(runs.items()) if key[1] == "new"]
    min_steps = (json.loads((Path(new_runs[0][1]["output"]) / "settings.json").read_text())["min_steps"] if new_runs
                 else TrainSettings().min_steps)
    lines = ["# Small data: the old defaults, the new ones, and a learning-rate search", "",
             "MiniLM (all-MiniLM-L6-v2) with LoRA (r 8), batch 32, 64 tokens. Test accuracy (%), mean ± std over "
             "the seeds that finished (column *seeds*). **old**: 2 epochs, lr 1e-3, the last step's adapter. "
             f"**new**: today's defaults: 2 epochs or more, until {min_steps} optimizer steps (`--min-steps`), "
             "validation each pass, the best adapter by validation (`--keep best`), lr 1e-3. **lr search**: the best of "
             f"{', '.join(f'{lr:g}' for lr in lrs)} on validation, with the old budget and with the new one (the "
             "learning rates picked, per seed, in brackets). *majority*: always the training split's commonest "
             "label (multiple choice: answer position). *s / run*: wall time on 2 CPU cores shared with other "
             "work, one thread, so only a rough guide.", "",
             "| data set | train rows | majority | old | new | lr search, old budget | lr search, new budget "
             "| steps old / new | s / run old / new | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for dataset in datasets:
        base, n = majority(dataset)
        done = [s for s in seeds if (dataset, "old", DEFAULT_LR, s) in runs and (dataset, "new", DEFAULT_LR, s) in runs]
        old = [runs[dataset, "old", DEFAULT_LR, s] for s in done]
        new = [runs[dataset, "new", DEFAULT_LR, s] for s in done]
        searched = {}
        for budget in BUDGETS:
            picks = [(s, picked(dataset, budget, s)) for s in done]
            picks = [(s, lr) for s, lr in picks if lr is not None]
            searched[budget] = (f"{pct([runs[dataset, budget, lr, s]['test_accuracy'] for s, lr in picks])} "
                                f"({', '.join(f'{lr:g}' for _, lr in picks)})") if picks else "–"
        steps = (f"{old[0]['steps']} / {new[0]['steps']}" if done else "–")
        seconds = (f"{statistics.fmean(m['wall_time_seconds'] for m in old):.0f} / "
                   f"{statistics.fmean(m['wall_time_seconds'] for m in new):.0f}" if done else "–")
        lines.append(f"| {dataset} | {n:,} | {100 * base:.1f} | {pct([m['test_accuracy'] for m in old])} | "
                     f"{pct([m['test_accuracy'] for m in new])} | {searched['old']} | {searched['new']} | {steps} | "
                     f"{seconds} | {','.join(map(str, done)) or '–'} |")

    new_runs = [m for _, m in new_runs]
    if new_runs:
        rising = sum(bool(m.get("still_improving")) for m in new_runs)
        before_end = [m for m in new_runs if m.get("adapter_step") != m["steps"]]
        lost = [m["validation_accuracy"] - m["history"][-1]["validation_accuracy"] for m in before_end]
        kept = [patience_would_keep(m["history"], 3) for m in new_runs]
        saved = statistics.fmean(1 - step / m["steps"] for (_, step), m in zip(kept, new_runs))
        lines += ["", f"New budget, all {len(new_runs)} runs (every learning rate): the best validation came before the "
                      f"last step in {len(before_end)}"
                  + (f" (by {100 * statistics.fmean(lost):.1f} points of validation accuracy on average over the last "
                     "step's adapter)" if lost else "")
                  + f"; the validation accuracy was still rising at the end in {rising}. Early stopping with "
                    f"patience 3 would have kept the same adapter in {sum(same for same, _ in kept)} of them and "
                    f"saved {100 * saved:.0f}% of their steps."]
    seconds = sum(m["wall_time_seconds"] for m in runs.values())
    lines += ["", f"{len(runs)} runs, {seconds / 3600:.1f} hours of training in all (2 CPU cores shared with other "
                  "work). Made by `python -m research.small_data_defaults`; per-run figures in runs.csv, each run's "
                  "metrics.json, settings.json and log.txt under runs/."]
    text = "\n".join(lines) + "\n"
    (root / "small_data_defaults.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.small_data_defaults", description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=tuple(DATASETS), default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    parser.add_argument("--budgets", nargs="+", choices=tuple(BUDGETS), default=list(BUDGETS),
                        help="run only these budgets (the table still reports every run already finished)")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--report-only", action="store_true", help="only the table, from the runs finished so far")
    args = parser.parse_args(argv)
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    for key in plan(args.datasets, args.seeds, args.lrs):
        if not args.report_only and key[1] in args.budgets and run_one(root, *key) is not None:
            print(report(root, *finished(root, args.lrs)))  # the table grows as the runs finish, every data set in it
    print(report(root, *finished(root, args.lrs)))
    return 0


if __name__ == "__main__":
    from replora.training.cli import run_command

    sys.exit(run_command(argparse.Namespace(func=lambda _: main())))
