"""Tiny transformers models built from a config (same module names as the real ones, milliseconds to
run) and the table of method variants every invariant is checked against."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread a worker (N workers x all cores would thrash)
    os.environ["OMP_NUM_THREADS"] = "1"  # (and for the processes tests start)
    torch.set_num_threads(1)
from torch import nn
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, BitImageProcessor, Dinov2Config,
                          Dinov2Model, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification, ViTConfig, ViTForImageClassification, ViTImageProcessor)

import replora
from replora.training.pretrained import minilm_path
from research.make_digits_folder import write_digits_folder

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}  # for subprocess runs


@dataclasses.dataclass
class TinyModel:
    name: str
    build_fn: object
    targets: list | None
    modules_to_save: list | None

    def build(self, seed: int = 0):
        torch.manual_seed(seed)
        return self.build_fn().eval()

    def inputs(self, seed: int = 1, batch: int = 3):
        g = torch.Generator().manual_seed(seed)
        if self.name in PLAIN_MODELS:
            return {"input": torch.randn(batch, 5, 12, generator=g)}
        if self.name == "vit":
            return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
        if self.name == "convnet":
            return {"pixel_values": torch.randn(batch, 3, 12, 12, generator=g)}
        ids = torch.randint(1, 100, (batch, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # padding in one row
        return {"input_ids": ids, "attention_mask": mask}


def _bert():
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=32, num_labels=3))


def _llama():
    # Grouped-query attention: v_proj (out 24) is narrower than q_proj (out 48).
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=32))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=48, n_layer=2, n_head=4, n_positions=32))


def _vit():
    return ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, num_labels=3))


class Block(nn.Module):
    """A plain PyTorch attention-like block: query / value projections and an MLP, no transformers."""

    def __init__(self, width: int = 12):
        super().__init__()
        self.q, self.v = nn.Linear(width, width), nn.Linear(width, 8)
        self.out = nn.Linear(8, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.out(self.v(x) * torch.sigmoid(self.q(x)).mean(-1, keepdim=True))
        return x + self.mlp(x)


class PlainNet(nn.Module):
    """A plain nn.Module with blocks in a ModuleList (RepLoRA groups each block's q and v)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(12, 3)

    def forward(self, input):
        for block in self.blocks:
            input = block(input)
        return self.head(input)


def _sequential():
    # Blocks that are themselves nn.Sequential: nothing may be added to them (it would run).
    return nn.Sequential(*[nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 12)) for _ in range(2)],
                         nn.Linear(12, 3))


class ConvNet(nn.Module):
    """A small CNN with every Conv2d an adapter must follow: a strided 3x3 stem, a dilated "same" conv with
    reflect padding, a depthwise conv (groups > 1: never a target), a 1x1 conv without bias."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(8, 8, 3, padding="same", dilation=2, padding_mode="reflect")
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 12, 1, bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, pixel_values):
        x = torch.nn.functional.gelu(self.stem(pixel_values))
        x = x + torch.nn.functional.gelu(self.dilated(x))
        return self.head(self.pointwise(self.depthwise(x)).mean((2, 3)))


PLAIN_MODELS = ("sequential", "plain")

TINY_MODELS = {
    "bert": TinyModel("bert", _bert, None, ["classifier"]),
    "llama": TinyModel("llama", _llama, None, None),
    # GPT-2's Conv1D layers, three per block: attn.c_attn (fused qkv), attn.c_proj, mlp.c_proj.
    "gpt2": TinyModel("gpt2", _gpt2, ["c_attn", "c_proj"], None),
    "vit": TinyModel("vit", _vit, None, ["classifier"]),
    # Plain PyTorch: every method must work there too (nothing but adapted layers enters the model).
    "sequential": TinyModel("sequential", _sequential, r"\d\.[02]", None),
    "plain": TinyModel("plain", PlainNet, None, ["head"]),
    # nn.Conv2d targets (PEFT's conv layout) and nn.Embedding targets beside linear ones.
    "convnet": TinyModel("convnet", ConvNet, ["stem", "dilated", "pointwise"], ["head"]),
    "llama-embed": TinyModel("llama-embed", _llama, ["embed_tokens", "q_proj", "v_proj"], None),
}

# Every method, and every option of every method, at least once: a few chosen combinations, then a row
# for every registered method and option value they leave out (a new method gets its rows here).
METHOD_VARIANTS = {
    "lora": dict(method="lora"),
    "lora-rslora-dropout": dict(method="lora", use_rslora=True, lora_dropout=0.1, r=4, lora_alpha=8),
    "dora": dict(method="dora"),
    "dora-dropout": dict(method="dora", lora_dropout=0.1),
    "moslora": dict(method="moslora"),
    "moslora-orthogonal": dict(method="moslora", moslora_mixer_init="orthogonal"),
    "replora": dict(method="replora"),
    "replora-identity": dict(method="replora", replora_activation="identity"),
    "replora-gelu-h16": dict(method="replora", replora_activation="gelu", replora_hidden_size=16),
    "replora-relu-fullseed": dict(method="replora", replora_activation="relu", replora_seed="full"),
    "replora-nosharing": dict(method="replora", replora_sharing="none"),
    "replora-modelsharing": dict(method="replora", replora_sharing="model", lora_dropout=0.1),
}


for _name, _method in replora.METHODS.items():
    if not any(v["method"] == _name for v in METHOD_VARIANTS.values()):
        METHOD_VARIANTS[_name] = dict(method=_name)
    for _option, _spec in _method.options.items():
        for _value in _spec.choices or ():
            if not any(v.get(_option, _spec.default) == _value for v in METHOD_VARIANTS.values() if v["method"] == _name):
                METHOD_VARIANTS[f"{_name}-{_option}-{_value}"] = {"method": _name, _option: _value}


def make_config(tiny: TinyModel, variant: str, **overrides) -> replora.AdapterConfig:
    options = dict(target_modules=tiny.targets, modules_to_save=tiny.modules_to_save, **METHOD_VARIANTS[variant])
    options.update(overrides)
    return replora.AdapterConfig(**options)


def logits(output) -> torch.Tensor:
    """transformers models return an output object, plain PyTorch models the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.logits


def outputs(model, inputs):
    with torch.no_grad():
        return logits(model(**inputs))


def train_steps(model, tiny: TinyModel, steps: int = 3, lr: float = 1e-2):
    """A few AdamW steps on random data, so that every factor is away from its init."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        loss = logits(model(**tiny.inputs(seed=100 + step))).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(params=list(TINY_MODELS))
def tiny(request) -> TinyModel:
    return TINY_MODELS[request.param]


@pytest.fixture(params=list(METHOD_VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """Tiny BERT and LLaMA folders with the real MiniLM tokenizer, so the whole pipeline runs in seconds."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    small = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=128)
    folders = {}
    # No dropout in the base model: a 2-process run draws its dropout masks per half-batch, so only a
    # dropout-free model can end bit-for-bit like a 1-process run (adapter dropout is tested elsewhere).
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for name, model in [("bert", BertForSequenceClassification(BertConfig(**small, **no_dropout))),
                        ("llama", LlamaForSequenceClassification(LlamaConfig(**small, num_key_value_heads=2)))]:
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = str(root / name)
    return folders


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="session")
def tiny_lm_folders(tmp_path_factory):
    """Tiny LLaMA causal LMs with the MiniLM tokenizer ([SEP] as end of sequence): one whose tokenizer has a
    chat template ("chat") and one without ("plain")."""
    root = tmp_path_factory.mktemp("lms")
    folders = {}
    for name, template in [("chat", CHAT_TEMPLATE), ("plain", None)]:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        tokenizer.eos_token = "[SEP]"
        tokenizer.chat_template = template
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                             max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                                             pad_token_id=tokenizer.pad_token_id))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = str(root / name)
    return folders


REPLORA = [sys.executable, "-m", "replora"]


def kill_once_checkpointed(args: list[str], out: Path, timeout: float = 240, launcher: list[str] = REPLORA) -> None:
    """Start `<launcher> <args> --output out` (default: replora) and SIGKILL it, with every process it
    started (a launcher's workers), as soon as its first checkpoint is whole."""
    process = subprocess.Popen(launcher + args + ["--output", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not (out / "checkpoints" / "latest").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    # A launcher's workers may run in sessions of their own (torch elastic starts them so): kill the whole tree.
    os.killpg(process.pid, signal.SIGSTOP)
    tree = _descendants(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in tree):
        time.sleep(0.02)
    assert not (out / "metrics.json").exists(), "the run ended before it could be killed"


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def checkpointed_step(out: Path) -> int:
    """The step of the run's latest checkpoint (what a resume starts from)."""
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return json.loads((out / "checkpoints" / latest / "trainer_state.json").read_text())["step"]


def assert_resumed(out: Path, from_step: int) -> None:
    """The run in `out` was resumed at `from_step` and took only the steps left: a run retrained from scratch
    (which ends with the same figures, being deterministic) fails this."""
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < from_step < metrics["steps"]
    assert (metrics["resumed_at_step"], metrics["steps_this_run"]) == (from_step, metrics["steps"] - from_step)
    log = (out / "log.txt").read_text()
    assert f"resumed from {out / 'checkpoints'}/epoch-" in log and f", step {from_step})" in log, log[-2000:]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def uneven_qa_rows(n: int):
    """Prompt / response rows whose responses differ in length (1 or 4 words): processes sharing a batch
    hold different numbers of response tokens, and greedy answers end at different steps."""
    return [{"prompt": f"item {i} is {'hot' if i % 2 else 'cold'}", "response": "yes" if i % 2 else "no it is not"}
            for i in range(n)]


def sentiment_rows(n: int):
    words = ["great", "awful", "moving", "dull", "superb", "boring", "brilliant", "tedious"]
    return [{"text": f"a {words[i % 8]} film, {words[(3 * i) % 8]} at times", "label": int(i % 8 in (0, 2, 4, 6))}
            for i in range(n)]


@pytest.fixture(scope="session")
def vision_folders(tmp_path_factory):
    """A tiny DINOv2 backbone saved as DINOv2 is (Dinov2Model, BitImageProcessor: shortest edge then
    centre crop) and a tiny ViT classifier with a plain resizing processor."""
    root = tmp_path_factory.mktemp("vision")
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    Dinov2Model(Dinov2Config(**small, image_size=16, patch_size=4)).save_pretrained(root / "dinov2")
    BitImageProcessor(size={"shortest_edge": 18}, crop_size={"height": 16, "width": 16}).save_pretrained(root / "dinov2")
    ViTForImageClassification(ViTConfig(**small, image_size=16, patch_size=4)).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "vit")
    return {name: str(root / name) for name in ("dinov2", "vit")}


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits") / "digits"
    write_digits_folder(folder, n_per_class=12)
    return str(folder)


def named(method: str) -> str:
    """A research run name's start: the method and the tag of its options at today's defaults (RepLoRA's
    design differs from replora 0.2's, whose runs carry no tag)."""
    from research.experiments import variant_of

    tag = variant_of(method, {})
    return f"{method}-{tag}" if tag else method
