"""Datasets for training: Rotten Tomatoes (default), BIG-bench social_iqa / strategyqa, and a user's
CSV / JSON Lines file or Hugging Face dataset; images (CIFAR-10, a folder) come from images.py.

Every example is a dict: {"text": str, "label": int} for classification,
{"text": question, "choices": [str, ...], "label": index of the right choice} for multiple choice, or
{"prompt": str, "response": str} / {"messages": [{"role", "content"}, ...]} for generative fine-tuning
(sft; the commonsense items add "choices", "label" and "task").
"""
from __future__ import annotations

import bz2
import csv
import json
import random
from collections import defaultdict
from pathlib import Path

from .images import load_images
from .pretrained import rotten_tomatoes_csv
from .tasks import KIND_OF_TASK, SPLIT_SEED, TASK_OF_KIND, TaskData

TASK_DATA = Path(__file__).parent / "task_data"
BIGBENCH_TASKS = ("social_iqa", "strategyqa")
BUILTIN = ("rotten_tomatoes",) + BIGBENCH_TASKS + ("commonsense", "commonsense:<task>", "cifar10")

# Rotten Tomatoes: reviews of one movie never straddle two splits.
RT_VALIDATION, RT_TEST = 1000, 2000


def load_task(dataset: str, text_column: str = "text", label_column: str = "label",
              choices_column: str | None = None, task: str = "auto") -> TaskData:
    """A built-in dataset by name, or a user's .csv / .jsonl file or Hugging Face dataset
    (a folder saved with `save_to_disk`, or `hf:<hub id>` where a network is available).
    `task` (auto, classification, multiple-choice, sft) says how to read a user's rows."""
    data = _builtin(dataset)
    if data is not None:
        wanted = KIND_OF_TASK.get(task)
        if wanted and wanted != data.kind:
            what = "an image classification" if data.images else f"a {TASK_OF_KIND[data.kind]}"
            raise ValueError(f"dataset {dataset!r} is {what} task, not {task}; drop --task or choose another dataset")
        return data
    columns = dict(text_column=text_column, label_column=label_column, choices_column=choices_column, task=task)
    if dataset.startswith("hf:"):
        return _from_rows(dataset, _hf_rows(dataset[3:], hub=True), **columns)
    path = Path(dataset)
    if not path.exists():
        raise FileNotFoundError(f"dataset {dataset!r} is neither a built-in one ({', '.join(BUILTIN)}) nor an "
                                "existing .csv / .jsonl file or saved Hugging Face dataset folder")
    if path.is_dir():
        return _from_rows(path.name, _hf_rows(str(path), hub=False), **columns)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, line {number}: each line must be a JSON object")
                rows.append(row)
    else:
        raise ValueError(f"dataset file {path} must end in .csv or .jsonl")
    return _from_rows(path.stem, rows, **columns)


def _builtin(dataset: str) -> TaskData | None:
    """A built-in dataset, or a folder of images (training/images.py)."""
    images = load_images(dataset)
    if images is not None:
        return images
    if dataset == "rotten_tomatoes":
        return rotten_tomatoes()
    if dataset in BIGBENCH_TASKS:
        return bigbench(dataset)
    if dataset.partition(":")[0] == "commonsense":
        from .commonsense import commonsense_task  # (its 150k items are read only when asked for)

        return commonsense_task(dataset)
    return None


def _hf_rows(source: str, hub: bool) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ValueError("reading a Hugging Face dataset needs the `datasets` package: pip install datasets") from None
    data = datasets.load_dataset(source) if hub else datasets.load_from_disk(source)
    if isinstance(data, datasets.DatasetDict):
        rows = []
        for split, part in data.items():
            rows += [{**row, "split": {"valid": "validation", "dev": "validation"}.get(split, split)} for row in part]
        return rows
    return list(data)


def _from_rows(name: str, rows: list[dict], text_column: str, label_column: str,
               choices_column: str | None, task: str = "auto") -> TaskData:
    """User data: a `split` column (train / validation / test) is honoured; otherwise a fixed 80/10/10 split."""
    if not rows:
        raise ValueError(f"dataset {name!r} has no rows")
    generative = "messages" in rows[0] or {"prompt", "response"} <= set(rows[0])
    if task == "sft" or (task == "auto" and generative and choices_column is None):
        return _with_splits(name, "sft", [sft_example(name, number, row) for number, row in enumerate(rows, 1)], [])
    needed = [text_column, label_column] + ([choices_column] if choices_column else [])
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise ValueError(f"dataset {name!r} has no column {missing[0]!r}; its columns are {', '.join(rows[0])} "
                         "(name yours with --text-column / --label-column / --choices-column)")
    examples, label_names = [], []
    if choices_column is None:
        label_names = sorted({str(r[label_column]) for r in rows}, key=_natural)
        if len(label_names) < 2:
            raise ValueError(f"dataset {name!r}: column {label_column!r} has a single value; a classifier needs two or more")
        if len(label_names) > max(20, len(rows) // 2):  # free text, not labels: almost one class per row
            raise ValueError(f"dataset {name!r}: column {label_column!r} has {len(label_names)} different values in "
                             f"{len(rows)} rows, so it is text rather than class labels; to train a model to write "
                             "it, use --task sft with columns prompt and response (or messages)")
    index = {label: i for i, label in enumerate(label_names)}
    for number, row in enumerate(rows, 1):
        text, label = row.get(text_column), row.get(label_column)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"dataset {name!r}, row {number}: {text_column!r} must be non-empty text, got {text!r}")
        example = {"text": text, "split": row.get("split")}
        if choices_column is None:
            example["label"] = index[str(label)]
        else:
            choices = row[choices_column]
            if isinstance(choices, str):
                try:
                    choices = json.loads(choices)
                except json.JSONDecodeError:
                    choices = None
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise ValueError(f"dataset {name!r}, row {number}: {choices_column!r} must be a list of two or more "
                                 "strings (in a CSV: a JSON list)")
            try:
                label = int(label)
            except (TypeError, ValueError):
                label = -1
            if not 0 <= label < len(choices):
                raise ValueError(f"dataset {name!r}, row {number}: {label_column!r} must be the index of the right "
                                 f"choice (0 to {len(choices) - 1}), got {row[label_column]!r}")
            example.update(choices=choices, label=label)
        examples.append(example)
    kind = "classification" if choices_column is None else "multiple_choice"
    return _with_splits(name, kind, examples, label_names)


def _with_splits(name: str, kind: str, examples: list[dict], label_names: list[str]) -> TaskData:
    if any(e["split"] for e in examples):
        splits = defaultdict(list)
        for e in examples:
            if e["split"] not in ("train", "validation", "test"):
                raise ValueError(f"dataset {name!r}: split values must be train, validation or test, got {e['split']!r}")
            splits[e.pop("split")].append(e)
        for split in ("train", "validation", "test"):
            if not splits[split]:
                raise ValueError(f"dataset {name!r}: the split column has no {split!r} rows")
        return TaskData(name, kind, splits["train"], splits["validation"], splits["test"], label_names)
    for e in examples:
        e.pop("split")
    train, validation, test = _split(examples, 0.1, 0.1)
    return TaskData(name, kind, train, validation, test, label_names)


ROLES = ("system", "user", "assistant")


def sft_example(name: str, number: int, row: dict) -> dict:
    """A generative example from a user's row: prompt and response, or a chat in `messages` (the last
    message is the assistant's answer the loss is taken on). Checked here, so a bad row stops the run
    before anything is written."""
    where = f"dataset {name!r}, row {number}"
    if "messages" in row:
        messages = row["messages"]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                messages = None
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError(f"{where}: 'messages' must be a list of two or more {{role, content}} messages "
                             "(in a CSV: a JSON list)")
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise ValueError(f"{where}: each message needs a role among {', '.join(ROLES)}, got "
                                 f"{message.get('role') if isinstance(message, dict) else message!r}")
            if not isinstance(message.get("content"), str) or not message["content"].strip():
                raise ValueError(f"{where}: a {message['role']} message has empty or missing content")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's answer (the loss is taken on it), "
                             f"got role {messages[-1]['role']!r}")
        return {"messages": messages, "split": row.get("split")}
    for column in ("prompt", "response"):
        if column not in row:
            raise ValueError(f"dataset {name!r} has no column {column!r}; generative (--task sft) rows need prompt and "
                             f"response, or messages; its columns are {', '.join(row)}")
        if not isinstance(row[column], str) or not row[column].strip():
            raise ValueError(f"{where}: {column!r} must be non-empty text, got {row[column]!r}")
    return {"prompt": row["prompt"], "response": row["response"], "split": row.get("split")}


def _natural(label: str):
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


def _split(examples: list[dict], validation: float, test: float):
    order = list(range(len(examples)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_val, n_test = round(validation * len(order)), round(test * len(order))
    pick = lambda idx: [examples[i] for i in idx]  # noqa: E731
    return pick(order[n_val + n_test:]), pick(order[:n_val]), pick(order[n_val:n_val + n_test])


def rotten_tomatoes() -> TaskData:
    """Fresh (1) vs rotten (0) review snippets, "plot" rows dropped, split by movie: movies in a fixed
    shuffled order fill the test split (up to 2,000 snippets) then the validation split (up to 1,000); a
    movie that would overflow a split goes on whole. Sizes: train 9,809, validation 999, test 2,000
    snippets (57.7% fresh in train)."""
    by_movie = defaultdict(list)
    with bz2.open(rotten_tomatoes_csv(), "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in ("fresh", "rotten"):
                by_movie[row["movie_name"]].append({"text": row["text"], "label": int(row["category"] == "fresh"),
                                                    "movie": row["movie_name"]})
    movies = sorted(by_movie)
    random.Random(SPLIT_SEED).shuffle(movies)
    test, validation, train = [], [], []
    for movie in movies:
        reviews = by_movie[movie]
        if len(test) + len(reviews) <= RT_TEST:
            test += reviews
        elif len(validation) + len(reviews) <= RT_VALIDATION:
            validation += reviews
        else:
            train += reviews
    return TaskData("rotten_tomatoes", "classification", train, validation, test, ["rotten", "fresh"])


def bigbench(task: str) -> TaskData:
    """A vendored BIG-bench multiple-choice task, split 70/10/20 in a fixed order."""
    data = json.loads((TASK_DATA / "bigbench" / f"{task}.json").read_text(encoding="utf-8"))
    examples = []
    for ex in data["examples"]:
        choices = list(ex["target_scores"])
        scores = [ex["target_scores"][c] for c in choices]
        examples.append({"text": ex["input"].strip(), "choices": choices, "label": scores.index(max(scores))})
    train, validation, test = _split(examples, 0.1, 0.2)
    return TaskData(task, "multiple_choice", train, validation, test)


def capped(examples: list[dict], n: int | None) -> list[dict]:
    """At most n examples (exactly n when there are more): a fixed stratified subset, the same for every seed."""
    return examples if n is None or n >= len(examples) else stratified_sample(examples, n, SPLIT_SEED)


def training_examples(examples: list[dict], max_examples: int | None, fraction: float, seed: int) -> list[dict]:
    """A run's training set: the cap (exactly max_examples when there are more; the same stratified subset for
    every seed and fraction), then its fraction, drawn with its seed."""
    if max_examples and max_examples < len(examples):
        examples = stratified_sample(examples, max_examples, SPLIT_SEED)
    return stratified_fraction(examples, fraction, seed)


def _strata(examples: list[dict]) -> dict:
    """Positions by stratum: the task of a mixed dataset (commonsense), else the label; generative rows have one."""
    by_label = defaultdict(list)
    for i, e in enumerate(examples):
        by_label[e.get("task", e.get("label", ""))].append(i)
    return by_label


def _draw(examples: list[dict], by_label: dict, quota: dict, seed: int) -> list[dict]:
    """quota[stratum] examples of each stratum, seeded, in the original order. Each stratum's draw is a prefix of
    one shuffle, so a larger quota adds examples and never swaps the ones a smaller quota drew."""
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_label):
        idx = by_label[label]
        rng.shuffle(idx)
        chosen += idx[:quota[label]]
    return [examples[i] for i in sorted(chosen)]


def stratified_fraction(examples: list[dict], fraction: float, seed: int) -> list[dict]:
    """A seeded subset with each stratum's share kept (at least one example each), in the original order.
    Strata: the task of a mixed dataset (commonsense), else the label; generative rows have one stratum."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(examples)
    by_label = _strata(examples)
    quota = {label: max(1, round(fraction * len(idx))) for label, idx in by_label.items()}
    return _draw(examples, by_label, quota, seed)


def stratified_sample(examples: list[dict], n: int, seed: int) -> list[dict]:
    """Exactly min(n, len(examples)) examples, seeded and stratified as stratified_fraction(n / len) draws them
    (each stratum's share rounded, at least one each while n allows), with the rounding's overshoot taken back
    from (or its shortfall given to) the strata whose rounded share is furthest from their exact one: a cap is
    never exceeded. Where the rounding adds up to n, the sample is stratified_fraction's."""
    if n >= len(examples):
        return list(examples)
    if n < 1:
        raise ValueError(f"a cap must be at least 1, got {n}")
    by_label = _strata(examples)
    exact = {label: n / len(examples) * len(idx) for label, idx in by_label.items()}  # (as stratified_fraction rounds)
    floor = 1 if n >= len(by_label) else 0  # fewer examples than strata: not every stratum can have one
    quota = {label: max(floor, round(share)) for label, share in exact.items()}
    while sum(quota.values()) > n:
        label = max((t for t in quota if quota[t] > floor), key=lambda t: (quota[t] - exact[t], str(t)))
        quota[label] -= 1
    while sum(quota.values()) < n:
        label = max((t for t in quota if quota[t] < len(by_label[t])), key=lambda t: (exact[t] - quota[t], str(t)))
        quota[label] += 1
    return _draw(examples, by_label, quota, seed)
