"""torch.compile: every method compiles with no graph break and is compiled once (no recompile) on every model
the README names (the tiny BERT, LLaMA, GPT-2, CNN and plain models), in training (forward, backward, AdamW
step) and in inference (no_grad); compiled RepLoRA computes what eager RepLoRA computes. Backend aot_eager:
what dynamo and AOT autograd hand to inductor, without generating code (no C++ compiler needed); graph breaks
and recompiles are dynamo's, counted on transformers models with the eager backend (the same counts, faster)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

import replora
from replora.methods.replora import RepLoRAGroup
from conftest import METHOD_VARIANTS, TINY_MODELS, logits, make_config, outputs, train_steps

pytestmark = [pytest.mark.compile, pytest.mark.slow]  # minutes in all: `pytest -m compile` runs them alone
BACKEND = "aot_eager"
STEPS = 5  # calls per run


def compile_counts(name: str, variant: str, mode: str, backend: str = "eager", fullgraph: bool = False) -> dict:
    """Graph breaks, and graphs handed to the backend ("compiles": 1 is one graph, compiled once: no break, no
    recompile), over STEPS calls of a fresh adapted model under torch.compile: `mode` is train (forward,
    backward, AdamW step) or eval (no_grad)."""
    tiny = TINY_MODELS[name]
    torch._dynamo.reset()
    counters.clear()
    model = replora.inject(tiny.build(), make_config(tiny, variant))
    graphs = []

    def counted(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(backend)(gm, example_inputs)

    compiled = torch.compile(model, backend=counted, fullgraph=fullgraph)
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(STEPS):
        if mode == "train":
            loss = logits(compiled(**tiny.inputs(seed=100 + step))).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                compiled(**tiny.inputs(seed=100 + step))
    counts = {"breaks": sum(counters["graph_break"].values()), "compiles": len(graphs),
              "reasons": sorted(counters["graph_break"])}
    torch._dynamo.reset()
    return counts


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("variant", list(METHOD_VARIANTS))
def test_every_method_compiles_in_one_graph_on_a_plain_model(variant, mode):
    """fullgraph=True: a graph break would be an error. Every method and option, blocks of q and v, through
    AOT autograd."""
    counts = compile_counts("plain", variant, mode, backend=BACKEND, fullgraph=True)
    assert counts["breaks"] == 0 and counts["compiles"] == 1, counts


# Across models what can break a graph is the layer kind and where shared modules live: every method, and
# RepLoRA's sharing across the whole model and none; every option of every method is on the plain model above.
ACROSS_MODELS = [*replora.METHODS, "replora-modelsharing", "replora-nosharing"]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("variant", ACROSS_MODELS)
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2", "convnet", "sequential"])
def test_every_method_compiles_with_no_graph_break_and_no_recompile(name, variant, mode):
    """The README's models (GPT-2: Conv1D targets; the CNN: Conv2d targets; an nn.Sequential of blocks)."""
    counts = compile_counts(name, variant, mode)
    assert counts["breaks"] == 0, counts["reasons"]
    assert counts["compiles"] == 1, counts  # one graph, compiled at the first call and never again


@pytest.mark.parametrize("variant", ["replora", "replora-modelsharing", "dora-dropout"])
def test_compiled_training_matches_eager_training(variant):
    """The same parameters after a few AdamW steps, and then the same inference outputs (compiled and
    eager: the eager model's kept factors must not be those of before the compiled steps)."""
    tiny = TINY_MODELS["llama"]
    eager = replora.inject(tiny.build(), make_config(tiny, variant, lora_dropout=0.0))
    inputs = tiny.inputs(seed=7)
    with torch.no_grad():
        before = logits(eager.eval()(**inputs))  # eager inference keeps RepLoRA's factors from here
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend=BACKEND)
    for model, forward in ((eager, eager), (twin, compiled)):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(3):
            loss = logits(forward(**tiny.inputs(seed=100 + step))).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    ours = dict(twin.named_parameters())
    for n, p in eager.named_parameters():
        torch.testing.assert_close(ours[n], p, atol=1e-5, rtol=1e-4, msg=n)
    with torch.no_grad():
        expected = logits(eager(**inputs))
        assert not torch.allclose(expected, before)
        torch.testing.assert_close(logits(compiled(**inputs)), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits(twin(**inputs)), expected, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", [v for v, options in METHOD_VARIANTS.items() if options["method"] == "replora"])
def test_compiled_inference_matches_eager_inference(variant):
    """Traced without grad, each target generates its own factors alone (its rows of each head)."""
    tiny = TINY_MODELS["llama"]
    model = train_steps(replora.inject(tiny.build(), make_config(tiny, variant)), tiny)
    inputs = tiny.inputs(seed=7)
    expected = outputs(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
    torch.testing.assert_close(outputs(compiled, inputs), expected, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


def checkpointed_gradients(name: str, variant: str, compiled: bool) -> tuple[dict, int]:
    """The adapter's gradients of one training forward under gradient checkpointing, and the graph breaks
    (torch.compile) or 0 (eager)."""
    tiny = TINY_MODELS[name]
    model = replora.inject(tiny.build(), make_config(tiny, variant, lora_dropout=0.0))
    train_steps(model, tiny).train()  # every factor away from its init (B = 0 would hide A's gradients)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch._dynamo.reset()
    counters.clear()
    forward = torch.compile(model, backend=BACKEND) if compiled else model
    logits(forward(**tiny.inputs(seed=9))).pow(2).mean().backward()
    breaks = sum(counters["graph_break"].values())
    torch._dynamo.reset()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, breaks


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_compiled_replora_under_gradient_checkpointing_has_the_eager_gradients(name):
    """The recompute is traced with the forward: RepLoRA breaks no more graphs than LoRA (whose breaks
    here are checkpointing's own) and its gradients are the eager ones."""
    compiled, breaks = checkpointed_gradients(name, "replora", compiled=True)
    assert breaks <= checkpointed_gradients(name, "lora", compiled=True)[1]
    eager, _ = checkpointed_gradients(name, "replora", compiled=False)
    for n, grad in eager.items():
        torch.testing.assert_close(compiled[n], grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("sharing, groups", [("block", 2), ("model", 2), ("none", 4)])
def test_compiled_training_generates_each_groups_factors_once(sharing, groups):
    """Every target of a group asks for its factors while traced; the training graph (the one inductor
    gets) computes them once per group: each generator's activation appears once per group."""
    tiny = TINY_MODELS["plain"]  # no tanh of its own: every tanh in the graph is a generator's
    model = replora.inject(tiny.build(), make_config(tiny, "replora", replora_sharing=sharing)).train()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    # What aot_eager and inductor do: one joint graph, partitioned (and de-duplicated) by min-cut.
    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep, partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    logits(torch.compile(model, backend=backend, fullgraph=True)(**tiny.inputs())).sum().backward()
    forward = graphs[0]
    tanh = [n for n in forward.graph.nodes if n.op == "call_function" and "tanh" in str(n.target)]
    assert len(tanh) == 2 * groups  # the A and the B generator of each group
    torch._dynamo.reset()



@pytest.mark.parametrize("name", ["convnet", "llama-embed", "gpt2"])
def test_eager_training_generates_each_groups_factors_once_on_every_layer_kind(name):
    """The eager counterpart, on the targets the one-addmm forward does not take (Conv2d, Embedding): a
    target asks for its factors once per forward (twice would generate its group again)."""
    tiny = TINY_MODELS[name]
    model = replora.inject(tiny.build(), make_config(tiny, "replora")).train()
    groups = {id(m): m for m in model.modules() if isinstance(m, RepLoRAGroup)}
    calls = []
    for group in groups.values():
        group.generators.lora_A_generator.head.register_forward_hook(lambda *_: calls.append(1))
    logits(model(**tiny.inputs())).sum().backward()
    assert len(calls) == len(groups)
