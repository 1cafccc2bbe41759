"""`python -m research theory`: the estimation-rate claim (seed 001) in a simulation of attention as a
mixture of experts, small enough for a CPU.

Setting (written out in research/README.md): one attention head over sequences X = (x_1..x_N), x_j in R^d,
    experts    f_j(X)  = (W_V + B_V A_V)^T x_j
    scores     s_ij(X) = x_i^T (W_Q + B_Q A_Q) W_K^T x_j / sqrt(d)
    output     y_i     = sum_j softmax_j(s_ij) f_j(X) + noise,   noise ~ N(0, sigma^2 I)
W_Q, W_K, W_V are fixed "pretrained" weights; the true updates B_Q A_Q and B_V A_V have rank r_true. From
n noisy samples we fit (a) LoRA: A_Q, B_Q, A_V, B_V free; (b) RepLoRA: [A_Q, A_V] = g_A(diag(a)),
[B_Q, B_V] = g_B(diag(b)) with shared tanh MLPs (docs/methods.md), both by full-batch L-BFGS on the mean
squared error from several initializations (the best training loss is kept), at rank r_true (the exact
case) and at rank r_fit > r_true (the over-specified case: more fitted components than true ones).

Two errors per fit: that of the updates, ||dQ_hat - dQ||_F + ||dV_hat - dV||_F, and what the paper's rates
are about, that of the factor parameters up to their symmetries, by a Voronoi loss as in the
mixture-of-experts estimation literature (Nguyen, Ho et al.). A component is one rank-1 term b_k a_k^T of
B A (column k of B, row k of A), for Q and for V; for RepLoRA the parameters are still the generated
factors A_Q, A_V, B_Q, B_V, component by component. `voronoi_loss` says how the loss is built.
"""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from replora.saving import write_folder

from .reports import write_csv

CASES = ("exact", "over")
METHODS = ("lora", "replora")


@dataclass
class TheorySettings:
    d: int = 4
    tokens: int = 4
    r_true: int = 1      # rank of the true updates: 1 keeps its component identifiable (research/README.md)
    r_fit: int = 2       # rank of the over-specified fits; the exact ones use r_true
    hidden: int = 4
    noise: float = 0.1
    ns: tuple[int, ...] = (100, 316, 1000, 3162, 10000, 31623, 100000)
    repetitions: int = 5
    inits: int = 2
    lbfgs_steps: int = 150
    cases: tuple[str, ...] = CASES
    seed: int = 0

    def rank(self, case: str) -> int:
        return self.r_true if case == "exact" else self.r_fit


def _updates(AQ, BQ, AV, BV):
    # dQ acts as x^T dQ, so dQ = (B A)^T in the layer's (out, in) convention; the same for dV.
    return (BQ @ AQ).T, (BV @ AV).T


def _attention(X, WQ, WK, WV, dQ, dV):
    d = X.shape[-1]
    scores = X @ (WQ + dQ) @ WK.T @ X.transpose(1, 2) / math.sqrt(d)
    return torch.softmax(scores, dim=-1) @ (X @ (WV + dV))


def _mse(X, Y, weights, factors):
    return (_attention(X, *weights, *_updates(*factors)) - Y).pow(2).mean()


class LoRAFit(torch.nn.Module):
    def __init__(self, d, r, gen):
        super().__init__()
        p = lambda *shape: torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-1]))  # noqa: E731
        self.AQ, self.BQ, self.AV, self.BV = p(r, d), p(d, r), p(r, d), p(d, r)

    def factors(self):
        return self.AQ, self.BQ, self.AV, self.BV


class RepLoRAFit(torch.nn.Module):
    def __init__(self, d, r, hidden, gen):
        super().__init__()
        p = lambda *shape: torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-1]))  # noqa: E731
        self.a, self.b = torch.nn.Parameter(torch.ones(r, dtype=torch.float64)), torch.nn.Parameter(torch.ones(r, dtype=torch.float64))
        self.WA, self.cA, self.WB, self.cB = p(hidden, r), p(hidden), p(hidden, r), p(hidden)
        self.headA, self.headB = p(2 * d, hidden), p(2 * d, hidden)  # [Q | V] heads, shared hidden layer

    def factors(self):
        d = self.headA.shape[0] // 2
        zA = torch.tanh(torch.diag(self.a) @ self.WA.T + self.cA)   # (r, h): one row per seed row
        zB = torch.tanh(torch.diag(self.b) @ self.WB.T + self.cB)
        A = zA @ self.headA.T                                       # (r, 2d) = [A_Q | A_V]
        B = (zB @ self.headB.T).T                                   # (2d, r) = [B_Q ; B_V]
        return A[:, :d], B[:d], A[:, d:], B[d:]


def _fit(kind, X, Y, weights, rank, s: TheorySettings, gen):
    """(training loss, factors AQ, BQ, AV, BV) of the best of s.inits L-BFGS fits."""
    best = None
    for _ in range(s.inits):
        model = LoRAFit(s.d, rank, gen) if kind == "lora" else RepLoRAFit(s.d, rank, s.hidden, gen)
        opt = torch.optim.LBFGS(model.parameters(), max_iter=s.lbfgs_steps, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-10, tolerance_change=1e-14)

        def closure():
            opt.zero_grad()
            loss = _mse(X, Y, weights, model.factors())
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            factors = [f.detach() for f in model.factors()]
            loss = _mse(X, Y, weights, factors).item()
        if best is None or loss < best[0]:
            best = (loss, factors)
    return best


def components(A, B):
    """B A as its rank-1 components b_k a_k^T, each a (weight, location): weight |b_k| |a_k|, location the
    unit matrix b_k a_k^T / weight."""
    # Canonical form: the unit matrix b a^T / |b a^T|, the same for (b c, a / c) at every c != 0, drops scaling and
    # sign at once and continuously; its weight kept apart (as a mixture's), so parallel pieces of one true
    # component cost nothing when their weights sum to its own, where balanced norms would charge them.
    mats = B.T[:, :, None] * A[:, None, :]
    weights = mats.flatten(1).norm(dim=1)
    return weights, mats / weights.clamp_min(1e-300)[:, None, None]


def svd_components(A, B):
    """The same for the SVD of B A, as many components as A has rows: the factorization with every symmetry
    (B M, M^-1 A for any invertible M, not only scalings and permutations) removed; a function of the product."""
    U, S, Vh = torch.linalg.svd(B @ A)
    r = A.shape[0]
    return S[:r], U.T[:r, :, None] * Vh[:r, None, :]


def voronoi_loss(fit, true) -> float:
    """Voronoi loss between fitted and true components, each (weights, locations) as `components` gives them.

    Each fitted component joins the cell of its nearest true component (so the loss ignores their order).
    Per true component j: |sum of the weights in its cell - its weight| (an empty cell costs the whole weight:
    a missed component is penalized), plus each fitted component's weight times its distance to j, to the
    first power when it is alone in the cell (exact) and squared when the cell holds several (over-specified).
    """
    (w, loc), (w_true, loc_true) = fit, true
    dist = (loc[:, None] - loc_true[None]).flatten(2).norm(dim=2)   # (fitted, true)
    cell = dist.argmin(dim=1)
    loss = 0.0
    for j in range(len(w_true)):
        inside = cell == j
        power = 1 if inside.sum() == 1 else 2
        loss += abs(w[inside].sum() - w_true[j]).item() + (w[inside] * dist[inside, j] ** power).sum().item()
    return loss


def factor_loss(fitted, true, split=components) -> float:
    """Voronoi loss of Q's components plus that of V's (factors as AQ, BQ, AV, BV). They are matched
    separately: nothing in LoRA, nor in the truth, ties Q's k-th component to V's."""
    return sum(voronoi_loss(split(fitted[i], fitted[i + 1]), split(true[i], true[i + 1])) for i in (0, 2))


def simulate(s: TheorySettings, progress=None) -> list[dict]:
    gen = torch.Generator().manual_seed(s.seed)
    rand = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    rows = []
    for rep in range(s.repetitions):
        weights = tuple(rand(s.d, s.d, scale=1 / math.sqrt(s.d)) for _ in range(3))
        true = tuple(rand(*shape, scale=1 / math.sqrt(s.d)) for shape in [(s.r_true, s.d), (s.d, s.r_true)] * 2)
        true_dQ, true_dV = _updates(*true)
        X_all = rand(max(s.ns), s.tokens, s.d)
        Y_all = _attention(X_all, *weights, true_dQ, true_dV) + s.noise * rand(max(s.ns), s.tokens, s.d)
        for case in s.cases:
            for n in s.ns:
                X, Y = X_all[:n], Y_all[:n]
                truth_loss = _mse(X, Y, weights, true).item()
                for kind in METHODS:
                    loss, fitted = _fit(kind, X, Y, weights, s.rank(case), s, gen)
                    dQ, dV = _updates(*fitted)
                    rows.append({"method": kind, "case": case, "n": n, "repetition": rep,
                                 "product_error": (dQ - true_dQ).norm().item() + (dV - true_dV).norm().item(),
                                 "voronoi_loss": factor_loss(fitted, true),
                                 "voronoi_svd": factor_loss(fitted, true, svd_components),
                                 # <= 0 at the least-squares optimum, which fits its data at least as well as the truth
                                 "excess_loss": loss - truth_loss})
                    if progress:
                        progress(rows[-1])
    return rows


def slope(rows: list[dict], method: str, case: str, key: str) -> tuple[float, float]:
    """Least-squares slope of log(key) against log(n), over every repetition, and its standard error (the
    points taken as independent; nan with two points)."""
    pts = [(math.log(r["n"]), math.log(r[key])) for r in rows if r["method"] == method and r["case"] == case]
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    residual = sum((y - my - b * (x - mx)) ** 2 for x, y in pts)
    return b, math.sqrt(residual / (len(pts) - 2) / sxx) if len(pts) > 2 else math.nan


def rate_slopes(n0: int, n1: int) -> dict[str, float]:
    """What each rate of seed 001 predicts as a log-log slope between n0 and n1."""
    span = math.log(n1) - math.log(n0)
    replora = (math.log(math.log(n1) / n1) - math.log(math.log(n0) / n0)) / 4 / span
    return {"lora": -(math.log(math.log(n1)) - math.log(math.log(n0))) / span,  # 1 / log(n)^tau at tau = 1
            "replora": replora, "squared": 2 * replora}


def _median(rows, key, **match):
    return statistics.median(r[key] for r in rows if all(r[k] == v for k, v in match.items()))


def run_theory(s: TheorySettings, root: Path) -> str:
    if len(set(s.ns)) < 2:
        raise ValueError(f"the theory simulation fits a slope: give at least two sample sizes, got {list(s.ns)}")
    if "over" in s.cases and s.r_fit <= s.r_true:
        raise ValueError(f"the over-specified case fits more components than the truth has: give --r-fit above "
                         f"--r-true, got {s.r_fit} and {s.r_true}")
    rows = simulate(s, progress=lambda r: print(
        f"  {r['case']:<5} {r['method']:<8} n={r['n']:<7} rep {r['repetition']}: product error "
        f"{r['product_error']:.4f}, Voronoi loss {r['voronoi_loss']:.4f}", flush=True))
    return theory_report(rows, s, root)


def read_rows(path: Path) -> list[dict]:
    """theory.csv's rows as simulate() made them (floats round-trip exactly through their repr)."""
    with open(path, newline="") as fh:
        return [{k: v if k in ("method", "case") else int(v) if k in ("n", "repetition") else float(v)
                 for k, v in row.items()} for row in csv.DictReader(fh)]


def theory_report(rows: list[dict], s: TheorySettings, root: Path) -> str:
    """theory.csv / .md / .png in root from the simulation's rows; returns the markdown report."""
    keys = ("product_error", "voronoi_loss", "voronoi_svd")
    slopes = {(c, m, k): slope(rows, m, c, k) for c in s.cases for m in METHODS for k in keys}
    n0, n1 = min(s.ns), max(s.ns)
    rates = rate_slopes(n0, n1)
    names = {"lora": "LoRA", "replora": "RepLoRA"}
    lines = ["# Estimation rates: LoRA vs RepLoRA in the attention-as-MoE simulation", "",
             f"d = {s.d}, {s.tokens} tokens, true rank {s.r_true}; fits of rank {s.r_true} (exact) and {s.r_fit} "
             f"(over-specified), as the cases ask ({', '.join(s.cases)}); RepLoRA hidden {s.hidden}, noise "
             f"{s.noise}, n in {list(s.ns)}, {s.repetitions} repetitions, best of {s.inits} inits, L-BFGS "
             f"{s.lbfgs_steps} steps.", "",
             f"What seed 001's rates predict as a log-log slope over n = {n0} to {n1}:", "",
             "| rate | slope |", "|---|---|",
             f"| LoRA, O(1 / log(n)^τ) (τ = 1; τ scales it) | {rates['lora']:.3f} |",
             f"| RepLoRA, O((log(n) / n)^(1/4)) | {rates['replora']:.3f} |",
             "| its square, (log(n) / n)^(1/2): the Voronoi loss where its terms are squared | "
             f"{rates['squared']:.3f} |",
             "", "Fitted log-log slopes ± their standard errors (least squares over every repetition):", "",
             "| case | method | product error | Voronoi loss | Voronoi loss of the product's SVD | "
             "fits at least as good as the truth |", "|---|---|---|---|---|---|"]
    for c in s.cases:
        for m in METHODS:
            fits = [r for r in rows if r["case"] == c and r["method"] == m]
            good = sum(r["excess_loss"] <= 1e-12 for r in fits)
            cells = " | ".join("{:.3f} ± {:.3f}".format(*slopes[c, m, k]) for k in keys)
            lines.append(f"| {c} | {names[m]} | {cells} | {good}/{len(fits)} |")
    lines += ["", "Median per n:", "",
              "| case | n | product error, LoRA | RepLoRA | Voronoi loss, LoRA | RepLoRA | "
              "of the SVD, LoRA | RepLoRA |",
              "|---|---|---|---|---|---|---|---|"]
    for c in s.cases:
        for n in s.ns:
            cells = [_median(rows, key=k, case=c, n=n, method=m) for k in keys for m in METHODS]
            lines.append(f"| {c} | {n} | " + " | ".join(f"{v:.4f}" for v in cells) + " |")
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

    fig, axes = plt.subplots(1, len(s.cases), figsize=(6.4 * len(s.cases), 4.6), squeeze=False, sharey=True)
    n0 = s.ns[0]
    for ax, case in zip(axes[0], s.cases):
        for method, color, style in (("lora", "C0", dict(marker="o", markersize=9, markerfacecolor="none")),
                                     ("replora", "C3", dict(marker="x"))):
            pts = [(r["n"], r["voronoi_loss"]) for r in rows if r["method"] == method and r["case"] == case]
            ax.scatter(*zip(*pts), s=10, alpha=0.4, color=color)
            medians = [statistics.median(e for n2, e in pts if n2 == n) for n in s.ns]
            ax.plot(s.ns, medians, color=color, label=f"{method}: median, fitted slope "
                                                      f"{slopes[case, method, 'voronoi_loss'][0]:.2f}", **style)
        # Seed 001's rates, drawn through LoRA's first median.
        anchor = _median(rows, key="voronoi_loss", case=case, n=n0, method="lora")
        guides = [("C0--", "LoRA: 1 / log(n)", lambda n: math.log(n0) / math.log(n)),
                  ("C3--", "RepLoRA: (log(n) / n)^(1/4)", lambda n: (math.log(n) / n / (math.log(n0) / n0)) ** 0.25),
                  ("C3:", "its square, (log(n) / n)^(1/2)", lambda n: (math.log(n) / n / (math.log(n0) / n0)) ** 0.5)]
        for style, label, rate in guides:
            ax.plot(s.ns, [anchor * rate(n) for n in s.ns], style, alpha=0.6, label=f"seed 001, {label}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("samples n")
        ax.set_title(f"{case}: fitted rank {s.rank(case)}, true rank {s.r_true}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("Voronoi loss of the factors (Q + V)")
    fig.suptitle("attention-as-MoE simulation: the factors' Voronoi loss vs n")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
