"""`python -m research sample-efficiency | ablations`: the papers' claims as grids of real training runs.

Every run is an ordinary `train()` run in its own folder under `<grid folder>/runs`, named by its
settings and shared by the experiments of that grid (RepLoRA's default runs serve both the sample-efficiency
grid and the ablations); a run whose metrics.json exists is skipped and an interrupted one resumes, so a
grid can be finished over several sittings. Learning rates are picked per method on the validation split
(seed 0, full training fraction), never on test.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from replora.methods import METHODS
from replora.legacy import OMITTED_BEFORE
from replora.saving import write_folder
from replora.training import FULL, TrainSettings, train
from replora.training.settings import HEAD, NO_ADAPTER

from .reports import fmt, mean_std, paired, write_csv


@dataclass
class Grid:
    model: str
    dataset: str
    methods: tuple[str, ...]
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    lrs: dict[str, tuple[float, ...]]  # the validation grid of each method
    epochs: int
    max_train_examples: int | None
    max_eval_examples: int | None
    max_length: int
    batch_size: int = 32
    adapter: dict = field(default_factory=lambda: {"r": 8, "lora_alpha": 16})
    image_size: int | None = None
    max_new_tokens: int = 32  # generative grids: the most tokens of each test answer
    # Methods trained on all the data only: reference lines (full fine-tuning, the linear probe), whose question
    # is not how they fall off with less data, or methods a claim about fractions does not name.
    full_data_only: tuple[str, ...] = ()
    extend_edges: bool = False  # pick_lrs: a best rate at the edge of lrs adds the next one beyond it
    options: dict[str, dict] = field(default_factory=dict)  # adapter options per method, beyond its defaults
    report_only: bool = False  # read finished runs only (python -m research report): a missing one is NotFinished

    @classmethod
    def from_json(cls, saved: dict) -> "Grid":
        """The grid a report's settings file recorded (JSON has lists where the grid has tuples). A grid recorded
        before grids had options ran RepLoRA as replora 0.2 did (its runs' names say nothing of it)."""
        tuples = {k: tuple(saved[k]) for k in ("methods", "fractions", "seeds", "full_data_only")}
        options = saved.get("options", {"replora": LEGACY_REPLORA})
        return cls(**{**saved, **tuples, "options": options, "lrs": {m: tuple(v) for m, v in saved["lrs"].items()}})

    def cells(self) -> list[tuple[str, float, int]]:
        """(method, fraction, seed) of every run, seeds outermost: a partial grid is already a paired comparison."""
        return [(m, f, s) for s in self.seeds for f in self.fractions for m in self.methods
                if f == 1.0 or m not in self.full_data_only]


class NotFinished(Exception):
    """A report-only pass met a run (or a score) that is not there yet."""


ADAPTER_LRS = (1e-3, 3e-3)
GRIDS = {
    # Sized to finish in about two hours on 2 CPU cores: a 3,000-snippet training cap (stratified, the
    # same for every run), 1,000 validation / 1,000 test snippets, 48 tokens, 3 epochs.
    # Every registered adapter method (replora.methods.METHODS), then full fine-tuning.
    "minilm-rt": Grid(model="minilm", dataset="rotten_tomatoes",
                      methods=(*METHODS, FULL), fractions=(0.1, 0.3, 0.5, 1.0),
                      seeds=(0, 1, 2), lrs={**{m: ADAPTER_LRS for m in METHODS}, FULL: (3e-5, 1e-4)},
                      epochs=3, max_train_examples=3000, max_eval_examples=1000, max_length=48),
    # The image protocol (RepLoRA tables 2-3, figure 2): DINOv2-S on the VTAB-1K-like CIFAR-10 split (800
    # training / 200 validation images), 112 px, 10 epochs of 32 (250 steps at f = 1), r = 8 on query/value,
    # tested on a fixed 3,000 of the 9,000 held-out images (a 0.7-point standard error, paired across methods).
    # 7 minutes per adapter run at f = 1 on 2 idle CPU cores (measured), about 4.5 hours for the whole grid with
    # its learning-rate edges extended (the first picks all sat at an edge; RepLoRA collapsed at 3e-3).
    "dinov2-cifar10": Grid(model="dinov2-small", dataset="cifar10", methods=(*METHODS, FULL, HEAD),
                           fractions=(0.1, 0.3, 1.0), seeds=(0, 1, 2),
                           lrs={**{m: ADAPTER_LRS for m in METHODS}, FULL: (1e-5, 3e-5), HEAD: (3e-3, 1e-2)},
                           epochs=10, max_train_examples=None, max_eval_examples=3000, max_length=64,
                           image_size=112, full_data_only=(FULL, HEAD), extend_edges=True),
    # SmolLM2-135M on social_iqa (3 choices: 3 sequences per question): about 10 minutes a run at f = 1 on
    # 2 CPU cores with a 600-question training cap, 195 validation / 300 test questions, 64 tokens, 2 epochs;
    # two fractions and no full fine-tuning line keep the 28 runs near 3.5 hours.
    "smollm2-siqa": Grid(model="smollm2", dataset="social_iqa", methods=tuple(METHODS),
                         fractions=(0.3, 1.0), seeds=(0, 1, 2), lrs={m: ADAPTER_LRS for m in METHODS},
                         epochs=2, max_train_examples=600, max_eval_examples=300, max_length=64, batch_size=16),
}

# RepLoRA's options, one change at a time from the default (tanh, h = r, block sharing, diagonal seed).
ABLATIONS = {
    "default (tanh, h=r, block, diagonal)": {},
    "identity (linear reparameterization)": {"replora_activation": "identity"},
    "gelu": {"replora_activation": "gelu"},
    "h=4": {"replora_hidden_size": 4},
    "h=32": {"replora_hidden_size": 32},
    "no sharing": {"replora_sharing": "none"},
    "full seed": {"replora_seed": "full"},
}


# RepLoRA as replora 0.2 ran it (issue 31): every RepLoRA run committed before 0.3 used it.
LEGACY_REPLORA = dict(OMITTED_BEFORE[3])


def run_key(method: str, lr: float, fraction: float, seed: int, variant: str = "") -> str:
    return f"{method}{'-' + variant if variant else ''}-lr{lr:g}-f{fraction:g}-s{seed}"


def variant_of(method: str, options: dict) -> str:
    """A run name's tag for a method's options: those that differ from what replora 0.2 ran, whose runs (every
    one committed before 0.3) carry no tag ('activation_identity'; today's RepLoRA default names its design)."""
    if method not in METHODS:
        return ""
    spec = METHODS[method].options
    then = {k: o.default for k, o in spec.items()} | {k: v for k, v in LEGACY_REPLORA.items() if k in spec}
    chosen = {k: o.default for k, o in spec.items()} | options
    return "-".join(f"{k.split('_', 1)[1]}_{v}" for k, v in chosen.items() if then[k] != v)


def run_options(grid: Grid, method: str, adapter_extra: dict | None = None) -> dict:
    """A run's adapter options beyond the grid's adapter: the grid's for the method, then `adapter_extra`."""
    return {**grid.options.get(method, {}), **(adapter_extra or {})}


def run_dir(runs: Path, grid: Grid, method: str, lr: float, fraction: float, seed: int,
            adapter_extra: dict | None = None, variant: str = "") -> Path:
    """The run's folder: its name says the method's options (variant_of), after any other `variant` tag."""
    tag = "-".join(t for t in (variant, variant_of(method, run_options(grid, method, adapter_extra))) if t)
    return runs / run_key(method, lr, fraction, seed, tag)


def run_one(runs: Path, grid: Grid, method: str, lr: float, fraction: float, seed: int,
            adapter_extra: dict | None = None, variant: str = "", max_steps: int | None = None,
            on_step=None) -> dict:
    """One run of the grid, in the runs folder; skipped when finished, resumed when interrupted. Its adapter:
    the grid's, the grid's options for the method, then `adapter_extra`."""
    out = run_dir(runs, grid, method, lr, fraction, seed, adapter_extra, variant)
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    if grid.report_only:
        raise NotFinished(f"{out} has not finished")
    adapter = {} if method in NO_ADAPTER else {**grid.adapter, **run_options(grid, method, adapter_extra)}
    settings = TrainSettings(model=grid.model, dataset=grid.dataset, method=method, fraction=fraction, seed=seed,
                             lr=lr, epochs=grid.epochs, max_train_examples=grid.max_train_examples,
                             max_eval_examples=grid.max_eval_examples, max_length=grid.max_length,
                             batch_size=grid.batch_size, image_size=grid.image_size, max_steps=max_steps,
                             max_new_tokens=grid.max_new_tokens, output=str(out), resume=True, adapter=adapter,
                             keep="last")  # the grids' protocol: the last step's adapter, as their results were made
    return train(settings, on_step=on_step)


def validation_score(metrics: dict) -> float:
    """Higher is better: the validation accuracy, or for generative runs (which have none) minus the loss."""
    return metrics["validation_accuracy"] if "validation_accuracy" in metrics else -metrics["validation_loss"]


def pick_lrs(runs: Path, grid: Grid) -> tuple[dict[str, float], dict[str, tuple[float, ...]]]:
    """(each method's learning rate, the rates it was picked from): the best validation score at fraction
    1.0, seed 0. With grid.extend_edges, a best rate at the edge of two or more candidates adds the next
    rate beyond it on the 1-3-10 ladder, once per side, so that the pick is bracketed when it can be."""
    chosen, tried = {}, {}
    for method in grid.methods:
        scores, extended = {}, set()
        candidates = list(grid.lrs[method])
        search = grid.extend_edges and len(candidates) > 1  # a single rate given is a choice: never extended
        while True:
            scores.update({lr: validation_score(run_one(runs, grid, method, lr, 1.0, grid.seeds[0]))
                           for lr in candidates if lr not in scores})
            best = max(scores, key=lambda lr: (scores[lr], -lr))
            side = "up" if best == max(scores) else "down" if best == min(scores) else None
            if not search or side is None or side in extended:
                break
            extended.add(side)
            candidates.append(next_rate(best, up=side == "up"))
        chosen[method], tried[method] = best, tuple(sorted(scores))
    return chosen, tried


def next_rate(lr: float, up: bool) -> float:
    """lr's neighbour on the 1-3-10 ladder of rates (3e-4, 1e-3, 3e-3, 1e-2, ...)."""
    exponent = math.floor(math.log10(lr))
    ladder = [float(f"{k}e{e}") for e in range(exponent - 1, exponent + 2) for k in (1, 3)]
    return min(x for x in ladder if x > lr * 1.01) if up else max(x for x in ladder if x < lr * 0.99)


def picks_line(chosen: dict[str, float], tried: dict[str, tuple[float, ...]]) -> str:
    """'lora 0.003 (0.001/0.003/0.01)': each pick among the rates it was picked from; a pick at an edge of
    three or more is flagged (its best rate may lie beyond; of two, every pick is at an edge)."""
    def edge(m):
        return " at the edge" if len(tried[m]) > 2 and chosen[m] in (min(tried[m]), max(tried[m])) else ""
    return ", ".join(f"{m} {lr:g} ({'/'.join(f'{x:g}' for x in tried[m])}{edge(m)})" for m, lr in chosen.items())


def _row(m: dict, variant: str = "") -> dict:
    return {"method": m["method"], "variant": variant, "lr": m["lr"], "fraction": m["fraction"], "seed": m["seed"],
            "validation_accuracy": round(m["validation_accuracy"], 5), "test_accuracy": round(m["test_accuracy"], 5),
            "trainable_parameters": m["trainable_parameters"], "train_examples": m["train_examples"],
            "seconds": round(m["wall_time_seconds"], 1)}


# Claim 2's outcomes and how the reports say them.
VERDICTS = {"held": "Held here.", "not_resolvable": "Not resolvable here.",
            "within_spread": "Not reached here, by less than the spread over seeds.", "not_held": "Did not hold here."}


def claim_2_outcome(rep30: list[float], lora100: list[float], lora30: list[float] | None = None) -> str:
    """'Matches' read as: RepLoRA's mean at 30% is at least LoRA's at 100%; a shortfall smaller than the
    spread of the paired differences is reported as such, not as a match. Given LoRA at 30%, a match where
    LoRA itself loses no more than its spread from less data cannot show sample efficiency. One of VERDICTS."""
    mean, std = mean_std([x - y for x, y in zip(rep30, lora100)])
    if mean >= 0:
        if lora30 is not None:
            loss, spread = mean_std([x - y for x, y in zip(lora30, lora100)])
            if -loss <= spread:
                return "not_resolvable"
        return "held"
    return "within_spread" if -mean <= std else "not_held"


def claim_2_verdict(rep30: list[float], lora100: list[float], lora30: list[float] | None = None) -> str:
    """claim_2_outcome, as the reports say it."""
    return VERDICTS[claim_2_outcome(rep30, lora100, lora30)]


def sample_efficiency(grid: Grid, root: Path, runs: Path | None = None, plot: bool = True) -> str:
    """Every method x fraction x seed at its picked learning rate; writes sample_efficiency.csv / .md /
    .png in root, the runs in `runs` (default root/runs). Returns the markdown report."""
    root.mkdir(parents=True, exist_ok=True)
    runs = runs or root / "runs"
    lrs, tried = pick_lrs(runs, grid)
    results = {(m, f, s): run_one(runs, grid, m, lrs[m], f, s) for m, f, s in grid.cells()}
    picks = picks_line(lrs, tried)
    acc = lambda method, fraction: [results[method, fraction, s]["test_accuracy"] for s in grid.seeds]  # noqa: E731
    ran = lambda method, fraction: (method, fraction, grid.seeds[0]) in results  # noqa: E731
    inputs = f"{grid.image_size} px images" if grid.image_size else f"max {grid.max_length} tokens"
    lines = [f"# Sample efficiency: {grid.model} on {grid.dataset}", "",
             f"Test accuracy (%), mean ± std over seeds {list(grid.seeds)}; learning rate picked per method on "
             f"validation (from the candidates in brackets): {picks}. Training cap "
             f"{grid.max_train_examples or 'none'}, {grid.epochs} epochs, {inputs}, r = {grid.adapter.get('r')}.", "",
             "| method | trainable | " + " | ".join(f"f = {f:g}" for f in grid.fractions) + " | s / run at f = 1 |",
             "|---|---|" + "---|" * len(grid.fractions) + "---|"]
    for method in grid.methods:
        trainable = results[method, grid.fractions[-1], grid.seeds[0]]["trainable_parameters"]
        seconds = [results[method, grid.fractions[-1], s]["wall_time_seconds"] for s in grid.seeds]
        lines.append(f"| {method} | {trainable:,} | " + " | ".join(fmt(acc(method, f)) if ran(method, f) else "—"
                                                                    for f in grid.fractions)
                     + f" | {statistics.fmean(seconds):.0f} |")
    others = [m for m in grid.methods if m != "lora"]
    if "lora" in grid.methods and others:
        lines += ["", "Each method − LoRA at the same fraction, paired over seeds: mean ± std of the differences "
                      "in points (seeds better):", "",
                  "| method | " + " | ".join(f"f = {f:g}" for f in grid.fractions) + " |",
                  "|---|" + "---|" * len(grid.fractions)]
        lines += [f"| {m} | " + " | ".join(paired(acc(m, f), acc("lora", f), short=True) if ran(m, f) else "—"
                                             for f in grid.fractions) + " |" for m in others]
    for method, name in (("replora", "RepLoRA"), ("moslora", "MoSLoRA")):  # the claims' comparisons, with t
        if method in grid.methods and "lora" in grid.methods:
            lines += ["", f"{name} − LoRA, paired over seeds:", ""]
            lines += [f"- f = {f:g}: {paired(acc(method, f), acc('lora', f))}" for f in grid.fractions if ran(method, f)]
    if "replora" in grid.methods and "lora" in grid.methods:
        if 0.3 in grid.fractions and 1.0 in grid.fractions:
            rep30, lora100 = acc("replora", 0.3), acc("lora", 1.0)
            lines += ["", f"**Claim 2 (RepLoRA at 30% of the data matches LoRA at 100%)**: RepLoRA at 30%: "
                          f"{fmt(rep30)}; LoRA at 100%: {fmt(lora100)}; difference "
                          f"{paired(rep30, lora100)}. {claim_2_verdict(rep30, lora100)}"]
    total = sum(m["wall_time_seconds"] for m in results.values())
    lines += ["", f"Wall time: {total / 3600:.1f} h for the {len(results)} runs above (the learning-rate picks' "
                  "other runs not counted); every run's seconds are in the CSV."]
    report = "\n".join(lines) + "\n"

    def publish(folder: Path) -> None:  # each report file is replaced whole; the runs are left alone
        write_csv(folder / "sample_efficiency.csv", [_row(m) for m in results.values()])
        (folder / "sample_efficiency.md").write_text(report)
        if plot:
            _plot(results, grid, folder / "sample_efficiency.png")
    write_folder(root, publish)
    return report


def _plot(results: dict, grid: Grid, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    references = {FULL: ("gray", "--", "full fine-tuning"), HEAD: ("gray", ":", "linear probe")}
    for method in grid.methods:
        fractions = [f for f in grid.fractions if (method, f, grid.seeds[0]) in results]
        stats = [mean_std([results[method, f, s]["test_accuracy"] for s in grid.seeds]) for f in fractions]
        means, stds = [100 * m for m, _ in stats], [100 * s for _, s in stats]
        if method in references:  # a reference line at its full-data accuracy
            color, style, name = references[method]
            ax.axhline(means[-1], color=color, linestyle=style, label=f"{name} (f = 1)")
            continue
        ax.errorbar(fractions, means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xlabel("fraction of the training data")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{grid.model} on {grid.dataset}: mean ± std over {len(grid.seeds)} seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ablations(grid: Grid, root: Path, runs: Path | None = None) -> str:
    """RepLoRA's options one at a time, at fraction 1.0, every seed, at RepLoRA's picked learning rate;
    writes ablations.csv / ablations.md in root, the runs in `runs` (default root/runs)."""
    root.mkdir(parents=True, exist_ok=True)
    runs = runs or root / "runs"
    lr = pick_lrs(runs, dataclasses.replace(grid, methods=("replora",)))[0]["replora"]
    results = {}
    for seed in grid.seeds:
        for name, options in ABLATIONS.items():
            results[name, seed] = run_one(runs, grid, "replora", lr, 1.0, seed, options)
    val = {n: [results[n, s]["validation_accuracy"] for s in grid.seeds] for n in ABLATIONS}
    default = next(iter(ABLATIONS))
    lines = [f"# RepLoRA ablations: {grid.model} on {grid.dataset}", "",
             f"Accuracy (%), mean ± std over seeds {list(grid.seeds)}, lr {lr:g}, full training cap; the last "
             "column pairs each variant with the default seed by seed on validation.", "",
             "| variant | trainable | validation | test | validation − default |", "|---|---|---|---|---|"]
    best = max(ABLATIONS, key=lambda n: statistics.fmean(val[n]))
    for name in ABLATIONS:
        test = [results[name, s]["test_accuracy"] for s in grid.seeds]
        mark = " (best on validation)" if name == best else ""
        versus = "" if name == default else paired(val[name], val[default])
        lines.append(f"| {name}{mark} | {results[name, grid.seeds[0]]['trainable_parameters']:,} | {fmt(val[name])} | "
                     f"{fmt(test)} | {versus} |")
    # The rule, fixed before any run: the default moves only to a variant whose mean paired advantage on
    # validation exceeds the spread of that advantage over seeds; a smaller edge is noise at 3 seeds.
    gain, spread = mean_std([a - b for a, b in zip(val[best], val[default])])
    moves = best != default and len(grid.seeds) > 1 and gain > spread
    lines += ["", f"Default rule (validation only): {'move the default to ' + repr(best) if moves else 'keep the default'}"
                  f"; best on validation: {best}."]
    report = "\n".join(lines) + "\n"

    def publish(folder: Path) -> None:
        write_csv(folder / "ablations.csv", [_row(m, name) for (name, _), m in results.items()])
        (folder / "ablations.md").write_text(report)
    write_folder(root, publish)
    return report
