"""`python -m research commonsense`: the papers' main table in their own protocol (RepLoRA table 1,
MoSLoRA's commonsense table), scaled to 2 CPU cores, and claim 2 (sample efficiency) in that protocol.

A decoder LLM is fine-tuned generatively on one mix of the eight commonsense training sets (the loss on
the answer only), every method at the same rank and targets (query and value, as the papers), each at its
learning rate picked on validation loss (seed 0, all the data); then every adapter, and the base model, is
scored on each of the eight test sets (the same items for everyone) by greedy generation and by
log-likelihood (research/README.md). Training runs are ordinary `train()` runs of experiments.Grid and
share its resumable runs folder; each scored run keeps its `eval-generate/` and `eval-loglik/` beside it.
Sample efficiency: LoRA and RepLoRA on 30% of the mix as well, with the same epochs (fewer steps) and,
as a control that separates data from steps, RepLoRA on 30% for as many steps as at 100%.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from replora.methods import METHODS
from replora.saving import write_folder
from replora.training.commonsense import TASKS
from replora.training.evaluation import evaluate_generative, scored_items
from replora.training.settings import EvalSettings

from .experiments import (ADAPTER_LRS, VERDICTS, Grid, NotFinished, claim_2_outcome, pick_lrs, picks_line, run_dir,
                          run_one)
from .reports import fmt, mean_std, paired, write_csv

SCORINGS = ("generate", "loglik")
SHORT = {"boolq": "BoolQ", "piqa": "PIQA", "social_iqa": "SIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
         "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}
# RepLoRA table 1, LLaMA-7B (accuracy per set in TASKS order, average, trainable %): for reference only; a
# 135M model on 2 CPU cores cannot reach these, what it can measure is the difference between methods.
PAPER_LLAMA_7B = {"lora": ((67.2, 79.4, 76.6, 78.3, 78.4, 77.1, 61.5, 74.2), 74.1, 0.83),
                  "dora": ((69.7, 83.4, 78.6, 87.2, 81.0, 81.9, 66.2, 79.2), 78.4, 0.98),
                  "replora": ((71.8, 84.1, 79.3, 85.2, 83.3, 82.4, 66.2, 81.2), 79.1, 1.01)}


@dataclass
class CommonsenseGrid:
    # The commonsense pilot's budget (research/results/commonsense-pilot: it teaches the answer format in one
    # epoch), per run: 17-19 minutes of training on 2 idle CPU cores in the pilot, about 10 since the loss
    # projects only the answers onto the vocabulary (research/results/sft-throughput: 1.7x), plus 1 of
    # validation and testing and at most 7 of scoring 400 items twice; 25 runs and up to 4 more where a
    # learning-rate pick sits at an edge: about 8 CPU hours for the whole grid, estimated (research/README.md).
    grid: Grid = field(default_factory=lambda: Grid(
        model="smollm2", dataset="commonsense", methods=tuple(METHODS), fractions=(0.3, 1.0), seeds=(0, 1, 2),
        lrs={m: ADAPTER_LRS for m in METHODS}, epochs=1, max_train_examples=2000, max_eval_examples=200,
        max_length=192, batch_size=8, max_new_tokens=8, extend_edges=True,
        full_data_only=tuple(m for m in METHODS if m not in ("lora", "replora"))))
    items_per_task: int = 50  # test items scored per set: 400 in all, the same for every model
    equal_steps: tuple[str, ...] = ("replora",)  # trained at f < 1 also for the steps of f = 1 (the control)


def _eval_settings(s: CommonsenseGrid, **given) -> EvalSettings:
    return EvalSettings(max_eval_examples=s.items_per_task, max_new_tokens=s.grid.max_new_tokens,
                        max_length=s.grid.max_length, **given)


def _scored(run: Path, s: CommonsenseGrid, scoring: str, model: str | None = None) -> dict:
    """The run's (or with `model`, the base model's) eval row for one scoring; made once, then read."""
    out = run / f"eval-{scoring}"
    if not (out / "eval.json").is_file():
        if s.grid.report_only:
            raise NotFinished(f"{out} has not been scored")
        if not model and not (run / "adapter").is_dir():
            raise FileNotFoundError(f"{run} was trained but not scored, and its adapter/ is gone (adapters are not "
                                    f"committed): delete {run} and run the grid again to train it anew")
        evaluate_generative(_eval_settings(s, adapter=None if model else str(run), model=model, scoring=scoring,
                                           output=str(out)))
    return json.loads((out / "eval.json").read_text())


def _references(s: CommonsenseGrid) -> dict[str, dict]:
    """Two rows no model is needed for, on the very items scored: chance (one over each item's choices) and
    the best constant answer (the same choice number for every item of a set, the one most often right:
    picked knowing the answers, the most a model that ignores the question can score); as eval rows."""
    rows = {"chance": {}, "best constant answer": {}}
    for task, items in scored_items(_eval_settings(s)).items():
        rows["chance"][task] = statistics.fmean(1 / len(e["choices"]) for e in items)
        labels = [e["label"] for e in items]
        rows["best constant answer"][task] = max(map(labels.count, set(labels))) / len(labels)
    return {name: {"scoring": "", "accuracy": accuracy, "average": statistics.fmean(accuracy.values()),
                   "trainable_percent": 0, "seconds": 0} for name, accuracy in rows.items()}


def _key(method: str, fraction: float, variant: str = "") -> str:
    return f"{method}{' ' + variant if variant else ''}, f = {fraction:g}"


def commonsense_table(s: CommonsenseGrid, root: Path, runs: Path | None = None, plot: bool = True) -> str:
    """Every run of the grid, trained and scored (resumable); writes commonsense.csv / .md / .png in root."""
    g = s.grid
    root.mkdir(parents=True, exist_ok=True)
    runs = runs or root / "runs"
    lrs, tried = pick_lrs(runs, g)
    trained = {}  # (row name, seed) -> (metrics, {scoring: eval row}), trained and scored in the grids' order
    for method, fraction, seed in g.cells():
        trained[_key(method, fraction), seed] = _train_and_score(s, runs, method, lrs[method], fraction, seed)
        if fraction < 1 and method in s.equal_steps:  # as many steps as this seed's run on all the data
            # scored at once, like every run: its adapter is not committed, so a later checkout could not score it
            steps = _train_and_score(s, runs, method, lrs[method], 1.0, seed)[0]["steps"]
            trained[_key(method, fraction, "equal steps"), seed] = _train_and_score(
                s, runs, method, lrs[method], fraction, seed, max_steps=steps)
    base = {scoring: _scored(root / "base", s, scoring, model=g.model) for scoring in SCORINGS}
    scores = {(name, seed, scoring): evals[scoring] for (name, seed), (_, evals) in trained.items()
              for scoring in SCORINGS}
    names = list(dict.fromkeys(name for name, _ in trained))
    rows = sorted(names, key=lambda n: ("equal steps" in n, not n.endswith("f = 1"), names.index(n)))  # f = 1 first
    references = _references(s)
    report = _report(s, picks_line(lrs, tried), rows, trained, scores, base, references)
    csv_rows = [_csv_row(name, "", row) for name, row in references.items()]
    csv_rows += [_csv_row("base", "", base[sc]) for sc in SCORINGS]
    csv_rows += [_csv_row(name, seed, scores[name, seed, sc], trained[name, seed][0])
                 for name in rows for seed in g.seeds for sc in SCORINGS]

    def publish(folder: Path) -> None:  # each report file replaced whole; the runs are left alone
        write_csv(folder / "commonsense.csv", csv_rows)
        (folder / "commonsense.md").write_text(report)
        if plot:
            _plot(s, rows, scores, base, references, folder / "commonsense.png")
    write_folder(root, publish)
    return report


def _train_and_score(s: CommonsenseGrid, runs: Path, method: str, lr: float, fraction: float, seed: int,
                     max_steps: int | None = None) -> tuple[dict, dict]:
    """One run trained, then scored both ways right away, so that a grid stopped midway has whole rows:
    (its metrics, {scoring: its eval row})."""
    variant = f"steps{max_steps}" if max_steps else ""
    metrics = run_one(runs, s.grid, method, lr, fraction, seed, variant=variant, max_steps=max_steps)
    folder = run_dir(runs, s.grid, method, lr, fraction, seed, variant=variant)
    return metrics, {scoring: _scored(folder, s, scoring) for scoring in SCORINGS}


def _csv_row(name: str, seed, row: dict, metrics: dict | None = None) -> dict:
    """One model x seed x scoring: the accuracy of each set, the average, and what it cost."""
    metrics = metrics or {}
    return {"row": name, "seed": seed, "scoring": row["scoring"], "lr": metrics.get("lr", ""),
            "steps": metrics.get("steps", 0), **{t: round(row["accuracy"][t], 4) for t in TASKS},
            "average": round(row["average"], 4), "trainable_percent": round(row["trainable_percent"], 3),
            "validation_loss": round(metrics["validation_loss"], 5) if metrics else "",
            "train_seconds": round(metrics.get("wall_time_seconds", 0), 1), "scoring_seconds": round(row["seconds"], 1)}


def _report(s, picks, rows, trained, scores, base, references) -> str:
    g = s.grid

    def acc(name: str, sc: str, task: str | None = None) -> list[float]:  # per seed; the average without a task
        return [scores[name, seed, sc]["accuracy"][task] if task else scores[name, seed, sc]["average"]
                for seed in g.seeds]
    lines = [f"# Commonsense reasoning in the papers' protocol: {g.model}", "",
             f"Generative fine-tuning on a {g.max_train_examples:,}-item stratified mix of the eight training sets, "
             f"{g.epochs} epoch(s) of batch {g.batch_size}, {g.max_length} tokens, r = {g.adapter['r']} (alpha "
             f"{g.adapter['lora_alpha']}) on query and value, the last step's adapter; learning rate per method on "
             f"validation loss (seed 0, f = 1; candidates in brackets): {picks}. Test: the same "
             f"{s.items_per_task} items of each set for every model. Accuracy (%), mean ± std over seeds "
             f"{list(g.seeds)}. The first two rows need no model: chance (one over each item's choices) and the "
             "best constant answer (the same choice number for every item of a set, the one most often right: "
             "picked knowing the answers, it is the most a model that ignores the question can score).", ""]
    header = "| model | " + " | ".join(SHORT[t] for t in TASKS) + " | average | trainable % |"
    for sc, title in (("generate", "greedy generation, right when the answer names the right choice"),
                      ("loglik", "log-likelihood, the choice whose answer the model finds likeliest")):
        lines += [f"## Scored by {title}", "", header, "|---" * (len(TASKS) + 3) + "|",
                  *(f"| *{name}* | " + " | ".join(f"*{100 * row['accuracy'][t]:.1f}*" for t in TASKS)
                    + f" | *{100 * row['average']:.1f}* | |" for name, row in references.items()),
                  f"| {g.model} base | " + " | ".join(f"{100 * base[sc]['accuracy'][t]:.1f}" for t in TASKS)
                  + f" | {100 * base[sc]['average']:.1f} | 0 |"]
        for name in rows:
            lines.append(f"| {name} | " + " | ".join(fmt(acc(name, sc, t)) for t in TASKS) + f" | **{fmt(acc(name, sc))}**"
                         f" | {scores[name, g.seeds[0], sc]['trainable_percent']:.2f} |")
        for method, (cells, average, percent) in PAPER_LLAMA_7B.items():
            lines.append(f"| *paper, LLaMA-7B, {method}* | " + " | ".join(f"*{c:.1f}*" for c in cells)
                         + f" | *{average:.1f}* | *{percent:.2f}* |")
        lora = _key("lora", 1.0)
        lines += ["", "Average − LoRA's (f = 1), paired over seeds:", ""]
        lines += [f"- {name}: {paired(acc(name, sc), acc(lora, sc))}" for name in rows if name != lora]
        best = references["best constant answer"]["average"]
        lines += ["", f"Average − the best constant answer's ({100 * best:.1f}), the margin by which a row uses the "
                  "question (a difference between rows that stay below it measures how each fits the answer prior):", ""]
        lines += [f"- {name}: {paired(acc(name, sc), [best] * len(g.seeds))}" for name in rows]
        lines.append("")
    rep30, lora100, lora30 = _key("replora", 0.3), _key("lora", 1.0), _key("lora", 0.3)
    if rep30 in rows and lora100 in rows:
        lines += ["## Claim 2: RepLoRA on 30% of the data matches LoRA on all of it", ""]
        for sc in SCORINGS:
            a, b = acc(rep30, sc), acc(lora100, sc)
            lines.append(f"- {sc}: RepLoRA at 30% {fmt(a)}, LoRA at 100% {fmt(b)}; difference {paired(a, b)}. "
                         + _claim_2_reading(a, b, acc(lora30, sc) if lora30 in rows else None))
        control = _key("replora", 0.3, "equal steps")
        if control in rows:
            steps = trained[control, g.seeds[0]][0]["steps"]
            lines += [f"- Control, RepLoRA on 30% for the {steps} steps of 100% (so only the data differs): "
                      + "; ".join(f"{sc} {fmt(acc(control, sc))}, − LoRA at 100%: {paired(acc(control, sc), acc(lora100, sc))}"
                                  for sc in SCORINGS)]
        lines.append("")
    hours = sum(m["wall_time_seconds"] for m, _ in trained.values()) / 3600
    scoring_hours = sum(r["seconds"] for r in scores.values()) / 3600
    lines += [f"Cost: {hours:.1f} h of training and {scoring_hours:.1f} h of scoring for the {len(trained)} runs "
              "above (the learning-rate picks' other runs not counted); every run's seconds are in the CSV."]
    return "\n".join(lines) + "\n"


def _claim_2_reading(rep30: list[float], lora100: list[float], lora30: list[float] | None) -> str:
    """The verdict, beside the control a match at 30% needs: LoRA's own loss from 30% of the data."""
    outcome = claim_2_outcome(rep30, lora100, lora30)
    verdict = VERDICTS[outcome]
    if lora30 is None:
        return verdict
    reading = f"LoRA at 30% − LoRA at 100%: {paired(lora30, lora100)}"
    if outcome == "not_resolvable":
        return (f"Not resolvable here: {reading}; LoRA itself loses no more than its spread over seeds from 30% of "
                "the data, so a match at 30% cannot show RepLoRA's sample efficiency.")
    return f"{verdict} {reading}."


METHOD_COLORS = {"lora": "C0", "dora": "C1", "moslora": "C2", "replora": "C3"}  # as in the theory plot


def _plot(s, rows, scores, base, references, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = s.grid.seeds
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, sc in zip(axes, SCORINGS):
        stats = [mean_std([scores[name, seed, sc]["average"] for seed in seeds]) for name in rows]
        ax.bar(range(len(rows)), [100 * m for m, _ in stats], yerr=[100 * d for _, d in stats], capsize=4,
               color=[METHOD_COLORS.get(name.split()[0].rstrip(","), "C7") for name in rows])  # one colour a method
        for i, name in enumerate(rows):  # every seed as a dot, so the spread is seen, not only summarized
            ax.scatter([i] * len(seeds), [100 * scores[name, seed, sc]["average"] for seed in seeds], color="k", s=8)
        ax.axhline(100 * base[sc]["average"], color="gray", linestyle="--", label=f"{s.grid.model} base")
        for (name, row), style in zip(references.items(), (":", "-.")):
            ax.axhline(100 * row["average"], color="gray", linestyle=style, label=name)
        ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"average of the eight test sets, {sc}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel(f"accuracy (%), mean ± std over {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
