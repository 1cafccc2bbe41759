"""`python -m research update-rank`: how large each method's update dW = s·B A is, and how many directions
it uses, step by step: the diagnostic of RepLoRA's rank collapse (issue 31), kept for every method.

Per target layer, from the singular values σ of its dW (the active adapter's `delta_weight()`):
  top share    σ₁² / Σσ²: 1.0 = a rank-one update; a rank-r update spread evenly gives 1/r
  stable rank  Σσ² / σ₁² = 1 / top share
and per step the size of the whole update ‖dW‖ (all targets) and of its change ‖dW_k − dW_{k−1}‖.

Three parts, each resumable:
  probe        the plain PyTorch net of issue 31 (4 blocks, query/value Linear 384x384, a 10-way head, random
               data), r = 8, alpha 16, AdamW, 60 steps, every method and RepLoRA design at lr 1e-3 and 3e-3:
               seconds, no data files. `probe.md` / `probe.csv`.
  trajectory   the same statistics recorded through `train(..., on_step=...)` during real runs of the image
               protocol (DINOv2-S on CIFAR-10, the dinov2-cifar10 grid's settings) and of one text protocol
               (MiniLM on Rotten Tomatoes, the minilm-rt grid's), each run's trajectory in its folder's
               `update_rank.jsonl`; `trajectory.md` / `.csv` / `.png`.
  screen       RepLoRA's designs on the image protocol, one seed, full data: validation accuracy (the pick),
               and the trajectory statistics at the end; `screen.md` / `.csv`.
The runs (named as the grids name theirs) live in <output>/runs (image) and <output>/runs-text, apart from
the grids' own: every one of them has its trajectory.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import torch
from torch import nn

import replora
from replora.model import adapted_layers

from .experiments import GRIDS, Grid, LEGACY_REPLORA, NotFinished, run_dir, run_one
from .reports import quartiles, write_csv

# RepLoRA's generator designs, each spelled out in full (so a run's name and meaning do not move with the
# library's defaults) and listed in the order the screen trains them: the contenders for the default first.
ORTHOGONAL = {"replora_hidden_init": "orthogonal", "replora_hidden_bias": "none", "replora_head_bias": "none"}
DESIGNS = {
    "orthogonal, no biases": ORTHOGONAL,
    "0.2 (uniform init, shared biases)": LEGACY_REPLORA,
    "identity init, no biases": {**ORTHOGONAL, "replora_hidden_init": "identity"},
    "head bias shared": {**ORTHOGONAL, "replora_head_bias": "shared"},
    "uniform init, no biases": {**ORTHOGONAL, "replora_hidden_init": "uniform"},
    "hidden bias shared": {**ORTHOGONAL, "replora_hidden_bias": "shared"},
    "identity activation": {**ORTHOGONAL, "replora_activation": "identity"},
    "gelu": {**ORTHOGONAL, "replora_activation": "gelu"},
    "h = 2r": {**ORTHOGONAL, "replora_hidden_size": 16},
    "h = 4r": {**ORTHOGONAL, "replora_hidden_size": 32},
    "head bias per row": {**ORTHOGONAL, "replora_head_bias": "per_row"},
    "full seed": {**ORTHOGONAL, "replora_seed": "full"},
}


def update_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each target's dW (float32, detached), by path: the active adapter's s·B A (DoRA: before its norm)."""
    out = {}
    with torch.no_grad():
        for path, layer in adapted_layers(model).items():
            out[path] = layer.lora[layer.active_adapter].delta_weight().detach().float().clone()
    return out


def summarize(updates: dict[str, torch.Tensor], previous: dict[str, torch.Tensor] | None = None) -> dict:
    """The step's numbers: ‖dW‖ over all targets, ‖ΔdW‖ since `previous`, and top share / stable rank
    (mean, min, max over targets)."""
    shares = []
    for dW in updates.values():
        sv = torch.linalg.svdvals(dW).pow(2)
        total = sv.sum().item()
        shares.append(sv[0].item() / total if total > 0 else float("nan"))
    norm = sum(dW.pow(2).sum().item() for dW in updates.values()) ** 0.5
    row = {"norm": norm, "top_share_mean": statistics.fmean(shares), "top_share_min": min(shares),
           "top_share_max": max(shares), "stable_rank_mean": statistics.fmean(1 / s for s in shares)}
    if previous is not None:
        row["step_norm"] = sum((updates[k] - previous[k]).pow(2).sum().item() for k in updates) ** 0.5
    return row


def publish(root: Path, name: str, rows: list[dict], report: str) -> None:
    """<name>.csv (floats rounded) and <name>.md in root."""
    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / f"{name}.csv", [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
                                     for row in rows])
    (root / f"{name}.md").write_text(report)


def end_of_run(trajectory: list[dict]) -> dict:
    """A traced run in numbers: its mean step (first 10, all), and its rank statistics at the last step."""
    steps = [t["step_norm"] for t in trajectory if "step_norm" in t]
    ranked = [t for t in trajectory if "top_share_mean" in t]
    nan = float("nan")
    return {"norm_end": trajectory[-1]["norm"] if trajectory else nan,
            "step_norm_first10": statistics.fmean(steps[:10]) if steps else nan,
            "step_norm_mean": statistics.fmean(steps) if steps else nan,
            "top_share_end": ranked[-1]["top_share_mean"] if ranked else nan,
            "top_share_max_end": ranked[-1]["top_share_max"] if ranked else nan,
            "stable_rank_end": ranked[-1]["stable_rank_mean"] if ranked else nan}


# --- the probe: issue 31's plain net --------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.query, self.value = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return x + self.value(torch.tanh(self.query(x))) / 2


class ProbeNet(nn.Module):
    def __init__(self, width: int = 384, blocks: int = 4, classes: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def probe_run(method: str, lr: float, options: dict | None = None, steps: int = 60, seed: int = 0,
              width: int = 384, r: int = 8) -> list[dict]:
    """Train the probe net's query/value adapters (its head frozen, as the base) on random data; one row per
    step: the summary of every target's update after that step."""
    torch.manual_seed(seed)
    model = ProbeNet(width)
    data = torch.randn(steps, 32, width, generator=torch.Generator().manual_seed(seed + 1))
    labels = torch.randint(0, 10, (steps, 32), generator=torch.Generator().manual_seed(seed + 2))
    config = replora.AdapterConfig(method=method, r=r, lora_alpha=2 * r, target_modules=["query", "value"],
                                   **(options or {}))
    replora.inject(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rows, previous = [], update_stats(model)
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(data[step]), labels[step])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        updates = update_stats(model)
        rows.append({"step": step + 1, **summarize(updates, previous)})
        previous = updates
    return rows


def probe_contenders() -> dict[str, tuple[str, dict]]:
    """name -> (method, options): every registered method at its defaults, and every RepLoRA design."""
    contenders = {m: (m, {}) for m in replora.METHODS if m != "replora"}
    contenders.update({f"replora {name}": ("replora", options) for name, options in DESIGNS.items()})
    return contenders


def probe(root: Path, lrs: tuple[float, ...] = (1e-3, 3e-3), steps: int = 60, width: int = 384) -> str:
    rows = []
    for name, (method, options) in probe_contenders().items():
        for lr in lrs:
            trajectory = probe_run(method, lr, options, steps, width=width)
            first, last = trajectory[0], trajectory[-1]
            rows.append({"contender": name, "lr": lr, "norm_after_1": first["norm"], "norm_after": last["norm"],
                         "step_norm_mean": statistics.fmean(t["step_norm"] for t in trajectory),
                         "top_share_mean": last["top_share_mean"], "top_share_min": last["top_share_min"],
                         "top_share_max": last["top_share_max"], "stable_rank_mean": last["stable_rank_mean"]})
    lora = {row["lr"]: row for row in rows if row["contender"] == "lora"}
    lines = ["# The update's rank and size: the probe net of issue 31", "",
             f"4 blocks (query/value Linear {width}x{width}, tanh between), a frozen 10-way head, random data, batch 32, "
             f"r = 8, alpha 16, AdamW, {steps} steps, seed 0; dW of each of the 8 targets after the last step. "
             "Top share: σ₁²/Σσ² (1.0 = rank one; LoRA's spread is the reference). Step: the mean ‖ΔdW‖ per "
             "step over all targets, and its ratio to LoRA's at the same rate.", "",
             "| contender | lr | ‖dW‖ after 1 step | ‖dW‖ at the end | mean step | step / LoRA's | top share "
             "(mean, min–max) | stable rank |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row["step_norm_mean"] / lora[row["lr"]]["step_norm_mean"]
        lines.append(f"| {row['contender']} | {row['lr']:g} | {row['norm_after_1']:.3f} | {row['norm_after']:.2f} | "
                     f"{row['step_norm_mean']:.3f} | {ratio:.2f} | {row['top_share_mean']:.2f} "
                     f"({row['top_share_min']:.2f}–{row['top_share_max']:.2f}) | {row['stable_rank_mean']:.1f} |")
    report = "\n".join(lines) + "\n"
    publish(root, "probe", rows, report)
    return report


# --- trajectories of real runs --------------------------------------------------------------------------
class Recorder:
    """on_step for train(): every step's ‖dW‖ and ‖ΔdW‖, and every `every` steps the rank statistics,
    appended to <run>/update_rank.jsonl as they come (a resumed run appends; the last row of a step wins)."""

    def __init__(self, path: Path, every: int = 5):
        self.path, self.every, self.previous = path, every, None

    def __call__(self, model: nn.Module, step: int) -> None:
        updates = update_stats(model)
        if step % self.every == 0 or step == 1:
            row = summarize(updates, self.previous)
        else:
            row = {"norm": sum(d.pow(2).sum().item() for d in updates.values()) ** 0.5}
            if self.previous is not None:
                row["step_norm"] = sum((updates[k] - self.previous[k]).pow(2).sum().item() for k in updates) ** 0.5
        self.previous = updates
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **row}) + "\n")


def read_trajectory(run: Path) -> list[dict]:
    path = run / "update_rank.jsonl"
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def traced_run(runs: Path, grid: Grid, method: str, lr: float, options: dict | None = None, seed: int = 0,
               fraction: float = 1.0) -> tuple[dict, list[dict]]:
    """One run of the grid (named as the grid names it), recording its trajectory; a finished run is read.
    A run finished without a trajectory (trained before this diagnostic) gets an empty one, and is not
    trained again."""
    out = run_dir(runs, grid, method, lr, fraction, seed, options)
    metrics = run_one(runs, grid, method, lr, fraction, seed, options, on_step=Recorder(out / "update_rank.jsonl"))
    return metrics, read_trajectory(out)


# protocol -> (its grid, its runs folder under the output): run names do not say the model, so one folder each.
PROTOCOLS = {"image": ("dinov2-cifar10", "runs"), "text": ("minilm-rt", "runs-text")}


def trajectory_contenders() -> list[tuple[str, str, float, dict]]:
    """(name, method, lr, options): LoRA, RepLoRA 0.2 and today's RepLoRA, at 3e-3 then 1e-3."""
    out = []
    for lr in (3e-3, 1e-3):
        out += [(f"lora {lr:g}", "lora", lr, {}), (f"replora 0.2 {lr:g}", "replora", lr, LEGACY_REPLORA),
                (f"replora {lr:g}", "replora", lr, {})]
    return out


def trajectories(root: Path, report_only: bool = False, train: tuple[str, ...] = tuple(PROTOCOLS)) -> str:
    """The traced runs of every protocol; those of protocols not in `train` are read, never trained."""
    rows, curves = [], {}
    for protocol, (grid_name, folder) in PROTOCOLS.items():
        grid = dataclasses.replace(GRIDS[grid_name], report_only=report_only or protocol not in train)
        runs = root / folder
        for name, method, lr, options in trajectory_contenders():
            try:
                metrics, trajectory = traced_run(runs, grid, method, lr, options)
            except NotFinished:  # (report_only)
                continue
            if not trajectory:
                continue
            curves[protocol, name] = trajectory
            rows.append({"protocol": protocol, "contender": name, "steps": trajectory[-1]["step"],
                         "validation_accuracy": metrics["validation_accuracy"], **end_of_run(trajectory)})
    lines = ["# The update's rank and size over real training runs", "",
             "Seed 0, full training data, the grids' settings (image: DINOv2-S, CIFAR-10 800 images, 112 px, 250 "
             "steps; text: MiniLM, Rotten Tomatoes, 3,000 snippets, 282 steps), query/value, r = 8. Step: ‖ΔdW‖ "
             "over all targets, the mean of the first 10 steps and of all; top share and stable rank at the last "
             "step (mean over targets; max in brackets).", "",
             "| protocol | contender | validation | ‖dW‖ at the end | step, first 10 | step, all | top share (max) | "
             "stable rank |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['protocol']} | {row['contender']} | {100 * row['validation_accuracy']:.1f} | "
                     f"{row['norm_end']:.2f} | {row['step_norm_first10']:.4f} | {row['step_norm_mean']:.4f} | "
                     f"{row['top_share_end']:.2f} ({row['top_share_max_end']:.2f}) | {row['stable_rank_end']:.1f} |")
    report = "\n".join(lines) + "\n"
    if rows:
        publish(root, "trajectory", rows, report)
        _plot(curves, root / "trajectory.png")
    return report


def _plot(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = sorted({p for p, _ in curves})
    fig, axes = plt.subplots(2, len(protocols), figsize=(5.5 * len(protocols), 7), squeeze=False)
    for col, protocol in enumerate(protocols):
        for (p, name), trajectory in curves.items():
            if p != protocol:
                continue
            ranked = [t for t in trajectory if "top_share_mean" in t]
            style = "--" if "3e-3" in name or "0.003" in name else "-"
            axes[0][col].plot([t["step"] for t in trajectory], [t["norm"] for t in trajectory], style, label=name)
            axes[1][col].plot([t["step"] for t in ranked], [t["top_share_mean"] for t in ranked], style, label=name)
        axes[0][col].set(title=f"{protocol}: ‖dW‖ (all targets)", xlabel="step", yscale="log")
        axes[1][col].set(title=f"{protocol}: top singular share of dW (mean over targets)", xlabel="step",
                         ylim=(0, 1.05))
        axes[1][col].axhline(1 / 8, color="gray", linestyle=":", linewidth=1)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the screen: RepLoRA's designs on the image protocol -------------------------------------------------
def screen(root: Path, lrs: tuple[float, ...] = (3e-3,), report_only: bool = False) -> str:
    """LoRA, then every design at `lrs` (the first two designs at 1e-3 too), seed 0, fraction 1, in root/runs."""
    grid_name, folder = PROTOCOLS["image"]
    grid = dataclasses.replace(GRIDS[grid_name], report_only=report_only)
    runs = root / folder
    lora = {}
    for lr in sorted(set(lrs) | {1e-3}, reverse=True):  # LoRA at 1e-3 is the trajectory part's: read if there
        try:
            metrics, trajectory = traced_run(runs, grid if lr in lrs else dataclasses.replace(grid, report_only=True),
                                             "lora", lr)
        except NotFinished:
            continue
        lora[lr] = (metrics["validation_accuracy"], end_of_run(trajectory)["step_norm_mean"])
    rows = []
    for i, (name, options) in enumerate(DESIGNS.items()):
        for lr in sorted(set(lrs) | ({1e-3} if i < 2 else set()), reverse=True):
            try:
                metrics, trajectory = traced_run(runs, grid, "replora", lr, options)
            except NotFinished:
                continue
            rows.append({"design": name, "lr": lr, "validation_accuracy": metrics["validation_accuracy"],
                         "trainable_parameters": metrics["trainable_parameters"], **end_of_run(trajectory),
                         "seconds": round(metrics["wall_time_seconds"], 1)})
    lines = ["# RepLoRA's designs on the image protocol (the screen)", "",
             "DINOv2-S, CIFAR-10 (800 training / 200 validation images), 112 px, 250 steps, r = 8 on query/value, "
             "seed 0, full data. One seed: a screen, not a verdict; validation only (test is not read here). "
             "Step: mean ‖ΔdW‖ per step over all targets; top share and stable rank of dW at the last step "
             "(mean over targets). LoRA's own rows for reference: " +
             "; ".join(f"lr {lr:g}: validation {100 * v:.1f}, step {s:.4f}" for lr, (v, s) in lora.items()), "",
             "| design | lr | validation | step | step / LoRA's | top share | stable rank | trainable |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row["step_norm_mean"] / lora[row["lr"]][1] if row["lr"] in lora else float("nan")
        lines.append(f"| {row['design']} | {row['lr']:g} | {100 * row['validation_accuracy']:.1f} | "
                     f"{row['step_norm_mean']:.4f} | {ratio:.2f} | {row['top_share_end']:.2f} | "
                     f"{row['stable_rank_end']:.1f} | {row['trainable_parameters']:,} |")
    lines += ["", "The rule for the default (set after the first design's run, before the others'): it stays the first "
                  "design, the one the probe chose, unless another design is ahead on validation by more than 3 "
                  "points, about one standard error of a 200-image accuracy; such a design would go to 3 seeds "
                  "first. One seed cannot rank designs closer than that."]
    report = "\n".join(lines) + "\n"
    if rows:
        publish(root, "screen", rows, report)
    return report


# --- the cost: a training step of today's RepLoRA against 0.2's, side by side -----------------------------
def cost(root: Path, models: tuple[str, ...] = ("minilm", "smollm2"), batch: tuple[int, int] = (4, 32),
         r: int = 8, rounds: int = 9, profile_steps: int = 3) -> str:
    """Time ratio and ops per training step (forward, backward, AdamW) of today's RepLoRA, 0.2's design and
    LoRA, on the same weights and batch, timed back to back with 0.2's design as the reference (and 0.2
    against itself: the control, the machine's noise); ops counted by torch.profiler over a few steps."""
    import copy

    from torch.profiler import ProfilerActivity, profile as torch_profile

    from replora.training.pretrained import load_model
    from . import bench

    contenders = {"replora": ("replora", {}), "replora 0.2": ("replora", LEGACY_REPLORA), "lora": ("lora", {})}
    references = {"replora": "replora 0.2", "lora": "replora 0.2", "replora 0.2": "replora 0.2"}
    device = torch.device("cpu")
    rows = []
    for name in models:
        torch.manual_seed(0)
        base, _ = load_model(name, 2)
        base.eval()
        targets = bench._targets(base)
        ids = torch.randint(100, 1000, batch, generator=torch.Generator().manual_seed(0))
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        steps = {}
        for label, (method, options) in contenders.items():
            torch.manual_seed(0)
            model = replora.inject(copy.deepcopy(base), replora.AdapterConfig(
                method=method, r=r, lora_alpha=2 * r, target_modules=targets, **options)).train()
            steps[label] = bench._Step(model, data)
        for step in steps.values():  # warm up
            step()
        repeat = max(1, round(0.3 / max(bench._timed(steps["replora 0.2"], device, 1), 1e-9)))
        timings = bench._paired_rounds(steps, references, None, rounds, device, repeat)
        ops = {}
        for label, step in steps.items():
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(profile_steps):
                    step()
            ops[label] = sum(e.count for e in prof.key_averages()) / profile_steps
        for label, reference in references.items():
            ratio = quartiles([t[0] / t[1] for t in timings[label]])
            rows.append({"model": name, "contender": label, "reference": reference, "ratio_median": ratio["median"],
                         "ratio_q1": ratio["q1"], "ratio_q3": ratio["q3"], "ops_per_step": ops[label],
                         "trainable": sum(p.numel() for p in steps[label].params)})
    lines = ["# A training step of today's RepLoRA against 0.2's design", "",
             f"Batch {batch[0]} x {batch[1]} tokens, r = {r} on the attention's query/value, forward + backward + "
             f"AdamW, {rounds} rounds timed back to back with 0.2's design (the reference; 0.2 against itself is "
             f"the control: the machine's noise). Ops: torch.profiler's events per step, over {profile_steps} "
             "steps.", "",
             "| model | contender | time / 0.2's (median [q1, q3]) | ops per step | trainable |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['contender']} | {row['ratio_median']:.3f} [{row['ratio_q1']:.3f}, "
                     f"{row['ratio_q3']:.3f}] | {row['ops_per_step']:.0f} | {row['trainable']:,} |")
    report = "\n".join(lines) + "\n"
    publish(root, "cost", rows, report)
    return report
