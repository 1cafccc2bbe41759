"""Generative fine-tuning (--task sft): a prompt and its response, the causal-LM loss on the response
tokens only, and answers read back by greedy generation (or by the log-likelihood of each choice).

Sequences are `prompt tokens + response tokens + EOS`. A sequence longer than --max-length loses
tokens from the start of its prompt (the end, next to the answer, is what the answer depends on), and
is counted; a response that cannot fit with at least one prompt token is cut at its end, and counted.
Batches are length-grouped rather than packed: each epoch the examples are shuffled (seeded), cut into
chunks of 64 batches, each chunk sorted by length and cut into batches, and the batches shuffled again;
so a batch holds sequences of similar length and the padding fraction stays small (it is measured and
written to metrics.json). Packing would need attention kept within each sequence, which the CPU
attention kernels do not do without a full mask per batch.
"""
from __future__ import annotations

import inspect
import random
import re
import string

import torch
import torch.nn.functional as F

from .distributed import without_repeats

IGNORE = -100  # label of the tokens the loss skips (prompt and padding)
GROUP_CHUNK = 64  # batches sorted together when grouping by length


def render(example: dict, tokenizer) -> tuple[str, str]:
    """(prompt text, response text). A chat (`messages`) goes through the tokenizer's chat template: the
    prompt is every message before the last, with the template's cue for the assistant's turn."""
    if "messages" not in example:
        return example["prompt"], example["response"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the data has chat `messages`, but this model's tokenizer has no chat template; use a chat "
                         "model (e.g. --model smollm2) or rows with prompt and response")
    messages = example["messages"]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return prompt, messages[-1]["content"]


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]  # (long texts are cut here)


def encode(example: dict, tokenizer, max_length: int, stats: dict | None = None) -> dict:
    """{"input_ids", "labels"} of one example: labels are IGNORE on the prompt, the response's ids after.
    The prompt gets the tokenizer's own special tokens (BOS where the model uses one); the response none,
    then EOS."""
    prompt, response = render(example, tokenizer)
    chat = "messages" in example  # the chat template writes its own special tokens
    prompt_ids = _ids(tokenizer, prompt, special=not chat)
    response_ids = _ids(tokenizer, response, special=False) + [tokenizer.eos_token_id]
    if len(response_ids) > max_length - 1:
        response_ids = response_ids[:max_length - 1]
        if stats is not None:
            stats["responses_cut"] = stats.get("responses_cut", 0) + 1
    room = max_length - len(response_ids)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room:]
        if stats is not None:
            stats["prompts_cut"] = stats.get("prompts_cut", 0) + 1
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE] * len(prompt_ids) + response_ids}


def encode_all(examples: list[dict], tokenizer, max_length: int) -> tuple[list[dict], dict]:
    stats: dict = {}
    return [encode(e, tokenizer, max_length, stats) for e in examples], stats


def length_grouped(features: list[dict], batch_size: int, seed: int) -> list[dict]:
    """The examples in an order whose consecutive `batch_size` runs have similar lengths (module docstring)."""
    rng = random.Random(seed)
    order = list(range(len(features)))
    rng.shuffle(order)
    batches = []
    chunk = batch_size * GROUP_CHUNK
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(features[i]["input_ids"]), reverse=True)
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return [features[i] for batch in batches for i in batch]


class SFTCollator:
    """Pads a batch of encoded examples on the right: input_ids with the pad token, labels with IGNORE."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padding_fraction(features: list[dict], batch_size: int) -> float:
    """The share of the token slots of consecutive batches that are padding."""
    slots = real = 0
    for start in range(0, len(features), batch_size):
        lengths = [len(f["input_ids"]) for f in features[start:start + batch_size]]
        slots += max(lengths) * len(lengths)
        real += sum(lengths)
    return 1 - real / max(slots, 1)


def response_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over the batch's response tokens, how many there are). Computed here rather
    than by the model, so that the sum over a whole evaluation set can be taken exactly."""
    logits, targets = response_logits(model, batch)
    count = int((targets != IGNORE).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss / max(count, 1), count


def response_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(float logits, the tokens they predict), both (rows, positions): the positions that predict a
    response token in some row of the batch; the rest of each row's targets are IGNORE.

    The output layer runs only there (transformers' `logits_to_keep` as indices): the prompt's logits
    would be thrown away, and the projection onto the vocabulary (and its softmax) is a large share of a
    small LM's step."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]  # the logits at position t predict the token at t + 1
    takes = _forward_arguments(model)
    if "use_cache" in takes:  # no KV cache: building one would copy every layer's keys and values
        inputs["use_cache"] = False
    if "logits_to_keep" in takes:
        keep = (targets != IGNORE).any(0).nonzero().squeeze(1)
        return model(**inputs, logits_to_keep=keep).logits.float(), targets[:, keep]
    return model(**inputs).logits[:, :-1].float(), targets  # a model without the argument computes them all


def _forward_arguments(model) -> set[str]:
    from accelerate.utils import extract_model_from_parallel  # (DDP's wrapper, torch.compile's)

    return set(inspect.signature(extract_model_from_parallel(model, keep_torch_compile=False).forward).parameters)


@torch.no_grad()
def mean_loss(model, loader, accelerator) -> float:
    """The mean loss per response token over a whole loader (each token weighs the same)."""
    model.eval()
    total = count = 0.0
    for batch in loader:
        loss, n = response_loss(model, without_repeats(batch, accelerator))  # (rows repeated to even out a batch)
        sums = accelerator.gather(torch.tensor([[loss.item() * n, n]], device=accelerator.device))
        total, count = total + sums[:, 0].sum().item(), count + sums[:, 1].sum().item()
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             synced: bool = False) -> list[str]:
    """Greedy continuations of tokenized prompts, batched (left padding, KV cache), decoded up to EOS.
    synced: the model is sharded (FSDP) and every process calls this with as many prompts: each batch runs
    until all processes' are done."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    texts = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):], mask[r, width - len(prompts[i]):] = torch.tensor(prompts[i]), 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
        for r, i in enumerate(rows):
            texts[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True)
    return texts


def prompt_of(feature: dict) -> list[int]:
    """An encoded example's prompt tokens, as training saw them (cut from the left to leave room for an answer)."""
    return [i for i, label in zip(feature["input_ids"], feature["labels"]) if label == IGNORE]


def normalize(text: str) -> str:
    """Exact match compares answers lowercased, without punctuation, articles or extra spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def is_correct(generation: str, example: dict) -> bool:
    """A choice item is right when the answer names the right choice (commonsense.answer_index); any
    other, when it equals the response after normalization."""
    if "choices" in example:
        from .commonsense import answer_index

        return answer_index(generation, len(example["choices"]), example["choices"]) == example["label"]
    reference = example["messages"][-1]["content"] if "messages" in example else example["response"]
    return normalize(generation) == normalize(reference)


@torch.no_grad()
def choice_logliks(model, tokenizer, example: dict, candidates: list[str], max_length: int) -> list[float]:
    """The mean log-probability per token of each candidate response given the example's prompt (all
    candidates in one batch)."""
    model.eval()
    device = next(model.parameters()).device
    features = [encode({**example, "response": c}, tokenizer, max_length) for c in candidates]
    batch = {k: v.to(device) for k, v in SFTCollator(tokenizer.pad_token_id)(features).items()}
    logits, targets = response_logits(model, batch)
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    keep = targets != IGNORE
    # EOS is part of every candidate: it says the answer ends there, as trained.
    return ((logp * keep).sum(1) / keep.sum(1)).tolist()


def first_words(text: str, n: int = 12) -> str:
    words = re.sub(r"\s+", " ", text).strip().split(" ")
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")
