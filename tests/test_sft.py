"""Generative fine-tuning (--task sft) on tiny LLaMA causal LMs: masking, grouping, truncation,
generation and its scoring, the guards, and runs end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from replora.methods import METHODS
from replora.training import generative
from replora.training.cli import main
from replora.training.generative import IGNORE

from conftest import ENV, assert_resumed, checkpointed_step, kill_once_checkpointed, uneven_qa_rows, write_jsonl

COLOURS = ["red", "green", "blue", "white", "black", "yellow"]


def qa_rows(n: int):
    """A task a tiny random model learns in a few dozen steps: yes for hot, no for cold."""
    return [{"prompt": f"item {i} is {'hot' if i % 2 else 'cold'}", "response": "yes" if i % 2 else "no"}
            for i in range(n)]


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_labels_mask_the_prompt_and_the_loss_reads_only_the_response(tiny_lm_folders):
    model, tok = load(tiny_lm_folders["plain"])
    example = {"prompt": "the capital of france is", "response": "paris"}
    f = generative.encode(example, tok, max_length=64)
    prompt = tok("the capital of france is")["input_ids"]
    response = tok("paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert f["input_ids"] == prompt + response and f["labels"] == [IGNORE] * len(prompt) + response
    batch = generative.SFTCollator(tok.pad_token_id)([f, generative.encode({"prompt": "a", "response": "b c"}, tok, 64)])
    loss, count = generative.response_loss(model, batch)
    assert count == len(response) + 3  # "b c" is two tokens, plus EOS
    # The same as transformers' own loss on these labels, and unchanged by whatever the prompt tokens are labelled.
    torch.testing.assert_close(loss, model(**batch).loss)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    first = logits[0, len(prompt) - 1:len(prompt) + len(response) - 1].log_softmax(-1)
    nll = -first.gather(-1, torch.tensor(response)[:, None]).sum()
    second = logits[1, :-1].log_softmax(-1)
    targets = batch["labels"][1, 1:]
    nll = nll - second[targets != IGNORE].gather(-1, targets[targets != IGNORE][:, None]).sum()
    torch.testing.assert_close(loss, nll / count)


def test_the_loss_projects_onto_the_vocabulary_only_where_a_response_token_is_next(tiny_lm_folders):
    model, tok = load(tiny_lm_folders["plain"])
    rows = [{"prompt": " ".join(["long prompt"] * 12), "response": "yes"}, {"prompt": "short", "response": "no no"}]
    batch = generative.SFTCollator(tok.pad_token_id)([generative.encode(r, tok, 64) for r in rows])
    widths = []
    model.lm_head.register_forward_hook(lambda m, i, o: widths.append(i[0].shape[1]))
    loss, count = generative.response_loss(model, batch)
    targets = batch["labels"][:, 1:]
    # Only the positions some row needs: fewer than the sequence (most of it is the long prompt).
    assert widths == [int((targets != IGNORE).any(0).sum())] and widths[0] < batch["input_ids"].shape[1] // 2

    class NoKeep(torch.nn.Module):  # a causal LM whose forward does not take logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    full, full_count = generative.response_loss(NoKeep(model), batch)
    assert widths[-1] == batch["input_ids"].shape[1] and full_count == count
    torch.testing.assert_close(loss, full)
    torch.testing.assert_close(loss, model(**batch).loss)


def test_choice_logliks_are_each_candidates_mean_log_probability_per_token(tiny_lm_folders):
    model, tok = load(tiny_lm_folders["plain"])
    example = {"prompt": "the sky is " + " ".join(["very"] * 10), "response": "?"}
    candidates = ["blue", "a deep shade of green"]  # unequal lengths: the shorter is padded
    widths = []
    model.lm_head.register_forward_hook(lambda m, i, o: widths.append(i[0].shape[1]))
    got = generative.choice_logliks(model, tok, example, candidates, max_length=64)
    expected = []
    for c in candidates:  # one at a time, every position's logits
        f = generative.encode({**example, "response": c}, tok, 64)
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor(f["labels"][1:])
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        expected.append(logp[labels != IGNORE].gather(-1, labels[labels != IGNORE][:, None]).mean().item())
    assert got == pytest.approx(expected, abs=1e-5)
    # The batched call projected only the answers' positions onto the vocabulary, not the long prompt's.
    assert widths[0] < len(generative.encode({**example, "response": candidates[1]}, tok, 64)["input_ids"]) // 2


def test_long_prompts_lose_their_start_and_are_counted(tiny_lm_folders):
    _, tok = load(tiny_lm_folders["plain"])
    stats = {}
    long = {"prompt": " ".join(f"w{i}" for i in range(200)) + " end", "response": "yes"}
    f = generative.encode(long, tok, max_length=32, stats=stats)
    assert len(f["input_ids"]) == 32 and stats == {"prompts_cut": 1}
    assert "w199 end" in tok.decode(f["input_ids"][:-2])  # the end of the prompt, next to the answer, is kept
    huge = {"prompt": "q", "response": " ".join(["word"] * 100)}
    assert len(generative.encode(huge, tok, max_length=16, stats=stats)["input_ids"]) == 16
    assert stats == {"prompts_cut": 2, "responses_cut": 1}  # the prompt keeps its last token only


def test_length_grouping_keeps_every_example_once_and_pads_less():
    features = [{"input_ids": [1] * n, "labels": [1] * n} for n in [3, 50, 7, 41, 12, 60, 5, 33] * 25]
    grouped = generative.length_grouped(features, batch_size=8, seed=3)
    assert sorted(map(id, grouped)) == sorted(map(id, features))
    assert generative.length_grouped(features, 8, 3) == grouped and generative.length_grouped(features, 8, 4) != grouped
    assert generative.padding_fraction(grouped, 8) < 0.1 < generative.padding_fraction(features, 8)


def test_batched_generation_equals_one_at_a_time(tiny_lm_folders):
    model, tok = load(tiny_lm_folders["plain"])
    prompts = [tok(t)["input_ids"] for t in ["a short one", "a much longer prompt than the others here", "mid one x"]]
    together = generative.generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    alone = [generative.generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert together == alone and all(together)


def test_answers_are_scored_after_normalization():
    assert generative.is_correct(" The  Paris.", {"prompt": "q", "response": "paris"})
    assert not generative.is_correct("paris france", {"prompt": "q", "response": "paris"})
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Yes!"}]}
    assert generative.is_correct("yes", chat)


@pytest.mark.slow
@pytest.mark.parametrize("method, lr, epochs", [("lora", "1e-2", "6"), ("replora", "3e-3", "10")])
def test_sft_run_learns_and_reports_exact_match(tmp_path, tiny_lm_folders, method, lr, epochs):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(120))
    out = tmp_path / "run"
    code = main(["train", "--model", tiny_lm_folders["plain"], "--dataset", str(data), "--method", method,
                 "--target-modules", "all-linear", "--epochs", epochs, "--lr", lr, "--batch-size", "16",
                 "--max-new-tokens", "4", "--output", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    settings = json.loads((out / "settings.json").read_text())
    assert settings["task"] == "sft" and metrics["task"] == "sft"
    assert metrics["test_exact_match"] >= 0.9, metrics["test_exact_match"]  # (the untrained model: 0)
    # A 32-wide random model moves its 30,522-way output only a little: the loss falls, greedy answers turn right.
    history = [h["validation_loss"] for h in metrics["history"]]
    assert history[-1] < history[0] and metrics["test_loss"] < history[0]
    assert 0 <= metrics["padding_fraction"] < 0.2 and metrics["train_tokens"] > 0
    assert "test answer right" in (out / "log.txt").read_text()
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] is None  # nothing new to train: the model's own head writes the answers


def test_chat_messages_go_through_the_template(tmp_path, tiny_lm_folders):
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"colour {c}?"},
                          {"role": "assistant", "content": c}]} for c in COLOURS * 10]
    _, tok = load(tiny_lm_folders["chat"])
    f = generative.encode(rows[0], tok, 64)
    assert tok.decode([i for i, label in zip(f["input_ids"], f["labels"]) if label == IGNORE]).startswith("< system >")
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert main(["train", "--model", tiny_lm_folders["chat"], "--dataset", str(data), "--epochs", "1",
                 "--output", str(tmp_path / "run")]) == 0
    assert "test_exact_match" in json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.parametrize("rows, args, message", [
    ([{"prompt": "", "response": "x"}] * 20, [], "'prompt' must be non-empty text"),
    ([{"prompt": "q", "response": " "}] * 20, [], "'response' must be non-empty text"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}] * 20, [],
     "a role among system, user, assistant, got 'bot'"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}] * 20, [],
     "the last message must be the assistant's answer"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 20, ["plain"],
     "has no chat template"),
    ([{"text": f"question number {i}", "label": f"a free answer {i}"} for i in range(60)], [],
     "use --task sft with columns prompt and response"),
    (qa_rows(20), ["encoder"], "not a text generator; use a decoder"),
])
def test_bad_generative_input_stops_with_one_line_and_writes_nothing(tmp_path, tiny_lm_folders, tiny_folders, capsys,
                                                                      rows, args, message):
    model = (tiny_folders["bert"] if "encoder" in args else
             tiny_lm_folders["plain"] if "plain" in args else tiny_lm_folders["chat"])
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    task = ["--task", "sft"] if "encoder" in args else []
    assert main(["train", "--model", model, "--dataset", str(data), *task, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_exported_sft_adapter_loads_with_auto_peft_causal_lm(tmp_path, tiny_lm_folders):
    from peft import AutoPeftModelForCausalLM

    import replora

    model, tok = load(tiny_lm_folders["plain"])
    replora.inject(model, replora.AdapterConfig(method="replora"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    replora.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    config["base_model_name_or_path"] = tiny_lm_folders["plain"]
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()
    ids = tok("hello there", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**ids).logits, model.eval()(**ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_killed_sft_run_resumes_to_the_same_result(tmp_path, tiny_lm_folders):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(400))
    common = ["train", "--model", tiny_lm_folders["plain"], "--dataset", str(data), "--method", "replora",
              "--lora-dropout", "0.1", "--epochs", "3", "--batch-size", "8", "--seed", "5", "--max-new-tokens", "3"]
    replora_cli = [sys.executable, "-m", "replora"]
    whole = subprocess.run(replora_cli + common + ["--output", str(tmp_path / "whole")], env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "cut"
    kill_once_checkpointed(common, out)
    from_step = checkpointed_step(out)
    resumed = subprocess.run(replora_cli + common + ["--output", str(out), "--resume"], env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_resumed(out, from_step)
    a, b = (json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("whole", "cut"))
    for key in ("test_loss", "test_exact_match", "padding_fraction"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert [h["validation_loss"] for h in a["history"]] == pytest.approx([h["validation_loss"] for h in b["history"]])
    x = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    y = load_file(out / "adapter" / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)


@pytest.mark.parametrize("method", [*METHODS, "full"])
def test_every_method_runs_generatively(tmp_path, tiny_lm_folders, method):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(24))
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_lm_folders["plain"], "--dataset", str(data), "--method", method,
                 "--epochs", "1", "--batch-size", "8", "--max-new-tokens", "2", "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["steps"] == 3 and metrics["test_loss"] > 0
    assert metrics["output"] == str(out)  # what `replora train` prints as the run folder
    assert (out / "adapter").is_dir() == (method != "full")


def test_eval_scores_each_task_by_generation_and_by_loglik(tmp_path, tiny_lm_folders, capsys):
    run = tmp_path / "run"
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(24))
    assert main(["train", "--model", tiny_lm_folders["plain"], "--dataset", str(data), "--method", "replora",
                 "--epochs", "1", "--batch-size", "8", "--max-new-tokens", "2", "--output", str(run)]) == 0
    rows = {}
    for scoring in ("generate", "loglik"):
        out = tmp_path / f"eval-{scoring}"
        assert main(["eval", "--adapter", str(run), "--dataset", "commonsense:arc_easy", "--scoring", scoring,
                     "--max-eval-examples", "6", "--max-new-tokens", "3", "--output", str(out)]) == 0
        rows[scoring] = json.loads((out / "eval.json").read_text())
        assert "| replora, " + scoring in (out / "eval.md").read_text()
    for row in rows.values():
        assert list(row["accuracy"]) == ["arc_easy"] and row["items_per_task"] == {"arc_easy": 6}
        assert row["method"] == "replora" and 0 < row["trainable_percent"] < 5 and row["model"] == tiny_lm_folders["plain"]
    # the same items for every model: the base model's row is scored on the same 6
    assert main(["eval", "--model", tiny_lm_folders["plain"], "--dataset", "commonsense:arc_easy", "--scoring", "loglik",
                 "--max-eval-examples", "6", "--output", str(tmp_path / "base")]) == 0
    base = json.loads((tmp_path / "base" / "eval.json").read_text())
    assert base["method"] == "base" and base["trainable_percent"] == 0 and 0 <= base["average"] <= 1
    capsys.readouterr()
    # free-form answers cannot be scored by choice; an existing evaluation is not overwritten
    assert main(["eval", "--adapter", str(run), "--dataset", str(data), "--scoring", "loglik",
                 "--output", str(tmp_path / "x")]) == 2
    assert "--scoring loglik needs items with choices" in capsys.readouterr().err
    assert main(["eval", "--model", tiny_lm_folders["plain"], "--dataset", "commonsense:arc_easy",
                 "--max-eval-examples", "2", "--output", str(tmp_path / "base")]) == 2
    assert "already holds an evaluation" in capsys.readouterr().err
    assert main(["eval", "--dataset", "commonsense:arc_easy"]) == 2
    assert "give --adapter" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_train_the_same_sft_adapter_as_one(tmp_path, tiny_lm_folders):
    data = write_jsonl(tmp_path / "qa.jsonl", uneven_qa_rows(80))
    common = ["train", "--model", tiny_lm_folders["plain"], "--dataset", str(data), "--method", "replora",
              "--epochs", "2", "--batch-size", "16", "--seed", "3", "--lr", "5e-3", "--max-new-tokens", "3"]
    one = subprocess.run([sys.executable, "-m", "replora"] + common + ["--output", str(tmp_path / "one")], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29534", "-m", "replora"] + common + ["--output", str(tmp_path / "two")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    m1, m2 = (json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("one", "two"))
    assert (m1["num_processes"], m2["num_processes"]) == (1, 2) and m1["steps"] == m2["steps"] == 8
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    assert m1["test_loss"] == pytest.approx(m2["test_loss"], abs=1e-5)
    assert m1["test_exact_match"] == m2["test_exact_match"]
