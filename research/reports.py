"""Small helpers the research reports share: CSV files and mean ± std / paired-difference formatting."""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path


def write_csv(path: Path, rows: list[dict]) -> None:
    """rows as a CSV file, the first row's keys as the header."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def paired(a: list[float], b: list[float], short: bool = False) -> str:
    """a - b over seeds: mean ± std of the differences, wins, and (unless short) the paired t statistic."""
    diffs = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(diffs)
    wins = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
    if short:
        return f"{100 * mean:+.1f} ± {100 * std:.1f} ({wins})"
    t = f"t = {mean / (std / math.sqrt(len(diffs))):.2f}" if std > 0 else "t undefined (no spread)"
    return f"{100 * mean:+.1f} ± {100 * std:.1f} pts, {wins} seeds better, {t}"


def quartiles(values: list[float]) -> dict:
    """Median and quartiles of per-round values (the bench's ratios), with the number of rounds."""
    if not values:
        return {"median": None, "q1": None, "q3": None, "rounds": 0}
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "rounds": len(values)}
