"""The `replora` command line: `replora train`, `replora demo`."""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from .config import ACTIVATIONS, METHODS, MIXER_INITS, SEED_SHAPES, SHARING_SCOPES

# name: (type, help, choices). Types: int, float, str, bool (a switch), list (one or more values).
TRAIN_OPTIONS = {
    "model": (str, "minilm (default, packaged all-MiniLM-L6-v2), smollm2 (packaged SmolLM2-135M-Instruct), "
                   "a local transformers folder, or a hub id", None),
    "dataset": (str, "rotten_tomatoes (default), social_iqa, strategyqa (multiple choice), a .csv / .jsonl "
                     "file, a saved Hugging Face dataset folder, or hf:<hub id>", None),
    "method": (str, "adapter method (default lora); full = full fine-tuning, no adapter", METHODS + ("full",)),
    "fraction": (float, "train on this seeded, stratified fraction of the training split (default 1.0)", None),
    "epochs": (int, "passes over the training data (default 2)", None),
    "max_steps": (int, "stop after this many optimizer steps instead (overrides --epochs)", None),
    "seed": (int, "seed of the head init, data order, dropout and --fraction (default 0)", None),
    "output": (str, "run folder (default runs/<dataset>-<model>-<method>-f<fraction>-s<seed>)", None),
    "resume": (bool, "continue the run in --output from its last checkpoint", None),
    "batch_size": (int, "global batch size, kept whatever the number of processes (default 32)", None),
    "grad_accum": (int, "gradient accumulation steps (default 1)", None),
    "lr": (float, "peak learning rate of AdamW (default 1e-3)", None),
    "warmup_ratio": (float, "share of steps with linear warm-up, then linear decay (default 0.06)", None),
    "weight_decay": (float, "AdamW weight decay (default 0)", None),
    "max_grad_norm": (float, "clip gradients to this norm (default 1.0; 0 turns clipping off)", None),
    "max_length": (int, "tokens per example (default 32)", None),
    "max_train_examples": (int, "cap the training split (a fixed stratified subset) before --fraction", None),
    "max_eval_examples": (int, "cap the validation and test splits (fixed subsets)", None),
    "eval_batch_size": (int, "batch size for evaluation (default 64)", None),
    "mixed_precision": (str, "autocast precision (default no)", ("no", "bf16", "fp16")),
    "text_column": (str, "your data's text (or question) column (default text)", None),
    "label_column": (str, "your data's label column (default label)", None),
    "choices_column": (str, "your data's choices column: makes the task multiple choice", None),
}
ADAPTER_OPTIONS = {
    "r": (int, "adapter rank (default 8)", None),
    "lora_alpha": (float, "scale numerator: s = alpha / r (default 16)", None),
    "lora_dropout": (float, "dropout on the adapter's input (default 0)", None),
    "target_modules": (list, "layer-name suffixes, one regex, or all-linear (default: attention query and value)", None),
    "use_rslora": (bool, "scale by alpha / sqrt(r)", None),
    "modules_to_save": (list, "modules trained in full (default: the classification head)", None),
    "moslora_mixer_init": (str, "MoSLoRA mixer init (default kaiming)", MIXER_INITS),
    "replora_hidden_size": (int, "RepLoRA generator width h (default r)", None),
    "replora_activation": (str, "RepLoRA generator activation (default tanh)", ACTIVATIONS),
    "replora_seed": (str, "RepLoRA seed matrices (default diagonal)", SEED_SHAPES),
    "replora_sharing": (str, "RepLoRA generator sharing (default block)", SHARING_SCOPES),
}
REGEX_CHARS = set("*?[]()|\\^$+")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_options(group, options: dict) -> None:
    for name, (kind, help_text, choices) in options.items():
        if kind is bool:
            group.add_argument(_flag(name), action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif kind is list:
            group.add_argument(_flag(name), nargs="+", default=argparse.SUPPRESS, help=help_text, metavar="NAME")
        else:
            group.add_argument(_flag(name), type=kind, choices=choices, default=argparse.SUPPRESS, help=help_text,
                               metavar=None if choices else name.upper())


def _target_value(value):
    if isinstance(value, list) and len(value) == 1 and (value[0] == "all-linear" or REGEX_CHARS & set(value[0])):
        return value[0]  # "all-linear" or a regex, not a suffix list
    return value


def read_settings_file(path: str) -> dict:
    """Settings from a TOML, YAML or JSON file: the same names as the flags, with underscores."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        elif file.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError("YAML config files need PyYAML: pip install pyyaml (or use .toml / .json)") from None
            data = yaml.safe_load(text)
        elif file.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except ValueError as e:  # JSONDecodeError, TOMLDecodeError and yaml's errors are ValueErrors or wrapped here
        raise ValueError(f"config file {path} does not parse: {str(e).splitlines()[0]}") from None
    except Exception as e:  # yaml.YAMLError is not a ValueError
        raise ValueError(f"config file {path} does not parse: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table / mapping of settings")
    return {k.replace("-", "_"): v for k, v in data.items()}


def settings_from(values: dict):
    """TrainSettings from flat option values (flags and config file alike); unknown names are refused."""
    from .train import TrainSettings

    known = set(TRAIN_OPTIONS) | set(ADAPTER_OPTIONS)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ValueError(f"unknown setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    train = {k: v for k, v in values.items() if k in TRAIN_OPTIONS}
    adapter = {k: v for k, v in values.items() if k in ADAPTER_OPTIONS}
    if "target_modules" in adapter:
        adapter["target_modules"] = _target_value(adapter["target_modules"])
    for key, value in train.items():
        kind = TRAIN_OPTIONS[key][0]
        if value is not None and kind in (int, str, bool) and not (type(value) is kind):
            raise ValueError(f"setting {key!r} must be {kind.__name__}, got {value!r}")
        if kind is float and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"setting {key!r} must be a number, got {value!r}")
    settings = TrainSettings(**train, adapter=adapter)
    settings.validate()
    return settings


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    values = read_settings_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k in TRAIN_OPTIONS or k in ADAPTER_OPTIONS})
    settings = settings_from(values)
    metrics = train(settings)
    print(summary([metrics]))
    print(f"run folder: {settings.output_dir()}")
    return 0


def summary(runs: list[dict]) -> str:
    lines = [f"{'method':<9} {'test acc':>9} {'val acc':>8} {'trainable':>10} {'steps':>6} {'time (s)':>9}"]
    for m in runs:
        lines.append(f"{m['method']:<9} {m['test_accuracy']:>9.4f} {m['validation_accuracy']:>8.4f} "
                     f"{m['trainable_parameters']:>10,} {m['steps']:>6} {m['wall_time_seconds']:>9.1f}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: LoRA and RepLoRA on MiniLM + Rotten Tomatoes with a short budget, side by side."""
    from .train import TrainSettings, train

    runs = []
    for method in args.methods:
        settings = TrainSettings(method=method, epochs=args.epochs, max_train_examples=args.max_train_examples,
                                 lr=args.lr, seed=args.seed, output=str(Path(args.output) / method), resume=True)
        runs.append(train(settings))
    print(f"\nMiniLM + Rotten Tomatoes, {args.max_train_examples} training snippets, {args.epochs} epochs, "
          f"lr {args.lr}, seed {args.seed}; test: {runs[0]['test_examples']} snippets of unseen movies")
    print(summary(runs))
    return 0


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


def cmd_experiment(args: argparse.Namespace) -> int:
    from . import experiments

    if args.name == "theory":
        from .theory import TheorySettings, run_theory

        overrides = {k: v for k, v in {"ns": tuple(args.ns) if args.ns else None, "repetitions": args.repetitions,
                                       "inits": args.inits, "lbfgs_steps": args.lbfgs_steps}.items() if v is not None}
        root = Path(args.output or "results/theory")
        print(run_theory(TheorySettings(**overrides), root))
        print(f"results in {root}")
        return 0

    grid = experiments.GRIDS[args.grid]
    overrides = {k: v for k, v in {
        "model": args.model, "dataset": args.dataset, "epochs": args.epochs,
        "max_train_examples": args.max_train_examples, "max_eval_examples": args.max_eval_examples,
        "methods": tuple(args.methods) if args.methods else None,
        "fractions": tuple(args.fractions) if args.fractions else None,
        "seeds": tuple(args.seeds) if args.seeds else None}.items() if v is not None}
    if args.lrs:
        overrides["lrs"] = parse_lrs(args.lrs, overrides.get("methods", grid.methods), grid.lrs)
    grid = __import__("dataclasses").replace(grid, **overrides)
    if missing := [m for m in grid.methods if not grid.lrs.get(m)]:
        raise ValueError(f"grid {args.grid} has no learning rates for {missing}: give them, e.g. --lrs {missing[0]}=1e-3")
    root = Path(args.output or f"results/{args.grid}")  # the experiments of a grid share its runs
    runs = Path(args.runs) if args.runs else None
    if args.name == "sample-efficiency":
        print(experiments.sample_efficiency(grid, root, runs))
    else:
        print(experiments.ablations(grid, root, runs=runs))
    print(f"results in {root}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """Runs grouped by method: test accuracy mean ± std over their seeds, and wall time."""
    from collections import defaultdict

    from .experiments import mean_std

    groups = defaultdict(list)
    for folder in args.runs:
        file = Path(folder) / "metrics.json"
        if not file.is_file():
            raise FileNotFoundError(f"{folder} holds no finished run (no metrics.json)")
        m = json.loads(file.read_text())
        groups[m["method"]].append(m)
    print(f"{'method':<9} {'runs':>4} {'seeds':<10} {'test accuracy':>16} {'wall time (s)':>16} {'trainable':>10}")
    for method, runs in groups.items():
        acc, secs = mean_std([m["test_accuracy"] for m in runs]), mean_std([m["wall_time_seconds"] for m in runs])
        seeds = ",".join(str(m["seed"]) for m in runs)
        print(f"{method:<9} {len(runs):>4} {seeds:<10} {100 * acc[0]:>9.2f} ± {100 * acc[1]:.2f} "
              f"{secs[0]:>9.0f} ± {secs[1]:.0f} {runs[0]['trainable_parameters']:>10,}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchSettings, run_bench

    overrides = {k: v for k, v in {"models": tuple(args.models) if args.models else None,
                                   "ranks": tuple(args.ranks) if args.ranks else None, "rounds": args.rounds,
                                   "steps": args.steps, "batch_size": args.batch_size,
                                   "seq_len": args.seq_len, "min_time": args.min_time}.items() if v is not None}
    print(run_bench(BenchSettings(**overrides), Path(args.output)))
    print(f"results in {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replora", description="RepLoRA, MoSLoRA, LoRA and DoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune a model with an adapter, evaluate it, keep the result",
                           description="Fine-tune a model with an adapter on a dataset, evaluate on its validation "
                                       "split each epoch and on its test split at the end. With no --model / "
                                       "--dataset: MiniLM on Rotten Tomatoes. Runs as well under `accelerate "
                                       "launch` or `torchrun`.",
                           epilog="Example: replora train --method replora --fraction 0.3 --seed 1 --output runs/x")
    train.add_argument("--config", help="TOML, YAML or JSON file of settings (names as the flags, with "
                                        "underscores); flags given here override it")
    _add_options(train.add_argument_group("run"), {k: TRAIN_OPTIONS[k] for k in list(TRAIN_OPTIONS)[:9]})
    _add_options(train.add_argument_group("training"), {k: TRAIN_OPTIONS[k] for k in list(TRAIN_OPTIONS)[9:20]})
    _add_options(train.add_argument_group("your data"), {k: TRAIN_OPTIONS[k] for k in list(TRAIN_OPTIONS)[20:]})
    _add_options(train.add_argument_group("adapter"), ADAPTER_OPTIONS)
    train.set_defaults(func=cmd_train)

    experiment = sub.add_parser("experiment", help="reproduce the papers' claims: grids of real runs, resumable")
    experiment.add_argument("name", choices=["sample-efficiency", "ablations", "theory"],
                            help="sample-efficiency: methods x training fractions x seeds; ablations: RepLoRA's "
                                 "options; theory: the estimation-rate simulation")
    experiment.add_argument("--grid", default="minilm-rt", choices=["minilm-rt", "smollm2-siqa"],
                            help="model, data and budget (default minilm-rt: MiniLM on Rotten Tomatoes)")
    experiment.add_argument("--output", help="results folder (default results/<grid>, shared by its experiments); rerun to resume")
    for flag, kind in [("--model", str), ("--dataset", str), ("--epochs", int), ("--max-train-examples", int),
                       ("--max-eval-examples", int)]:
        experiment.add_argument(flag, type=kind, help="override the grid's setting")
    experiment.add_argument("--methods", nargs="+", choices=METHODS + ("full",), help="override the grid's methods")
    experiment.add_argument("--fractions", nargs="+", type=float, help="override the grid's training fractions")
    experiment.add_argument("--seeds", nargs="+", type=int, help="override the grid's seeds")
    experiment.add_argument("--lrs", nargs="+", help="learning-rate grid picked from on validation: for every "
                            "method (1e-3 3e-3), or for one (lora=3e-3; repeat for several)")
    experiment.add_argument("--runs", help="runs folder (default <output>/runs): point a variant of a grid at the "
                            "grid's runs to reuse them")
    experiment.add_argument("--ns", nargs="+", type=int, help="theory: sample sizes (default 1e2 to 1e5, log grid)")
    experiment.add_argument("--repetitions", type=int, help="theory: repetitions per sample size (default 3)")
    experiment.add_argument("--inits", type=int, help="theory: initializations per fit (default 2)")
    experiment.add_argument("--lbfgs-steps", type=int, help="theory: L-BFGS iterations per fit (default 150)")
    experiment.set_defaults(func=cmd_experiment)

    summary_parser = sub.add_parser("summary", help="table of finished runs: accuracy mean ± std per method")
    summary_parser.add_argument("runs", nargs="+", help="run folders (each with a metrics.json)")
    summary_parser.set_defaults(func=cmd_summary)

    bench = sub.add_parser("bench", help="training and inference speed and memory against Hugging Face PEFT")
    bench.add_argument("--models", nargs="+", help="models to measure (default minilm smollm2; any --model value)")
    bench.add_argument("--ranks", nargs="+", type=int, help="adapter ranks (default 8 16 64)")
    bench.add_argument("--rounds", type=int, help="rounds of back-to-back pairs (default 15)")
    bench.add_argument("--steps", type=int, help="timed steps per contender per round, at least (default 2)")
    bench.add_argument("--batch-size", type=int, help="batch size (default 4)")
    bench.add_argument("--seq-len", type=int, help="tokens per example (default 32)")
    bench.add_argument("--min-time", type=float, help="seconds each timing spans at least (default 0.2)")
    bench.add_argument("--output", default="benchmarks/results", help="folder for bench.json, bench.md, bench.png")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="the main job: LoRA and RepLoRA on MiniLM + Rotten Tomatoes, a short budget")
    demo.add_argument("--methods", nargs="+", choices=METHODS, default=["lora", "replora"])
    demo.add_argument("--max-train-examples", type=int, default=2000)
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--lr", type=float, default=1e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--output", default="runs/demo")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .train import TrainingDiverged

    import logging

    args = build_parser().parse_args(argv)
    logger = logging.getLogger("replora")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("replora: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        return args.func(args)
    except TrainingDiverged as e:
        print(f"replora: stopped: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"replora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("replora: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
