"""`python -m research <command>`, from the repository root: the experiment grids (`sample-efficiency`,
`ablations`), the estimation-rate simulation (`theory`) and the benchmark against PEFT (`bench`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

from replora.methods import METHODS
from replora.saving import write_folder
from replora.training import FULL
from replora.training.settings import HEAD
from replora.training.cli import run_command

from .experiments import GRIDS, Grid, NotFinished

RESULTS = Path(__file__).parent / "results"  # the default output folders, wherever the command runs from


def parse_lrs(values: list[str], methods: tuple[str, ...], defaults: dict) -> dict[str, tuple[float, ...]]:
    """`--lrs 1e-3 3e-3`: the validation grid of every method; `--lrs lora=3e-3` (repeatable): one method's
    grid, the others keep the grid's own."""
    shared, per_method = [], {}
    for value in values:
        method, _, lr = value.rpartition("=")
        try:
            number = float(lr)
        except ValueError:
            raise ValueError(f"--lrs {value!r}: give a learning rate (3e-3) or method=rate (lora=3e-3)") from None
        if method and method not in methods:
            raise ValueError(f"--lrs {value!r}: {method!r} is not among this grid's methods {list(methods)}")
        (per_method.setdefault(method, []) if method else shared).append(number)
    return {m: tuple(per_method.get(m) or shared or defaults.get(m, ())) for m in methods}


def parse_options(values: list[str], options: dict[str, dict]) -> dict[str, dict]:
    """`--option replora_head_bias=shared`: an adapter option for the method that owns it (its runs are named
    by it), on top of the grid's options."""
    from replora.methods import method_options, option_owners

    known = method_options()
    out = {m: dict(o) for m, o in options.items()}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--option {value!r}: give a method option as name=value, one of {', '.join(known)}")
        spec = known[key][1]
        try:
            parsed = spec.type(text) if spec.type is not str else text
        except ValueError:
            raise ValueError(f"--option {value!r}: {key} takes a {spec.type.__name__}") from None
        spec.check(key, parsed)
        for method in option_owners(key):  # an option several methods share applies to each
            out.setdefault(method, {})[key] = parsed
    return out


def _overridden(grid, args: argparse.Namespace, name: str):
    """The grid with the command line's overrides, its learning rates checked."""
    overrides = {k: v for k, v in {
        "model": args.model, "dataset": args.dataset, "epochs": args.epochs,
        "max_train_examples": args.max_train_examples, "max_eval_examples": args.max_eval_examples,
        "image_size": args.image_size, "methods": tuple(args.methods) if args.methods else None,
        "fractions": tuple(args.fractions) if args.fractions else None,
        "seeds": tuple(args.seeds) if args.seeds else None}.items() if v is not None}
    if args.lrs:
        overrides["lrs"] = parse_lrs(args.lrs, overrides.get("methods", grid.methods), grid.lrs)
    if args.option:
        overrides["options"] = parse_options(args.option, grid.options)
    grid = dataclasses.replace(grid, **overrides)
    if missing := [m for m in grid.methods if not grid.lrs.get(m)]:
        raise ValueError(f"grid {name} has no learning rates for {missing}: give them, e.g. --lrs {missing[0]}=1e-3")
    return grid


def record(root: Path, report: str, args: argparse.Namespace, runs: Path | None = None, **settings) -> None:
    """`<report>.settings.json` in root: what `python -m research report` rebuilds the report from, and the
    command that made it (which also resumes it)."""
    saved = {"report": report, "command": shlex.join(["python", "-m", "research", *args.argv]),
             "runs": os.path.relpath(runs, root) if runs else None, **settings}
    write_folder(root, lambda folder: (folder / f"{report}.settings.json").write_text(json.dumps(saved, indent=2) + "\n"))


def _grid_json(grid: Grid) -> dict:
    return {k: v for k, v in dataclasses.asdict(grid).items() if k != "report_only"}


def cmd_grid(args: argparse.Namespace) -> int:
    """sample-efficiency and ablations: a grid of training runs, resumable."""
    from . import experiments

    grid = _overridden(GRIDS[args.grid], args, args.grid)
    root = Path(args.output) if args.output else RESULTS / args.grid  # the experiments of a grid share its runs
    runs = Path(args.runs) if args.runs else None
    record(root, args.command.replace("-", "_"), args, runs, grid=_grid_json(grid))
    if args.command == "sample-efficiency":
        print(experiments.sample_efficiency(grid, root, runs))
    else:
        print(experiments.ablations(grid, root, runs=runs))
    print(f"results in {root}")
    return 0


def cmd_commonsense(args: argparse.Namespace) -> int:
    """The commonsense table in the papers' protocol, with claim 2 in it: training runs and their scoring."""
    from .commonsense_table import CommonsenseGrid, commonsense_table

    s = CommonsenseGrid()
    s = dataclasses.replace(s, grid=_overridden(s.grid, args, "commonsense"),
                            items_per_task=args.items_per_task or s.items_per_task)
    root = Path(args.output) if args.output else RESULTS / "commonsense"
    runs = Path(args.runs) if args.runs else None
    record(root, "commonsense", args, runs, grid=_grid_json(s.grid), items_per_task=s.items_per_task,
           equal_steps=s.equal_steps)
    print(commonsense_table(s, root, runs))
    print(f"results in {root}")
    return 0


def cmd_theory(args: argparse.Namespace) -> int:
    from .theory import TheorySettings, run_theory

    overrides = {k: v for k, v in {"ns": tuple(args.ns) if args.ns else None, "repetitions": args.repetitions,
                                   "inits": args.inits, "lbfgs_steps": args.lbfgs_steps,
                                   "cases": tuple(dict.fromkeys(args.cases)) if args.cases else None,
                                   "r_true": args.r_true, "r_fit": args.r_fit}.items() if v is not None}
    root = Path(args.output) if args.output else RESULTS / "theory"
    settings = TheorySettings(**overrides)
    print(run_theory(settings, root))
    record(root, "theory", args, settings=dataclasses.asdict(settings))  # after theory.csv: a rerun replaces both
    print(f"results in {root}")
    return 0


def rebuild(saved: dict, root: Path) -> None:
    """One report rebuilt from its settings file and the finished runs (or theory.csv) beside it; trains,
    scores and simulates nothing: a missing run is NotFinished."""
    from . import experiments
    from .commonsense_table import CommonsenseGrid, commonsense_table
    from .theory import TheorySettings, read_rows, theory_report

    runs = root / saved["runs"] if saved.get("runs") else None
    if saved["report"] == "theory":
        s = saved["settings"]
        settings = TheorySettings(**{**s, "ns": tuple(s["ns"]), "cases": tuple(s["cases"])})
        if not (root / "theory.csv").is_file():
            raise NotFinished(f"{root / 'theory.csv'} is missing")
        theory_report(read_rows(root / "theory.csv"), settings, root)
        return
    grid = dataclasses.replace(Grid.from_json(saved["grid"]), report_only=True)
    if saved["report"] == "commonsense":
        s = CommonsenseGrid(grid=grid, items_per_task=saved["items_per_task"], equal_steps=tuple(saved["equal_steps"]))
        commonsense_table(s, root, runs)
    elif saved["report"] == "sample_efficiency":
        experiments.sample_efficiency(grid, root, runs)
    else:
        experiments.ablations(grid, root, runs)


def cmd_report(args: argparse.Namespace) -> int:
    """Every report under the results folder rebuilt from what its command left there."""
    results = Path(args.results) if args.results else RESULTS
    found = sorted(results.rglob("*.settings.json"))
    if not found:
        raise ValueError(f"no reports under {results} (none has a <report>.settings.json): run a grid, "
                         "`python -m research commonsense` or `python -m research theory` first")
    unfinished = 0
    for path in found:
        saved = json.loads(path.read_text())
        name = path.parent / f"{saved['report']}.md"
        name = name.relative_to(Path.cwd()) if name.is_relative_to(Path.cwd()) else name
        try:
            rebuild(saved, path.parent)
            print(f"{name}: rebuilt")
        except NotFinished as e:
            unfinished += 1
            print(f"{name}: not rebuilt, {e}; `{saved['command']}` finishes it")
    print(f"{len(found) - unfinished} of {len(found)} reports rebuilt")
    return 1 if unfinished else 0


def cmd_update_rank(args: argparse.Namespace) -> int:
    """The rank and size of each method's update: the probe net, real runs' trajectories, RepLoRA's designs."""
    from . import update_rank

    root = Path(args.output) if args.output else RESULTS / "update-rank"
    root.mkdir(parents=True, exist_ok=True)
    for part in dict.fromkeys(args.parts):
        if part == "probe":
            print(update_rank.probe(root))
        elif part == "screen":
            print(update_rank.screen(root, report_only=args.report_only))
        elif part == "cost":
            print(update_rank.cost(root))
        else:
            print(update_rank.trajectories(root, report_only=args.report_only, train=tuple(args.protocols)))
    print(f"results in {root}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's demo table: `replora demo` with its defaults, its runs in <output>/runs (resumable: finished
    runs are read again, not retrained), its table written to <output>/demo.txt."""
    import contextlib
    import io

    from replora.files import write_text
    from replora.training.cli import main as replora_main

    root = Path(args.output) if args.output else RESULTS / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = replora_main(["demo", "--output", str(root / "runs")])
    if code:
        return code
    lines = printed.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("MiniLM + Rotten Tomatoes"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("run folders:"))
    write_text(root / "demo.txt", "\n".join(lines[start:end]) + "\n")
    print("\n".join(lines[start:end]))
    print(f"written to {root / 'demo.txt'}; the README's demo table quotes it")
    return 0


def parse_batch(value: str) -> tuple[int, int]:
    """`--batches 4x32`: (examples, tokens each)."""
    size, _, tokens = value.lower().partition("x")
    try:
        batch = int(size), int(tokens)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give examples x tokens, e.g. 4x32") from None
    if batch[0] < 1 or batch[1] < 2:
        raise argparse.ArgumentTypeError(f"{value!r}: at least 1 example of 2 tokens")
    return batch


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import QUICK, BenchSettings, run_bench

    overrides = dict(QUICK) if args.quick else {}
    overrides.update({k: v for k, v in {
        "models": tuple(args.models) if args.models else None,
        "batches": tuple(args.batches) if args.batches else None, "ranks": tuple(args.ranks) if args.ranks else None,
        "rounds": args.rounds, "steps": args.steps, "min_time": args.min_time, "threads": args.threads,
        "gen_tokens": args.gen_tokens, "generation": False if args.no_generation else None,
        "compile": True if args.compile or args.compile_backend else None,
        "compile_backend": args.compile_backend, "profile": args.profile, "sft_rounds": args.sft_rounds,
        "sft_steps": args.sft_steps, "sft_items": args.sft_items}.items() if v is not None})
    root = Path(args.output) if args.output else RESULTS / "bench"
    print(run_bench(BenchSettings(**overrides).validate(), root))
    print(f"results in {root}")
    return 0


def cmd_quantized(args: argparse.Namespace) -> int:
    from .quantized import METHODS, MODELS, QuantizedSettings, run_quantized

    s = QuantizedSettings(models=tuple(args.models or MODELS), methods=tuple(args.methods or METHODS),
                          steps=args.steps, warmup=args.warmup)
    root = Path(args.output) if args.output else RESULTS / "quantized"
    print(run_quantized(s, root, tuple(args.parts)))
    print(f"results in {root}")
    return 0


def _grid_parser(sub, name: str, help_text: str, description: str, grids: bool = True):
    p = sub.add_parser(name, help=help_text, description=description)
    if grids:
        p.add_argument("--grid", default="minilm-rt", choices=tuple(GRIDS),
                       help="model, data and budget (default minilm-rt: MiniLM on Rotten Tomatoes; dinov2-cifar10: "
                            "the papers' image protocol)")
    p.add_argument("--output", help="results folder (default research/results/<grid>, shared by the grid's "
                                    "experiments); rerun to resume")
    for flag, kind in [("--model", str), ("--dataset", str), ("--epochs", int), ("--max-train-examples", int),
                       ("--max-eval-examples", int), ("--image-size", int)]:
        p.add_argument(flag, type=kind, help="override the grid's setting")
    p.add_argument("--methods", nargs="+", choices=(*METHODS, FULL, HEAD), help="override the grid's methods")
    p.add_argument("--fractions", nargs="+", type=float, help="override the grid's training fractions")
    p.add_argument("--seeds", nargs="+", type=int, help="override the grid's seeds")
    p.add_argument("--lrs", nargs="+", help="learning-rate grid picked from on validation: for every method "
                   "(1e-3 3e-3), or for one (lora=3e-3; repeat for several)")
    p.add_argument("--option", nargs="+", metavar="NAME=VALUE", help="an adapter option for the method that owns it, "
                   "e.g. replora_head_bias=shared (its runs are named by the options that differ from replora 0.2's)")
    p.add_argument("--runs", help="runs folder (default <output>/runs): point a variant of a grid at the grid's "
                   "runs to reuse them")
    p.set_defaults(func=cmd_grid)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="research", description="Reproduce the papers' claims with replora: "
                                     "grids of real training runs (resumable), the estimation-rate simulation, "
                                     "and the benchmark against Hugging Face PEFT. Run from the repository root.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _grid_parser(sub, "sample-efficiency", "methods x training fractions x seeds, each method at its learning "
                 "rate picked on validation", "Every method x training fraction x seed of a grid; writes "
                 "sample_efficiency.csv / .md / .png. Finished runs are skipped, interrupted ones resume.")
    _grid_parser(sub, "ablations", "RepLoRA's options, one change at a time from the default",
                 "RepLoRA's options one at a time at fraction 1, every seed; writes ablations.csv / .md. "
                 "Finished runs are skipped, interrupted ones resume.")

    commonsense = _grid_parser(sub, "commonsense", "the commonsense table in the papers' protocol, and claim 2 "
                               "in it", "SmolLM2 fine-tuned generatively on the commonsense mix by every method "
                               "(learning rate picked on validation), LoRA and RepLoRA also on 30% of it, each run "
                               "scored on the eight test sets by generation and by log-likelihood, beside the "
                               "base model; writes commonsense.csv / .md / .png. Finished runs and scores are "
                               "skipped, interrupted runs resume.", grids=False)
    commonsense.add_argument("--items-per-task", type=int, help="test items scored per set (default 50)")
    commonsense.set_defaults(func=cmd_commonsense)

    theory = sub.add_parser("theory", help="the estimation-rate simulation (attention as a mixture of experts)",
                            description="LoRA and RepLoRA fitted to an attention head read as a mixture of "
                                        "experts, over a log grid of sample sizes, at the true rank (exact) and "
                                        "above it (over-specified); measures the error of the updates and the "
                                        "Voronoi loss of the factors; writes theory.csv / .md / .png.")
    theory.add_argument("--output", help="results folder (default research/results/theory)")
    theory.add_argument("--ns", nargs="+", type=int, help="sample sizes (default 1e2 to 1e5, log grid)")
    theory.add_argument("--repetitions", type=int, help="repetitions per sample size (default 5)")
    theory.add_argument("--inits", type=int, help="initializations per fit (default 2)")
    theory.add_argument("--lbfgs-steps", type=int, help="L-BFGS iterations per fit (default 150)")
    theory.add_argument("--cases", nargs="+", choices=("exact", "over"),
                        help="fits at the true rank (exact) and/or above it (over); default both")
    theory.add_argument("--r-true", type=int, help="rank of the true updates (default 1)")
    theory.add_argument("--r-fit", type=int, help="rank of the over-specified fits, above --r-true (default 2)")
    theory.set_defaults(func=cmd_theory)

    bench = sub.add_parser("bench", help="training, decoding and memory against Hugging Face PEFT and the floor",
                           description="Every replora method against PEFT LoRA / DoRA and against the frozen model's "
                                       "own step (the floor), timed back to back in one process: training steps "
                                       "(overhead above the floor, time, memory), greedy decoding on causal LMs, "
                                       "and with --compile the same under torch.compile; writes bench.json / .md "
                                       "/ .png. Default grid: minilm and smollm2 x batches 4x32 and 16x64 x r 8 "
                                       "and 64, 15 rounds.")
    bench.add_argument("--quick", action="store_true", help="a quick look: smollm2, batch 4x32, r = 8, 5 rounds "
                       "(the options below override it)")
    bench.add_argument("--models", nargs="+", help="models to measure (default minilm smollm2; any --model value)")
    bench.add_argument("--batches", nargs="+", type=parse_batch, metavar="NxT",
                       help="batches as examples x tokens (default 4x32 16x64)")
    bench.add_argument("--ranks", nargs="+", type=int, help="adapter ranks (default 8 64)")
    bench.add_argument("--rounds", type=int, help="rounds of back-to-back groups (default 15)")
    bench.add_argument("--steps", type=int, help="timed calls per contender per timing, at least (default 1)")
    bench.add_argument("--min-time", type=float, help="seconds each timing spans at least (default 0.2)")
    bench.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core); on a shared "
                       "machine fewer threads than cores keep the timings from waiting on descheduled threads")
    bench.add_argument("--gen-tokens", type=int, help="new tokens per prompt in greedy decoding (default 32; "
                       "4 prompts of 32 tokens)")
    bench.add_argument("--no-generation", action="store_true", help="skip greedy decoding on causal LMs")
    bench.add_argument("--compile", action="store_true", help="also time the training steps under torch.compile "
                       "against compiled PEFT (each model compiled: minutes per model on a CPU)")
    bench.add_argument("--compile-backend", help="torch.compile backend for --compile (default inductor; implies "
                       "--compile; eager / aot_eager trace without generating code, for diagnosis)")
    bench.add_argument("--sft-rounds", type=int, help="rounds of generative training against TRL's SFTTrainer + PEFT "
                       "LoRA on each causal LM (default 3, about 27 min on SmolLM2 with 2 cores; 0 skips; --quick: 0)")
    bench.add_argument("--sft-steps", type=int, help="optimizer steps of each side per round (default 20)")
    bench.add_argument("--sft-items", type=int, help="commonsense items the generative runs draw from (default 2000)")
    bench.add_argument("--profile", type=int, metavar="STEPS", help="also run STEPS training steps of every contender "
                       "under torch.profiler and report where each spends its time beyond its reference")
    bench.add_argument("--output", help="folder for bench.json, bench.md, bench.png (default research/results/bench)")
    bench.set_defaults(func=cmd_bench)

    rank = sub.add_parser("update-rank", help="the rank and size of each method's update over training (issue 31)",
                          description="How many directions each method's update uses (top singular share, stable "
                                      "rank of dW per target) and how large its steps are: on issue 31's probe "
                                      "net (seconds), over real runs of the image and text protocols, and across "
                                      "RepLoRA's generator designs on the image protocol (runs: resumable).")
    rank.add_argument("--parts", nargs="+", choices=("probe", "screen", "trajectory", "cost"),
                      default=["probe", "screen", "trajectory"], help="what to run (default probe, screen, "
                      "trajectory; cost: a training step against 0.2's design, side by side, wants an idle machine)")
    rank.add_argument("--output", help="results folder (default research/results/update-rank; its runs go to its "
                                       "runs/ (image) and runs-text/ folders)")
    rank.add_argument("--report-only", action="store_true", help="read finished runs only: train nothing")
    rank.add_argument("--protocols", nargs="+", choices=("image", "text"), default=["image", "text"],
                      help="the protocols whose trajectory runs may train (default both; the others are read)")
    rank.set_defaults(func=cmd_update_rank)

    quantized = sub.add_parser("quantized", help="4-bit / 8-bit bases (bitsandbytes) against float32: a training "
                               "step's time and memory, and whether a 4-bit run learns (issue 33)",
                               description="Each method's training step on SmolLM2 and Gemma-3-270M loaded in float32, "
                                           "4bit and 8bit (replora train --quantize's loader), one fresh process per "
                                           "cell: median step time and peak resident memory, ratios to float32; then "
                                           "word-reversal SFT runs on SmolLM2 4bit (lora, replora). Resumable: "
                                           "finished cells and runs are read again. Run with OMP_NUM_THREADS=1.")
    quantized.add_argument("--models", nargs="+", choices=("smollm2", "gemma3-270m"), help="default both")
    quantized.add_argument("--methods", nargs="+", choices=tuple(METHODS), help="default every method")
    quantized.add_argument("--steps", type=int, default=3, help="timed steps per cell (default 3)")
    quantized.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    quantized.add_argument("--parts", nargs="+", choices=("steps", "learning"), default=["steps", "learning"],
                           help="what to run (default both)")
    quantized.add_argument("--output", help="results folder (default research/results/quantized)")
    quantized.set_defaults(func=cmd_quantized)

    demo = sub.add_parser("demo", help="the README's demo table: replora demo, its table in results/demo/demo.txt",
                          description="Run `replora demo` with its defaults into <output>/runs (finished runs are "
                                      "read again, not retrained) and write its table to <output>/demo.txt, which "
                                      "the README quotes.")
    demo.add_argument("--output", help="results folder (default research/results/demo)")
    demo.set_defaults(func=cmd_demo)

    report = sub.add_parser("report", help="rebuild every report's tables and plots from its finished runs",
                            description="Rebuild the .md / .csv / .png of every report under the results folder "
                                        "(the grids, the commonsense table, the theory simulation) from the finished "
                                        "runs' files (or theory.csv) and the settings file its command left; nothing "
                                        "is trained, scored or simulated. Exits 1 when a report still has runs to "
                                        "finish, and names the command that finishes it.")
    report.add_argument("--results", help="results folder searched for <report>.settings.json (default "
                                          "research/results)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded beside each report (record)
    return run_command(args, prog="research", resume_hint="rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
