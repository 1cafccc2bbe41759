"""RepLoRA's update is a rank-r update of LoRA's size (issue 31): on the probe net of research/update_rank.py
(seeded, no timing), its default design spreads the update over as many directions as LoRA and moves it as
far per Adam step at the same learning rate, where replora 0.2's design (kept as an option) collapsed it to
rank one and moved it 4-5x faster. The same statistics over real runs are research's (python -m research
update-rank)."""
from __future__ import annotations

import pytest
import torch

import replora
from research.experiments import LEGACY_REPLORA
from research.update_rank import probe_run, summarize


def mean_step(rows):
    return sum(row["step_norm"] for row in rows) / len(rows)


@pytest.mark.parametrize("lr", [1e-3, 3e-3])
def test_default_replora_spreads_and_steps_like_lora(lr):
    torch.set_num_threads(1)  # the same arithmetic on every machine this runs on
    lora, default, legacy = (probe_run(method, lr, options, width=64)
                             for method, options in (("lora", {}), ("replora", {}), ("replora", LEGACY_REPLORA)))
    # Top singular share of each target's dW after 60 steps (1.0: rank one; LoRA's here: 0.5-0.6).
    assert default[-1]["top_share_mean"] <= lora[-1]["top_share_mean"] + 0.05
    assert 0.75 <= mean_step(default) / mean_step(lora) <= 1.33
    # The probe sees the collapse it was made for: 0.2's design trains a rank-one update, several times larger.
    assert legacy[-1]["top_share_mean"] > 0.95 and mean_step(legacy) / mean_step(lora) > 2.5


def test_default_replora_starts_as_lora_up_to_a_rotation():
    """dW = 0 at init; the generated A_t has LoRA's init scale and r independent rows (no shared bias
    vector in them), and the seeds' features are orthonormal up to tanh's curvature."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.ModuleDict({"query": torch.nn.Linear(96, 96)}) for _ in range(2)])
    replora.inject(model, replora.AdapterConfig(method="replora", r=8, target_modules=["query"]))
    layer = model[0]["query"]
    adapter = layer.lora["default"]
    A, B = adapter.factors()
    assert torch.count_nonzero(B) == 0
    torch.testing.assert_close(A.std().item(), 1 / (3 * 96) ** 0.5, rtol=0.1, atol=0)
    singular = torch.linalg.svdvals(A)
    assert singular[-1] / singular[0] > 0.3  # 0.2's design: a common bias vector made one direction dominate
    group = adapter.group
    z = group.generators.lora_B_generator.features(group.lora_B_seed)
    gram = z @ z.T
    torch.testing.assert_close(gram, torch.diag(gram.diagonal()), atol=0.05, rtol=0)
    assert 0.6 < gram.diagonal().min() and gram.diagonal().max() <= 1.0  # tanh shrinks each row a little


def test_summary_reads_rank_one_and_spread_updates():
    spread = {"a": torch.eye(8)}
    rank_one = {"a": torch.outer(torch.arange(1.0, 9), torch.ones(8))}
    assert summarize(spread)["top_share_mean"] == pytest.approx(1 / 8)
    assert summarize(rank_one)["top_share_mean"] == pytest.approx(1.0)
    assert summarize(rank_one, spread)["step_norm"] == pytest.approx((rank_one["a"] - spread["a"]).norm().item())
