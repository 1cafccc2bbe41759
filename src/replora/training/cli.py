"""The `replora` command line: `replora train`, `replora eval`, `replora export-gguf`, `replora summary`,
`replora demo`. Every flag of
`replora train` is made from a field of TrainSettings or AdapterConfig, or from a method's options
(settings.py): its help and default live there, once."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from ..methods import METHODS
from .settings import EvalSettings, Flag, adapter_flags, flags_of, read_settings_file, settings_from, train_flags


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_help(flag: Flag) -> str:
    """The help line of a flag: its field's help, then its default unless it has none (None) or is a switch."""
    if flag.kind is bool or flag.default is None or "(default" in flag.help:
        return flag.help
    shown = " ".join(flag.default) if isinstance(flag.default, list) else flag.default
    return f"{flag.help} (default {shown})"


def _add_flags(group, flags) -> None:
    for flag in flags:
        # Defaults stay in the settings: an absent flag leaves the setting (or the config file's value) alone.
        options = dict(default=argparse.SUPPRESS, help=flag_help(flag))
        if flag.kind is bool:
            group.add_argument(_flag(flag.name), action="store_true", **options)
        elif flag.kind is list:
            group.add_argument(_flag(flag.name), nargs="+", metavar="NAME", **options)
        else:
            group.add_argument(_flag(flag.name), type=flag.kind, choices=flag.choices,
                               metavar=None if flag.choices else flag.name.upper(), **options)


def cmd_train(args: argparse.Namespace) -> int:
    from .loop import run_notes, train

    values = read_settings_file(args.config) if args.config else {}
    known = train_flags() | adapter_flags()
    values.update({k: v for k, v in vars(args).items() if k in known})
    settings = settings_from(with_the_runs_settings(values) if values.get("resume") else values)
    metrics = train(settings)
    print(summary([metrics]))
    for note in run_notes(metrics):  # the adapter kept, an early stop, a score still improving at the end
        print(note)
    print(f"run folder: {metrics['output']}")  # (its name holds the model the task chose when none was given)
    return 0


def with_the_runs_settings(values: dict) -> dict:
    """`--output X --resume` continues the run in X with the settings its settings.json records; settings given
    beside it must agree with them (train refuses any that differ, naming them)."""
    file = Path(values.get("output") or "") / "settings.json"
    if not values.get("output") or not file.is_file():
        return values  # nothing to continue: a new run starts
    try:
        saved = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}): restore it, or start a new run in another --output") from None
    known = train_flags() | adapter_flags()
    recorded = {**{k: v for k, v in saved.items() if k != "adapter"}, **(saved.get("adapter") or {})}
    return {**{k: v for k, v in recorded.items() if k in known}, **values}


def headline(m: dict) -> str:
    """A run's main test figure: accuracy, or exact match for generative runs."""
    return "test_exact_match" if "test_exact_match" in m else "test_accuracy"


def summary(runs: list[dict]) -> str:
    generative = any("test_exact_match" in m for m in runs)
    heads = ("test EM", "test loss", "val loss") if generative else ("test acc", "val acc", "")
    lines = [f"{'method':<9} {heads[0]:>9} {heads[1]:>9} {heads[2]:>8} {'trainable':>10} {'steps':>6} {'time (s)':>9}"]
    for m in runs:
        figures = ((m["test_exact_match"], m["test_loss"], m["validation_loss"]) if generative
                   else (m["test_accuracy"], m["validation_accuracy"], None))
        lines.append(f"{m['method']:<9} {figures[0]:>9.4f} {figures[1]:>9.4f} "
                     f"{'' if figures[2] is None else f'{figures[2]:.4f}':>8} {m['trainable_parameters']:>10,} "
                     f"{m['steps']:>6} {m['wall_time_seconds']:>9.1f}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: LoRA and RepLoRA on MiniLM + Rotten Tomatoes with a short budget, side by side."""
    from .loop import train
    from .settings import TrainSettings

    print(f"replora demo: writing one run folder per method to {Path(args.output)}/ "
          f"({', '.join(str(Path(args.output) / m) for m in args.methods)})")
    runs = []
    for method in args.methods:
        # The demo's own budget, as its README figures were made: its epochs, the last step's adapter.
        settings = TrainSettings(method=method, epochs=args.epochs, max_train_examples=args.max_train_examples,
                                 lr=args.lr, seed=args.seed, keep="last", output=str(Path(args.output) / method),
                                 resume=True)
        runs.append(train(settings))
    print(f"\nMiniLM + Rotten Tomatoes, {args.max_train_examples} training snippets, {args.epochs} epoch{'s' * (args.epochs != 1)}, "
          f"lr {args.lr}, seed {args.seed}; test: {runs[0]['test_examples']} snippets of unseen movies")
    print(summary(runs))
    print(f"run folders: {', '.join(str(Path(r['output'])) for r in runs)} (settings.json, metrics.json, log.txt, "
          f"adapter/); replora summary {args.output} tabulates them")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_generative, table

    values = {k: v for k, v in vars(args).items() if k in flags_of(EvalSettings)}
    row = evaluate_generative(EvalSettings(**values))
    print(table([row]))
    print(f"written to {row['output']}")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    """An adapter (run folder or adapter folder) on its base model, written as a llama.cpp LoRA adapter GGUF."""
    import torch

    from ..gguf import export_gguf, modules_to_save_refusal
    from ..saving import load_adapter, read_adapter
    from .evaluation import model_and_adapter
    from .pretrained import load_causal_lm

    model_name, adapter, _ = model_and_adapter(args.adapter, args.model)
    config, _ = read_adapter(adapter)
    if config.modules_to_save:  # (a classifier's head: the causal LM loaded below has no such module to load it into)
        raise ValueError(f"--adapter {args.adapter}: " + modules_to_save_refusal("default", list(config.modules_to_save)))
    model, _ = load_causal_lm(model_name)
    load_adapter(model, adapter)
    print(f"written to {export_gguf(model, args.output, dtype=getattr(torch, args.dtype))}")
    return 0


IGNORED_IN_SUMMARY = ("seed", "output", "resume")  # what may differ between the seeds of one experiment


def find_runs(paths: list[str]) -> tuple[list[Path], list[str]]:
    """(finished run folders, one line per path skipped): a path is a run folder (it holds metrics.json) or a
    folder with runs below it (`runs/demo` holds `lora/` and `replora/`); anything else is skipped, saying why."""
    runs, skipped = [], []
    for given in paths:
        path = Path(given)
        if (path / "metrics.json").is_file():
            runs.append(path)
        elif not path.exists():
            skipped.append(f"skipped {given}: no such file or folder")
        elif not path.is_dir():
            skipped.append(f"skipped {given}: a file, not a run folder")
        else:
            below = sorted(p.parent for p in path.rglob("metrics.json") if "checkpoints" not in p.parent.parts)
            runs += below
            if not below:
                unfinished = " (an unfinished run: continue it with --resume)" if (path / "settings.json").is_file() else ""
                skipped.append(f"skipped {given}: no finished run in it or below (no metrics.json){unfinished}")
    once = {}  # each run once, in the order found, whatever path led to it
    for path in runs:
        once.setdefault(path.resolve(), path)
    return list(once.values()), skipped


def _run_settings(folder: Path, metrics: dict) -> dict:
    """A run's settings, flat (adapter options as adapter.<name>): settings.json, else what metrics.json records."""
    file = folder / "settings.json"
    try:
        saved = json.loads(file.read_text()) if file.is_file() else None
    except json.JSONDecodeError:
        saved = None
    if not isinstance(saved, dict):
        saved = {k: metrics[k] for k in ("model", "dataset", "task", "method", "fraction", "lr", "seed") if k in metrics}
    flat = {k: v for k, v in saved.items() if k != "adapter"}
    flat.update({f"adapter.{k}": v for k, v in (saved.get("adapter") or {}).items()})
    flat.update({k: metrics[k] for k in ("dataset", "method", "model", "seed") if k in metrics})
    return flat


def cmd_summary(args: argparse.Namespace) -> int:
    """Runs grouped by every setting that differs between them but the seed (dataset, model, method, and e.g.
    fraction or lr): the test figure's mean ± std over the seeds, and wall time. Paths that are not runs are
    skipped (one line each); folders are searched for the runs below them."""
    folders, skipped = find_runs(args.runs)
    runs = []
    for folder in folders:
        try:
            m = json.loads((folder / "metrics.json").read_text())
            figure = headline(m)
            m[figure], m["method"], m["wall_time_seconds"]  # noqa: B018 (the fields the table needs)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            skipped.append(f"skipped {folder}: its metrics.json is not a finished run's ({type(e).__name__}: {e})")
            continue
        runs.append((m, _run_settings(folder, m)))
    for line in skipped:
        print(line, file=sys.stderr)
    if not runs:
        raise FileNotFoundError(f"no finished run (a folder with metrics.json) in or below {' '.join(args.runs)}")
    keys = sorted({k for _, flat in runs for k in flat} - set(IGNORED_IN_SUMMARY) - {"dataset", "model", "method"})
    differing = [k for k in keys if len({json.dumps(flat.get(k), sort_keys=True) for _, flat in runs}) > 1]
    groups = defaultdict(list)
    for m, flat in runs:
        rest = tuple((k, flat.get(k)) for k in differing)
        groups[m.get("dataset"), Path(str(m.get("model"))).name, m["method"], rest].append(m)
    print(f"{'dataset':<16} {'model':<12} {'method':<9} {'runs':>4} {'seeds':<10} {'test figure':<18} {'mean ± std':>14} "
          f"{'wall time (s)':>16} {'trainable':>10}" + ("  settings that differ" if differing else ""))
    for (dataset, model, method, rest), group in groups.items():
        figure = headline(group[0])
        acc, secs = _mean_std([m[figure] for m in group]), _mean_std([m["wall_time_seconds"] for m in group])
        seeds = ",".join(str(m.get("seed")) for m in group)
        setting = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in rest)
        print(f"{str(dataset)[:16]:<16} {model[:12]:<12} {method:<9} {len(group):>4} {seeds:<10} "
              f"{figure.replace('test_', '').replace('_', ' '):<18} {100 * acc[0]:>7.2f} ± {100 * acc[1]:<5.2f} "
              f"{secs[0]:>9.0f} ± {secs[1]:<4.0f} {group[0].get('trainable_parameters', 0):>10,}"
              + (f"  {setting}" if setting else ""))
    return 0


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


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
    groups = defaultdict(list)
    for flag in (train_flags() | adapter_flags()).values():
        groups[flag.group].append(flag)
    for title, flags in groups.items():
        _add_flags(train.add_argument_group(title), flags)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="score a generative adapter (or the base model) on each test set",
                              description="Score a generative adapter, or the base model, on each task of a dataset "
                                          "(default: the eight commonsense test sets) by greedy generation or by "
                                          "the log-likelihood of each choice; prints and writes the paper-style row.",
                              epilog="Example: replora eval --adapter runs/cs-lora --scoring loglik "
                                     "--max-eval-examples 100")
    _add_flags(evaluate, flags_of(EvalSettings).values())
    evaluate.set_defaults(func=cmd_eval)

    gguf = sub.add_parser("export-gguf", help="write an adapter as a llama.cpp LoRA adapter (GGUF), LLaMA models",
                          description="Write a trained adapter (any method but DoRA, reduced to LoRA factors) as a "
                                      "llama.cpp LoRA adapter GGUF for its LLaMA-architecture base model (SmolLM2).",
                          epilog="Example: replora export-gguf --adapter runs/sft-lora --output lora.gguf; then "
                                 "llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --lora lora.gguf")
    gguf.add_argument("--adapter", required=True, help="a run folder (settings.json and adapter/) or an adapter folder")
    gguf.add_argument("--output", required=True, help="the .gguf file to write (an existing file is replaced)")
    gguf.add_argument("--model", help="the base model (default: the run's, or the adapter's base_model_name_or_path)")
    gguf.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                      help="tensor type (default float32)")
    gguf.set_defaults(func=cmd_export_gguf)

    summary_parser = sub.add_parser("summary", help="table of finished runs: accuracy mean ± std per method",
                                    description="Finished runs grouped by every setting that differs between them "
                                                "but the seed; each group's test figure as mean ± std over its seeds. "
                                                "Paths that hold no finished run are skipped, one line each.",
                                    epilog="Example: replora summary runs/*  (runs/demo's two runs are found below it)")
    summary_parser.add_argument("runs", nargs="+", help="run folders (each with a metrics.json), or folders with "
                                                        "runs below them")
    summary_parser.set_defaults(func=cmd_summary)

    demo = sub.add_parser("demo", help="the main job: LoRA and RepLoRA on MiniLM + Rotten Tomatoes, a short budget",
                          description="Train each method on the packaged MiniLM and Rotten Tomatoes with the same short "
                                      "budget (the last step's adapter), test each on 2,000 snippets of unseen movies "
                                      "and print them side by side. One run folder per method under --output; a demo "
                                      "stopped part-way resumes where it stopped.",
                          epilog="Example: replora demo --methods lora dora --max-train-examples 500 --epochs 1")
    demo.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=["lora", "replora"], metavar="METHOD",
                      help=f"the methods to train, side by side: {', '.join(METHODS)} (default lora replora)")
    demo.add_argument("--max-train-examples", type=int, default=2000, metavar="N",
                      help="training snippets (a fixed stratified subset; default 2000)")
    demo.add_argument("--epochs", type=int, default=2, help="passes over the training snippets (default 2)")
    demo.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 0.001)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the head init, data order and dropout (default 0)")
    demo.add_argument("--output", default="runs/demo",
                      help="folder of the run folders, one per method: <output>/<method> (default runs/demo)")
    demo.set_defaults(func=cmd_demo)
    return parser


def _for_the_console(record) -> bool:
    """Progress lines once, from the first process (torchrun and accelerate set RANK in each), and not the
    lines the command prints itself at the end (the results, the notes: marked file_only, for log.txt)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0 and not getattr(record, "file_only", False)


def run_command(args: argparse.Namespace, prog: str = "replora", resume_hint: str = "continue with --resume") -> int:
    """Run a parsed command with training's progress lines shown, and every expected failure as one
    line and an exit code: 2 for bad input, 1 for a diverged run, 130 for Ctrl-C. (research/ uses it too.)"""
    import logging

    from .loop import TrainingDiverged

    # bitsandbytes (imported by transformers' Trainer, which inject readies) warns on import on some CPUs that it
    # cannot fetch an optional kernel from the hub; it falls back by itself, and the line only alarms newcomers
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logger = logging.getLogger("replora")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("replora: %(message)s"))
        handler.addFilter(_for_the_console)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        return args.func(args)
    except TrainingDiverged as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {resume_hint}", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
