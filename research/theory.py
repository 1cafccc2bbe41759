"""`python -m research theory`: the estimation-rate claim (seed 001) in a simulation of attention as a
mixture of experts, small enough for a CPU.

Setting (written out in research/README.md): one attention head over sequences X = (x_1..x_N), x_j in R^d,
    experts    f_j(X)  = (W_V + B_V A_V)^T x_j
    scores     s_ij(X) = x_i^T (W_Q + B_Q A_Q) W_K^T x_j / sqrt(d)
    output     y_i     = sum_j softmax_j(s_ij) f_j(X) + noise,   noise ~ N(0, sigma^2 I)
W_Q, W_K, W_V are fixed "pretrained" weights; the true updates B_Q A_Q and B_V A_V have rank r. From
n noisy samples we fit (a) LoRA: A_Q, B_Q, A_V, B_V free; (b) RepLoRA: [A_Q, A_V] = g_A(diag(a)),
[B_Q, B_V] = g_B(diag(b)) with shared tanh MLPs (docs/methods.md), both by full-batch L-BFGS on the mean
squared error from several initializations (the best training loss is kept), and measure the
estimation error of the updates, ||dQ_hat - dQ||_F + ||dV_hat - dV||_F.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from replora.saving import write_folder

from .reports import write_csv


@dataclass
class TheorySettings:
    d: int = 4
    tokens: int = 4
    r: int = 2
    hidden: int = 4
    noise: float = 0.1
    ns: tuple[int, ...] = (100, 316, 1000, 3162, 10000, 31623, 100000)
    repetitions: int = 3
    inits: int = 2
    lbfgs_steps: int = 150
    seed: int = 0


def _attention(X, WQ, WK, WV, dQ, dV):
    d = X.shape[-1]
    scores = X @ (WQ + dQ) @ WK.T @ X.transpose(1, 2) / math.sqrt(d)
    return torch.softmax(scores, dim=-1) @ (X @ (WV + dV))


class LoRAFit(torch.nn.Module):
    def __init__(self, d, r, gen):
        super().__init__()
        p = lambda *shape: torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-1]))  # noqa: E731
        self.AQ, self.BQ, self.AV, self.BV = p(r, d), p(d, r), p(r, d), p(d, r)

    def updates(self):
        # dQ acts as x^T dQ, so dQ = (B A)^T in the layer's (out, in) convention; the same for dV.
        return (self.BQ @ self.AQ).T, (self.BV @ self.AV).T


class RepLoRAFit(torch.nn.Module):
    def __init__(self, d, r, hidden, gen):
        super().__init__()
        p = lambda *shape: torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-1]))  # noqa: E731
        self.a, self.b = torch.nn.Parameter(torch.ones(r, dtype=torch.float64)), torch.nn.Parameter(torch.ones(r, dtype=torch.float64))
        self.WA, self.cA, self.WB, self.cB = p(hidden, r), p(hidden), p(hidden, r), p(hidden)
        self.headA, self.headB = p(2 * d, hidden), p(2 * d, hidden)  # [Q | V] heads, shared hidden layer

    def updates(self):
        d = self.headA.shape[0] // 2
        zA = torch.tanh(torch.diag(self.a) @ self.WA.T + self.cA)   # (r, h): one row per seed row
        zB = torch.tanh(torch.diag(self.b) @ self.WB.T + self.cB)
        A = zA @ self.headA.T                                       # (r, 2d) = [A_Q | A_V]
        B = (zB @ self.headB.T).T                                   # (2d, r) = [B_Q ; B_V]
        AQ, AV, BQ, BV = A[:, :d], A[:, d:], B[:d], B[d:]
        return (BQ @ AQ).T, (BV @ AV).T


def _fit(kind, X, Y, weights, s: TheorySettings, gen):
    best = None
    for _ in range(s.inits):
        model = LoRAFit(s.d, s.r, gen) if kind == "lora" else RepLoRAFit(s.d, s.r, s.hidden, gen)
        opt = torch.optim.LBFGS(model.parameters(), max_iter=s.lbfgs_steps, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-10, tolerance_change=1e-14)

        def closure():
            opt.zero_grad()
            loss = (_attention(X, *weights, *model.updates()) - Y).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            loss = (_attention(X, *weights, *model.updates()) - Y).pow(2).mean().item()
        if best is None or loss < best[0]:
            best = (loss, [u.detach() for u in model.updates()])
    return best[1]


def simulate(s: TheorySettings, progress=None) -> list[dict]:
    gen = torch.Generator().manual_seed(s.seed)
    rand = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    rows = []
    for rep in range(s.repetitions):
        weights = tuple(rand(s.d, s.d, scale=1 / math.sqrt(s.d)) for _ in range(3))
        true = ((rand(s.d, s.r) @ rand(s.r, s.d)).T / s.d, (rand(s.d, s.r) @ rand(s.r, s.d)).T / s.d)
        X_all = rand(max(s.ns), s.tokens, s.d)
        Y_all = _attention(X_all, *weights, *true) + s.noise * rand(max(s.ns), s.tokens, s.d)
        for n in s.ns:
            for kind in ("lora", "replora"):
                dQ, dV = _fit(kind, X_all[:n], Y_all[:n], weights, s, gen)
                error = (dQ - true[0]).norm().item() + (dV - true[1]).norm().item()
                rows.append({"method": kind, "n": n, "repetition": rep, "error": error})
                if progress:
                    progress(rows[-1])
    return rows


def slope(rows: list[dict], method: str) -> float:
    """Least-squares slope of log(error) against log(n), over every repetition."""
    pts = [(math.log(r["n"]), math.log(r["error"])) for r in rows if r["method"] == method]
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def run_theory(s: TheorySettings, root: Path) -> str:
    if len(set(s.ns)) < 2:
        raise ValueError(f"the theory simulation fits a slope: give at least two sample sizes, got {list(s.ns)}")
    rows = simulate(s, progress=lambda r: print(f"  {r['method']:<8} n={r['n']:<7} rep {r['repetition']}: "
                                                 f"error {r['error']:.4f}", flush=True))
    slopes = {m: slope(rows, m) for m in ("lora", "replora")}
    n0, n1 = min(s.ns), max(s.ns)
    # What each rate of seed 001 predicts as a log-log slope over the same range of n.
    rate_replora = (math.log(math.log(n1) / n1) - math.log(math.log(n0) / n0)) / 4 / (math.log(n1) - math.log(n0))
    lines = ["# Estimation rates: LoRA vs RepLoRA in the attention-as-MoE simulation", "",
             f"d = {s.d}, {s.tokens} tokens, rank {s.r}, RepLoRA hidden {s.hidden}, noise {s.noise}, "
             f"n in {list(s.ns)}, {s.repetitions} repetitions, best of {s.inits} inits, L-BFGS {s.lbfgs_steps} steps.", "",
             "| method | fitted log-log slope | seed 001's rate | its slope over this range of n |", "|---|---|---|---|",
             f"| LoRA | {slopes['lora']:.3f} | O(1 / log(n)^τ) | ≈ 0 (τ-dependent, e.g. τ = 1: "
             f"{-(math.log(math.log(n1)) - math.log(math.log(n0))) / (math.log(n1) - math.log(n0)):.3f}) |",
             f"| RepLoRA | {slopes['replora']:.3f} | O((log(n) / n)^(1/4)) | {rate_replora:.3f} |", "",
             "Median error per n:", "", "| n | LoRA | RepLoRA |", "|---|---|---|"]
    for n in s.ns:
        med = {m: sorted(r["error"] for r in rows if r["n"] == n and r["method"] == m) for m in slopes}
        lines.append(f"| {n} | {med['lora'][len(med['lora']) // 2]:.4f} | {med['replora'][len(med['replora']) // 2]:.4f} |")
    report = "\n".join(lines) + "\n"

    def publish(folder: Path) -> None:  # each file replaced whole (replora.saving.write_folder)
        write_csv(folder / "theory.csv", rows)
        (folder / "theory.md").write_text(report)
        _plot(rows, slopes, s, folder / "theory.png")
    write_folder(root, publish)
    return report


def _plot(rows, slopes, s, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    anchor = None
    for method, color, style in (("lora", "C0", dict(marker="o", markersize=9, markerfacecolor="none")),
                                 ("replora", "C3", dict(marker="x"))):
        pts = [(r["n"], r["error"]) for r in rows if r["method"] == method]
        ax.scatter(*zip(*pts), s=10, alpha=0.4, color=color)
        medians = [statistics.median(e for n2, e in pts if n2 == n) for n in s.ns]
        anchor = anchor or medians[0]
        ax.plot(s.ns, medians, color=color, label=f"{method}: median, fitted slope {slopes[method]:.2f}", **style)
    # Seed 001's rates, drawn through the first median: LoRA 1/log(n)^tau (tau = 1), RepLoRA (log n / n)^(1/4).
    n0 = s.ns[0]
    ax.plot(s.ns, [anchor * math.log(n0) / math.log(n) for n in s.ns], "C0--", alpha=0.6,
            label="seed 001, LoRA: 1 / log(n)")
    ax.plot(s.ns, [anchor * (math.log(n) / n / (math.log(n0) / n0)) ** 0.25 for n in s.ns], "C3--", alpha=0.6,
            label="seed 001, RepLoRA: (log(n) / n)^(1/4)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("samples n")
    ax.set_ylabel("estimation error of (dQ, dV)")
    ax.set_title("attention-as-MoE simulation: error vs n")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
