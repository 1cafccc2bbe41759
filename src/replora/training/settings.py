"""TrainSettings: every setting of a run, each with its default and help beside it. The command line
(cli.py) is made from these fields, from AdapterConfig's and from the methods' options, so the help
and the defaults cannot drift apart."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FIELD_NAMES as ADAPTER_FIELDS
from ..config import AdapterConfig
from ..methods import METHODS, method_options

FULL = "full"  # full fine-tuning, the reference line of the experiments: no adapter, every weight trains
HEAD = "head"  # a linear probe: no adapter, only the new classification head trains
NO_ADAPTER = (FULL, HEAD)
TASKS = ("auto", "classification", "multiple-choice", "sft")
IMAGE_MODELS = ("dinov2-small", "efficientnet-lite0")  # the packaged image models
QUANTIZE = ("4bit", "8bit")  # --quantize: bitsandbytes NF4 or LLM.int8 (pretrained.quantized_loading)
DEFAULT_EPOCHS = 2  # the default budget: 2 passes, or more for small data (min_steps)


def setting(default: Any, help: str, group: str, choices=None, **kwargs):
    """A field with its help text, its group in `replora train --help` and its choices (a tuple, or a
    function giving one)."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices}, **kwargs)


@dataclass
class TrainSettings:
    """Everything a run needs; adapter options (r, lora_alpha, replora_activation, ...) go in `adapter`."""

    model: str | None = setting(None, "minilm (packaged all-MiniLM-L6-v2), smollm2 (packaged SmolLM2-135M-Instruct), "
                                      "gemma3-270m (packaged Gemma-3-270M, a decoder), dinov2-small (packaged DINOv2 "
                                      "ViT-S/14) or efficientnet-lite0 (packaged, convolutional) for images, a local "
                                      "transformers folder, or a hub id (default: minilm; smollm2 for --task sft; "
                                      "dinov2-small for images)", "run")
    dataset: str = setting("rotten_tomatoes", "rotten_tomatoes, social_iqa, strategyqa (multiple choice), commonsense "
                                              "or commonsense:<task> (generative), cifar10 (images), a .csv / .jsonl "
                                              "file, a folder of images (one subfolder per class), a saved Hugging "
                                              "Face dataset folder, or hf:<hub id>", "run")
    task: str = setting("auto", "classification, multiple-choice, or sft (generative: the loss on the response, "
                                "answers read back by generation); auto: from the data (rows with prompt and response, "
                                "or messages, are sft)", "run", TASKS)
    method: str = setting("lora", f"adapter method; {FULL} = full fine-tuning, {HEAD} = the new head alone (a linear "
                                  "probe); neither saves an adapter", "run",
                          lambda: tuple(METHODS) + NO_ADAPTER)  # read when asked: methods registered later count
    fraction: float = setting(1.0, "train on this seeded, stratified fraction of the training split", "run")
    epochs: int | None = setting(None, "passes over the training data (default: 2, or more when 2 passes take "
                                       "fewer than --min-steps optimizer steps)", "run")
    min_steps: int = setting(300, "the default budget's floor: without --epochs or --max-steps a run makes whole passes "
                                  "until it has taken at least this many optimizer steps, so small data trains long "
                                  "enough (at batch 32, data under 4,800 examples gets more than 2 epochs); 0 keeps 2 "
                                  "epochs whatever the size", "run")
    max_steps: int | None = setting(None, "stop after this many optimizer steps instead (overrides --epochs)", "run")
    eval_steps: int | None = setting(None, "validate every this many optimizer steps and at the last one (default: "
                                           "at the end of each epoch); each validation is a row of metrics.json's "
                                           "history", "run")
    keep: str = setting("best", "the adapter saved to <output>/adapter and tested: best = the best validation "
                                "(accuracy; sft: loss) of all validations, last = the last step's. best by default, "
                                "so that a budget long enough for small data cannot end on an over-trained adapter; "
                                "only validation picks it, never test", "run", ("best", "last"))
    early_stopping_patience: int | None = setting(None, "stop after this many validations in a row without a better "
                                                        "score (default: off, the whole budget runs; --keep best "
                                                        "keeps the best anyway)", "run")
    seed: int = setting(0, "seed of the head init, data order, dropout and --fraction", "run")
    output: str | None = setting(None, "run folder (default: runs/<dataset>-<model>-<method>-f<fraction>-s<seed>)", "run")
    resume: bool = setting(False, "continue the run in --output from its last checkpoint", "run")
    batch_size: int = setting(32, "global batch size, kept whatever the number of processes", "training")
    grad_accum: int = setting(1, "gradient accumulation steps", "training")
    lr: float = setting(1e-3, "peak learning rate of AdamW", "training")
    warmup_ratio: float = setting(0.06, "share of steps with linear warm-up, then linear decay", "training")
    weight_decay: float = setting(0.0, "AdamW weight decay", "training")
    max_grad_norm: float | None = setting(1.0, "clip gradients to this norm (0 turns clipping off)", "training")
    max_length: int = setting(64, "tokens per example", "training")
    max_train_examples: int | None = setting(None, "cap the training split (a fixed stratified subset) before "
                                                   "--fraction", "training")
    max_eval_examples: int | None = setting(None, "cap the validation and test splits (fixed subsets)", "training")
    eval_batch_size: int = setting(64, "batch size for evaluation", "training")
    mixed_precision: str = setting("no", "autocast precision", "training", ("no", "bf16", "fp16"))
    quantize: str | None = setting(None, "load the base model quantized with bitsandbytes (QLoRA): 4bit (NF4) or 8bit "
                                         "(LLM.int8); the adapter and a new head train in full precision on the frozen "
                                         "quantized base. Needs `pip install bitsandbytes`; not for --method full or "
                                         "the packaged image models (default: full precision)", "training",
                                   QUANTIZE)
    text_column: str = setting("text", "your data's text (or question) column", "your data")
    label_column: str = setting("label", "your data's label column", "your data")
    choices_column: str | None = setting(None, "your data's choices column: makes the task multiple choice", "your data")
    image_size: int | None = setting(None, "images: pixels a side the model sees (default: its processor's, 224 for "
                                           "the packaged models); fewer train much faster on a CPU", "training")
    max_new_tokens: int = setting(32, "sft: the most tokens generated per test answer (greedy)", "training")
    adapter: dict = field(default_factory=dict, metadata={"help": "AdapterConfig options"})

    def validate(self) -> None:
        _check_fields(self, counts=("batch_size", "grad_accum", "max_length", "eval_batch_size", "max_new_tokens"),
                      optional_counts=("epochs", "max_steps", "eval_steps", "early_stopping_patience",
                                       "max_train_examples", "max_eval_examples", "image_size"))
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ValueError(f"min_steps must be an integer >= 0 (0 turns it off), got {self.min_steps!r}")
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise ValueError(f"lr must be a number in (0, 1), got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm!r}")
        if self.quantize is not None and self.model in IMAGE_MODELS:
            raise ValueError(f"--quantize {self.quantize} is not supported for image models ({self.model!r}): "
                             "bitsandbytes quantizes transformers text models' linear layers as they load; train "
                             "image models in full precision (leave out --quantize)")
        if self.quantize is not None and self.method == FULL:
            raise ValueError(f"--quantize {self.quantize} loads a frozen quantized base for an adapter to train on, but "
                             f"--method {FULL} trains every weight, and quantized weights cannot be trained: choose an "
                             "adapter method (or --method head), or leave out --quantize")
        if self.method in NO_ADAPTER:
            if self.adapter:
                raise ValueError(f"method {self.method!r} trains no adapter, so it takes no adapter options; got "
                                 f"{sorted(self.adapter)}")
        else:
            self.adapter_config(head=None)  # adapter options are checked by AdapterConfig

    def adapter_config(self, head: str | None, default_targets: list[str] | None = None) -> AdapterConfig:
        options = dict(self.adapter)
        if head is not None and "modules_to_save" not in options:
            options["modules_to_save"] = [head]  # the new classification head trains in full
        if default_targets and "target_modules" not in options:
            options["target_modules"] = default_targets  # a model without query/value projections (a CNN)
        return AdapterConfig(method=self.method, **options)

    def model_name(self, task_kind: str | None = None, images: bool = False) -> str:
        """The model to load: the one asked for, or the task's default."""
        if self.model is not None:
            return self.model
        if images:
            return "dinov2-small"
        return "smollm2" if (task_kind or self.task) == "sft" else "minilm"

    def planned_epochs(self, steps_per_epoch: int) -> int:
        """The passes of a run: --epochs, else the default budget (2 passes, more until --min-steps steps)."""
        if self.epochs is not None:
            return self.epochs
        return max(DEFAULT_EPOCHS, math.ceil(self.min_steps / steps_per_epoch))

    def output_dir(self) -> Path:
        if self.output:
            return Path(self.output)
        dataset = Path(self.dataset.replace(":", "-")).stem
        return Path("runs") / f"{dataset}-{Path(self.model_name()).name}-{self.method}-f{self.fraction:g}-s{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EvalSettings:
    """`replora eval`: a generative adapter (or the base model) scored on each task of a dataset."""

    adapter: str | None = setting(None, "a run folder of replora train (its model and settings are used) or an "
                                        "adapter folder; leave out, with --model, for the base model's own row", "eval")
    model: str | None = setting(None, "the base model (default: the run's, or the adapter's base_model_name_or_path)",
                                "eval")
    dataset: str = setting("commonsense", "commonsense (the eight test sets), commonsense:<task>, or generative data "
                                          "(a .jsonl / .csv file of prompt and response)", "eval")
    scoring: str = setting("generate", "generate: greedy answers naming the right choice; loglik: the choice whose "
                                       "answer the model finds likeliest (choice items only)", "eval",
                           ("generate", "loglik"))
    max_eval_examples: int | None = setting(None, "score at most this many items per test set (a seeded sample, "
                                                  "the same for every model)", "eval")
    seed: int = setting(0, "seed of that sample", "eval")
    max_new_tokens: int = setting(16, "the most tokens generated per answer", "eval")
    max_length: int | None = setting(None, "tokens per prompt and answer (default: the run's --max-length, else 256)",
                                     "eval")
    quantize: str | None = setting(None, "load the base model quantized with bitsandbytes: 4bit or 8bit (default: as "
                                         "the run was trained, its settings.json's quantize; else full precision)",
                                   "eval", QUANTIZE)
    batch_size: int = setting(16, "prompts generated together", "eval")
    output: str | None = setting(None, "folder for eval.json and eval.md (default: eval-<dataset>-<scoring>-... in "
                                       "the run folder, or under runs/eval)", "eval")

    def validate(self) -> None:
        _check_fields(self, counts=("max_new_tokens", "batch_size"), optional_counts=("max_eval_examples", "max_length"))


def _check_fields(settings, counts: tuple[str, ...], optional_counts: tuple[str, ...]) -> None:
    """Counts are positive integers (the optional ones may be None) and fields with choices hold one."""
    for name in counts + optional_counts:
        value = getattr(settings, name)
        if value is None and name in optional_counts:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for f in dataclasses.fields(settings):
        choices, value = _choices(f), getattr(settings, f.name)
        if value is None and f.default is None:  # an optional setting left out (e.g. quantize: full precision)
            continue
        if choices and value not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(settings, f.name)!r}")


@dataclass(frozen=True)
class Flag:
    """One command-line setting: its name, value type (int, float, str, bool = a switch, list = one or
    more values), default, help and choices, read from the field or option that defines it."""

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple | None
    group: str


def _choices(f: dataclasses.Field) -> tuple | None:
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def _kind(hint) -> type:
    """The command-line kind of a field's type: bool, int, float, str, or list (one or more values)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if any(typing.get_origin(a) is list or a is list for a in args):
        return list
    return args[0] if args[0] in (bool, int, float, str) else str


def train_flags() -> dict[str, Flag]:
    return flags_of(TrainSettings)


def flags_of(settings: type) -> dict[str, Flag]:
    """The flags of a settings dataclass, from its fields (those made with `setting`)."""
    hints = typing.get_type_hints(settings)
    return {f.name: Flag(f.name, _kind(hints[f.name]), f.default, f.metadata["help"], _choices(f), f.metadata["group"])
            for f in dataclasses.fields(settings) if "group" in f.metadata}


def adapter_flags() -> dict[str, Flag]:
    """AdapterConfig's shared fields (but `method`, a run setting) and every method's own options."""
    hints = typing.get_type_hints(AdapterConfig)
    fields = {f.name: f for f in dataclasses.fields(AdapterConfig)}
    flags = {name: Flag(name, _kind(hints[name]), fields[name].default, fields[name].metadata["help"], None, "adapter")
             for name in ADAPTER_FIELDS if name != "method"}
    for name, (owner, option) in method_options().items():
        flags[name] = Flag(name, option.type, option.default, f"{owner}: {option.help}", option.choices, "adapter")
    return flags


REGEX_CHARS = set("*?[]()|\\^$+")


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


def settings_from(values: dict) -> TrainSettings:
    """TrainSettings from flat option values (flags and config file alike); unknown names are refused."""
    train, adapter = train_flags(), adapter_flags()
    known = set(train) | set(adapter)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ValueError(f"unknown setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    run = {k: v for k, v in values.items() if k in train}
    options = {k: v for k, v in values.items() if k in adapter}
    if "target_modules" in options:
        options["target_modules"] = _target_value(options["target_modules"])
    for key, value in run.items():
        kind = train[key].kind
        if value is not None and kind in (int, str, bool) and not (type(value) is kind):
            raise ValueError(f"setting {key!r} must be {kind.__name__}, got {value!r}")
        if kind is float and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"setting {key!r} must be a number, got {value!r}")
    settings = TrainSettings(**run, adapter=options)
    settings.validate()
    return settings
