"""The research commands (`python -m research ...`) run end to end on a tiny budget, and a second call
skips every finished run."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import research
from replora.methods import METHODS
from research import bench, cli, experiments, theory
from research.cli import main
from research.experiments import claim_2_verdict

from conftest import ENV, named, sentiment_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _stamps(root):
    return {p.parent.name: p.stat().st_mtime_ns for p in (root / "runs").glob("*/metrics.json")}


@pytest.mark.slow
@pytest.mark.research
def test_sample_efficiency_runs_end_to_end_and_resumes(tmp_path, tiny_folders, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(120))
    args = ["sample-efficiency", "--model", tiny_folders["bert"], "--dataset", str(data),
            "--methods", "lora", "replora", "full", "--fractions", "0.5", "1.0", "--seeds", "0", "1",
            "--epochs", "1", "--lrs", "1e-3", "3e-3", "--output", str(tmp_path / "se")]
    assert main(args) == 0
    root = tmp_path / "se"
    # lr grid: 3 methods x 2 lrs at f = 1, seed 0; then 3 methods x 2 fractions x 2 seeds, 3 shared.
    assert len(_stamps(root)) == 3 * 2 + 3 * 2 * 2 - 3
    assert {p.name for p in root.iterdir()} >= {"sample_efficiency.csv", "sample_efficiency.md", "sample_efficiency.png"}
    assert not [p for p in tmp_path.rglob(".*tmp*")]  # reports are published whole, nothing half-written left
    report = (root / "sample_efficiency.md").read_text()
    assert "RepLoRA − LoRA, paired over seeds" in report and "Claim 2" not in report  # no f = 0.3 here
    assert "| replora | " in report.split("Each method − LoRA")[1] and "Wall time" in report
    assert len((root / "sample_efficiency.csv").read_text().splitlines()) == 1 + 3 * 2 * 2
    before = _stamps(root)
    capsys.readouterr()
    assert main(args) == 0
    assert _stamps(root) == before  # nothing ran again
    assert "Sample efficiency" in capsys.readouterr().out
    # A variant of the grid (LoRA at another learning rate) reuses the grid's runs: only LoRA's 4 new runs.
    variant = ["--methods", "lora", "replora", "--lrs", "lora=1e-2", "--runs", str(root / "runs"),
               "--output", str(root / "lora-lr1e-2")]
    assert main(args[:args.index("--methods")] + ["--fractions", "0.5", "1.0", "--seeds", "0", "1", "--epochs", "1"]
                + variant) == 0
    after = _stamps(root)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == ["lora-lr0.01-f0.5-s0", "lora-lr0.01-f0.5-s1", "lora-lr0.01-f1-s0",
                                                "lora-lr0.01-f1-s1"]
    assert "lora 0.01 (0.01)" in (root / "lora-lr1e-2" / "sample_efficiency.md").read_text()
    assert not (root / "lora-lr1e-2" / "runs").exists()
    _check_report_rebuilds(tmp_path, capsys, ["se/sample_efficiency.md", "se/lora-lr1e-2/sample_efficiency.md"])


def _check_report_rebuilds(results: Path, capsys, reports: list[str]) -> None:
    """`python -m research report` rebuilds each report as its own command made it, from the finished runs
    alone; with a run's metrics gone it trains nothing, says which run and which command finishes it, exits 1."""
    made = {name: (results / name).read_text() for name in reports}
    for name in reports:
        (results / name).unlink()
    capsys.readouterr()
    assert main(["report", "--results", str(results)]) == 0
    assert {name: (results / name).read_text() for name in reports} == made
    assert f"{len(reports)} of {len(reports)} reports rebuilt" in capsys.readouterr().out
    metrics = sorted(results.rglob("runs/*/metrics.json"))[0]
    metrics.rename(metrics.with_suffix(".json.bak"))
    runs_before = sorted(p.name for p in metrics.parent.parent.iterdir())
    assert main(["report", "--results", str(results)]) == 1
    out = capsys.readouterr().out
    assert f"{metrics.parent} has not finished" in out and "`python -m research " in out and "finishes it" in out
    assert sorted(p.name for p in metrics.parent.parent.iterdir()) == runs_before and not metrics.exists()
    metrics.with_suffix(".json.bak").rename(metrics)


@pytest.mark.slow
@pytest.mark.research
def test_the_image_grid_runs_references_on_all_the_data_only(tmp_path, vision_folders, digits):
    args = ["sample-efficiency", "--grid", "dinov2-cifar10", "--model", vision_folders["dinov2"], "--dataset", digits,
            "--methods", "lora", "replora", "full", "head", "--fractions", "0.5", "1.0", "--seeds", "0", "1",
            "--epochs", "1", "--lrs", "1e-3", "--image-size", "16", "--output", str(tmp_path / "img")]
    assert main(args) == 0
    root = tmp_path / "img"
    # The adapters at both fractions and both seeds; full fine-tuning and the linear probe at f = 1 only.
    assert sorted(_stamps(root)) == sorted(f"{named(m)}-lr0.001-f{f}-s{s}" for s in (0, 1) for f, methods in
                                           (("0.5", ("lora", "replora")), ("1", ("lora", "replora", "full", "head")))
                                           for m in methods)
    settings = json.loads((root / "runs" / f"{named('replora')}-lr0.001-f0.5-s1" / "settings.json").read_text())
    assert settings["image_size"] == 16 and settings["keep"] == "last"
    assert json.loads((root / "runs" / "head-lr0.001-f1-s0" / "metrics.json").read_text())["trainable_parameters"] < \
        json.loads((root / "runs" / "lora-lr0.001-f1-s0" / "metrics.json").read_text())["trainable_parameters"]
    report = (root / "sample_efficiency.md").read_text()
    assert "| full | " in report and "| head | " in report
    head_row = next(line for line in report.splitlines() if line.startswith("| head | "))
    assert head_row.split(" | ")[2] == "—" and "±" in head_row.split(" | ")[3]  # f = 0.5 not run; f = 1 run
    assert len((root / "sample_efficiency.csv").read_text().splitlines()) == 1 + 2 * (2 + 4)
    assert (root / "sample_efficiency.png").stat().st_size > 1000


def test_a_pick_at_the_edge_of_the_rates_tries_the_next_rate_beyond_it_once(tmp_path):
    """pick_lrs with extend_edges, read from real metrics.json files (report_only: nothing trains)."""
    grid = experiments.Grid(model="m", dataset="d", methods=("lora", "replora"), fractions=(1.0,), seeds=(0,),
                            lrs={"lora": (1e-3, 3e-3), "replora": (1e-3, 3e-3)}, epochs=1, max_train_examples=None,
                            max_eval_examples=None, max_length=8, extend_edges=True, report_only=True)
    validation = {"lora": {1e-3: 0.70, 3e-3: 0.75, 1e-2: 0.72}, "replora": {1e-3: 0.71, 3e-3: 0.20, 3e-4: 0.74}}

    def finish(method, lr):
        run = experiments.run_dir(tmp_path, grid, method, lr, 1.0, 0)
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({"validation_accuracy": validation[method][lr]}))
    for method, lr in [("lora", 1e-3), ("lora", 3e-3), ("replora", 1e-3), ("replora", 3e-3)]:
        finish(method, lr)
    with pytest.raises(experiments.NotFinished, match="lora-lr0.01-f1-s0 has not finished"):
        experiments.pick_lrs(tmp_path, grid)  # LoRA's best, 3e-3, is its top rate: 1e-2 is tried next
    finish("lora", 1e-2)
    with pytest.raises(experiments.NotFinished, match="replora-hidden_init_orthogonal-.*-lr0.0003-f1-s0"):
        experiments.pick_lrs(tmp_path, grid)  # RepLoRA's best is its bottom rate: 3e-4
    finish("replora", 3e-4)
    chosen, tried = experiments.pick_lrs(tmp_path, grid)
    # LoRA's pick is bracketed now; RepLoRA's 3e-4 is best again, and is not extended a second time.
    assert chosen == {"lora": 3e-3, "replora": 3e-4}
    assert tried == {"lora": (1e-3, 3e-3, 1e-2), "replora": (3e-4, 1e-3, 3e-3)}
    assert experiments.picks_line(chosen, tried) == "lora 0.003 (0.001/0.003/0.01), replora 0.0003 (0.0003/0.001/0.003 at the edge)"
    one = dataclasses.replace(grid, lrs={"lora": (1e-3,), "replora": (1e-3,)})  # a single rate: no search
    assert experiments.pick_lrs(tmp_path, one) == ({"lora": 1e-3, "replora": 1e-3}, {"lora": (1e-3,), "replora": (1e-3,)})
    assert experiments.pick_lrs(tmp_path, dataclasses.replace(grid, extend_edges=False)) == (
        {"lora": 3e-3, "replora": 1e-3}, {"lora": (1e-3, 3e-3), "replora": (1e-3, 3e-3)})


def test_learning_rate_grids_are_checked(tmp_path, capsys):
    for lrs, message in [(["dora=1e-3"], "not among this grid's methods"), (["lora=fast"], "method=rate"),
                         (["1e-3"], None)]:
        args = ["sample-efficiency", "--methods", "lora", "full", "--lrs", *lrs,
                "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]
        assert main(args) == 2
        err = capsys.readouterr().err
        lines = err.splitlines()  # training's progress lines may come first; then one error line
        assert lines[-1].startswith("research: error: ") and sum(x.startswith("research:") for x in lines) == 1
        assert (message or "missing") in err and "Traceback" not in err
    assert main(["sample-efficiency", "--grid", "smollm2-siqa", "--methods", "full"]) == 2
    err = capsys.readouterr().err
    assert err == "research: error: grid smollm2-siqa has no learning rates for ['full']: give them, e.g. --lrs full=1e-3\n"


@pytest.mark.slow
@pytest.mark.research
def test_ablations_run_end_to_end_and_resume(tmp_path, tiny_folders):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(60))
    args = ["ablations", "--model", tiny_folders["bert"], "--dataset", str(data), "--seeds", "0",
            "--epochs", "1", "--lrs", "1e-3", "--output", str(tmp_path / "ab")]
    assert main(args) == 0
    root = tmp_path / "ab"
    assert len(_stamps(root)) == 7
    configs = [json.loads(p.read_text())["adapter_config"] for p in (root / "runs").glob("*/metrics.json")]
    assert {c["replora_sharing"] for c in configs} == {"block", "none"}
    assert {c["replora_activation"] for c in configs} == {"tanh", "identity", "gelu"}
    assert "(best on validation)" in (root / "ablations.md").read_text()
    before = _stamps(root)
    assert main(args) == 0
    assert _stamps(root) == before


@pytest.mark.slow
def test_theory_simulation_runs_end_to_end(tmp_path):
    args = ["theory", "--ns", "50", "200", "--repetitions", "2", "--inits", "1", "--lbfgs-steps", "20",
            "--output", str(tmp_path / "th")]
    assert main(args) == 0
    rows = (tmp_path / "th" / "theory.csv").read_text().splitlines()
    assert rows[0] == "method,case,n,repetition,product_error,voronoi_loss,voronoi_svd,excess_loss"
    assert len(rows) == 1 + 2 * 2 * 2 * 2  # methods x cases x ns x repetitions
    report = (tmp_path / "th" / "theory.md").read_text()
    assert "Fitted log-log slopes ± their standard errors" in report and "| over | RepLoRA |" in report
    assert (tmp_path / "th" / "theory.png").stat().st_size > 1000
    assert main(args[:-1] + [str(tmp_path / "one"), "--cases", "exact", "--r-true", "2", "--r-fit", "3"]) == 0
    rows = (tmp_path / "one" / "theory.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 * 2 * 2 and all(",exact," in row for row in rows)
    # theory.md and theory.png rebuilt from theory.csv and the settings beside it, without simulating again
    made = {p: (tmp_path / p).read_text() for p in ("th/theory.md", "one/theory.md")}
    saved = json.loads((tmp_path / "one" / "theory.settings.json").read_text())
    assert saved["settings"]["r_true"] == 2 and saved["command"].startswith("python -m research theory --ns 50 200")
    for p in made:
        (tmp_path / p).unlink()
    assert main(["report", "--results", str(tmp_path)]) == 0
    assert {p: (tmp_path / p).read_text() for p in made} == made


def test_theory_refuses_an_over_specified_case_without_more_components(tmp_path, capsys):
    assert main(["theory", "--ns", "20", "40", "--r-true", "2", "--r-fit", "2", "--output", str(tmp_path / "th")]) == 2
    assert "the over-specified case fits more components" in capsys.readouterr().err
    assert not (tmp_path / "th").exists()


def _theory_truth(r, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in [(r, 5), (4, r)] * 2)


def test_theory_voronoi_loss_is_zero_at_the_truth_and_blind_to_the_factors_symmetries():
    true = _theory_truth(2)
    assert theory.factor_loss(true, true) == pytest.approx(0, abs=1e-12)
    fit = tuple(f + 0.05 * torch.randn(f.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                for f in true)
    loss = theory.factor_loss(fit, true)
    assert loss > 1e-3
    # The same fit, its components in the other order, each rescaled (b c, a / c), one of them with c < 0.
    c = torch.tensor([-3.0, 0.25], dtype=torch.float64)
    swapped = [fit[0].flip(0) / c[:, None], fit[1].flip(1) * c, fit[2].flip(0) * c[:, None], fit[3].flip(1) / c]
    assert theory.factor_loss(swapped, true) == pytest.approx(loss, rel=1e-9)
    assert all(not torch.allclose(a, b) for a, b in zip(swapped, fit))


def test_theory_voronoi_loss_squares_the_distances_in_a_cell_of_several_components():
    A, B, _, _ = _theory_truth(1)
    e = torch.zeros(5, dtype=torch.float64)
    e[0], e[1] = A[0, 1], -A[0, 0]                     # orthogonal to the true row a
    for split, ratio in ((True, 4), (False, 2)):
        def loss(eps):
            if split:  # two fitted components in the true one's cell, a turned by +eps and -eps, b halved
                fit_A, fit_B = torch.stack([A[0] + eps * e, A[0] - eps * e]), torch.cat([B, B], dim=1) / 2
            else:      # one fitted component, a turned by eps
                fit_A, fit_B = A + eps * e, B
            return theory.voronoi_loss(theory.components(fit_A, fit_B), theory.components(A, B))
        # Quadratic in the perturbation for the split (over-specified) cell, linear for the single one.
        assert loss(1e-3) / loss(5e-4) == pytest.approx(ratio, rel=0.01)


def test_theory_voronoi_loss_charges_a_missed_component_its_weight():
    A, B, _, _ = _theory_truth(2)
    weights, _ = theory.components(A, B)
    # A rank-1 fit equal to the first true component: the second one's cell stays empty.
    assert theory.voronoi_loss(theory.components(A[:1], B[:, :1]), theory.components(A, B)) == \
        pytest.approx(weights[1].item(), rel=1e-9)


@pytest.mark.slow
@pytest.mark.research
def test_bench_runs_on_a_tiny_model_in_seconds(tmp_path, tiny_folders, tiny_lm_folders):
    # A classifier (training + one forward pass) and a causal LM (training + greedy decoding).
    args = ["bench", "--models", tiny_folders["bert"], tiny_lm_folders["plain"], "--batches", "2x8", "--ranks", "4",
            "--rounds", "2", "--min-time", "0.01", "--threads", "1", "--gen-tokens", "3",
            "--sft-rounds", "2", "--sft-steps", "2", "--sft-items", "40", "--output", str(tmp_path / "b")]
    assert main(args) == 0
    results = json.loads((tmp_path / "b" / "bench.json").read_text())
    bert, lm = results["models"]
    assert (bert["causal_lm"], lm["causal_lm"]) == (False, True)
    for m in results["models"]:
        (config,) = m["configs"]
        assert config["batch"] == [2, 8] and config["r"] == 4
        train = config["train"]
        # Every registered method is benchmarked, the four of the papers among them.
        assert set(train) == {"peft-lora", "peft-dora"} | {f"replora-{m}" for m in METHODS}
        assert {"replora-lora", "replora-dora", "replora-moslora", "replora-replora"} <= set(train)
        assert train["replora-dora"]["reference"] == "peft-dora" and train["replora-replora"]["reference"] == "peft-lora"
        for v in train.values():
            # Each round timed the contender, its reference and the floor: the raw times are kept.
            assert len(v["times_s"]) == 2 and all(len(row) == 3 and min(row) > 0 for row in v["times_s"])
            assert v["floor"] == "floor" and v["ratio"]["rounds"] == 2 and v["above_floor"]["rounds"] == 2
            ratio = v["overhead_ratio"]
            assert ratio["rounds"] + ratio["unresolved"] == 2
            expected = sorted((t - f) / (r - f) for t, r, f in v["times_s"] if r > f)
            if expected:  # the per-round ratios, summarized
                assert ratio["q1"] <= ratio["median"] <= ratio["q3"] and expected[0] <= ratio["median"] <= expected[-1]
            assert v["peak_bytes"] > 0
        assert train["peft-lora"]["memory_ratio"] == 1.0  # the control: the reference against itself
        assert train["replora-lora"]["memory_ratio"] == pytest.approx(1.0, abs=0.05)
        floor = config["floor"]  # the frozen model's step: no adapter, no optimizer state
        assert floor["median_s"] > 0 and floor["ratio"]["rounds"] == 2 and 0 < floor["memory_ratio"] < 1
        assert "compiled" not in config
    # The classifier's inference is one forward pass, the causal LM's greedy decoding.
    inference = bert["configs"][0]["inference"]["rows"]
    assert set(inference) == set(bench.INFER_REFERENCES) | {"base"}
    assert inference["replora-lora-merged"]["reference"] == "base" and "overhead_ratio" not in inference["replora-lora-merged"]
    assert bert["generation"] == [] and "inference" not in lm["configs"][0]
    (generation,) = lm["generation"]
    assert generation["r"] == 4 and generation["new_tokens"] == 3
    rows = generation["rows"]
    assert set(rows) == set(bench.INFER_REFERENCES) | {"base"}
    assert all(v["tokens_per_s"] > 0 and v["ratio"]["rounds"] == 2 for v in rows.values())
    assert rows["replora-replora"]["reference"] == "peft-lora" and len(rows["replora-replora"]["times_s"][0]) == 3
    # Generative training against TRL, on the causal LM only: each round ran replora and both TRL packings.
    assert "sft" not in bert
    sft = lm["sft"]
    assert sft["settings"]["model"] == tiny_lm_folders["plain"] and len(sft["rounds"]) == 2
    for g in sft["rounds"]:
        assert all(g[who]["tokens_per_second"] > 0 and g[who]["steps"] == 2 for who in ("replora", "trl-bfd", "trl-wrapped"))
        assert g["trl-best"]["tokens_per_second"] == max(g["trl-bfd"]["tokens_per_second"], g["trl-wrapped"]["tokens_per_second"])
    ratios = sorted(g["replora"]["tokens_per_second"] / g["trl-best"]["tokens_per_second"] for g in sft["rounds"])
    assert sft["ratios"]["trl-best"]["median"] == pytest.approx(sum(ratios) / 2)
    report = (tmp_path / "b" / "bench.md").read_text()
    for text in ("Generative training, real tokens/s", "generative training against TRL SFTTrainer", "overhead ratio", "time ratio", "memory ratio",
                 "Greedy decoding", "tokens/s", "inference (one forward pass)", "peft-lora (control)"):
        assert text in report
    assert (tmp_path / "b" / "bench.png").stat().st_size > 1000


@pytest.mark.slow
def test_bench_profile_says_where_each_contender_spends_its_step(tmp_path, tiny_folders):
    args = ["bench", "--models", tiny_folders["bert"], "--batches", "2x8", "--ranks", "4", "--rounds", "1",
            "--min-time", "0", "--threads", "1", "--profile", "2", "--output", str(tmp_path / "p")]
    assert main(args) == 0
    (config,) = json.loads((tmp_path / "p" / "bench.json").read_text())["models"][0]["configs"]
    profile = config["profile"]
    assert set(profile) == {"floor"} | set(bench.TRAIN_REFERENCES)
    for name, p in profile.items():
        assert p["steps"] == 2 and p["clock"] == "cpu"
        assert p["calls"] == pytest.approx(sum(v["calls"] for v in p["ops"].values()))
        # Per step: every contender runs the floor's ops and more (its factors, their gradients, AdamW).
        if name != "floor":
            assert p["calls"] > profile["floor"]["calls"] and p["ops"]["aten::mm"]["calls"] > profile["floor"]["ops"]["aten::mm"]["calls"]
    # The frozen model's step has no optimizer; every contender's has one AdamW step per training step.
    assert not any("Optimizer.step" in op for op in profile["floor"]["ops"])
    assert all(any("Optimizer.step" in op and v["calls"] == 1 for op, v in profile[n]["ops"].items())
               for n in bench.TRAIN_REFERENCES)
    report = (tmp_path / "p" / "bench.md").read_text()
    assert "Profiled (2 steps each" in report
    assert sum(line.startswith("- replora-") for line in report.splitlines()) == len(bench.CONTENDERS)
    with pytest.raises(ValueError, match="profile"):
        bench.BenchSettings(profile=-1).validate()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # layer 0: no input needs a gradient
def test_bench_floor_reaches_every_adapted_layer_and_no_further():
    """The floor's backward computes the gradient at every target's output (what an adapter needs), and not
    the lowest targets' input gradients (what no adapter needs)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32)).requires_grad_(False)
    floor = bench._Floor(model, torch.device("cpu"))
    reached, inputs_reached = [], []

    def seen(name):
        def hook(module, grad_input, grad_output):
            reached.append(name)
            inputs_reached.append(grad_input[0] is not None)
        return hook

    for name, module in model.named_modules():
        if name.endswith(("query", "value")):
            module.register_full_backward_hook(seen(name))
    batch = {"input_ids": torch.randint(5, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    step = bench._Step(floor, batch)
    step()
    assert sorted(reached) == sorted(n for n, _ in model.named_modules() if n.endswith(("query", "value")))
    by_layer = dict(zip(reached, inputs_reached))
    # Layer 0's inputs are the embeddings: no gradient for them; layer 1's come from layer 0: they carry one.
    assert not any(v for n, v in by_layer.items() if ".layer.0." in n) and all(
        v for n, v in by_layer.items() if ".layer.1." in n)
    assert step.optimizer is None and step.state_bytes() == 0 and floor.zero.grad is None
    assert all(p.grad is None for p in model.parameters())  # no weight gradient


@pytest.mark.slow
@pytest.mark.research
def test_bench_compile_times_compiled_steps_against_compiled_peft(tmp_path, tiny_folders):
    # The eager backend traces with dynamo (graph breaks, recompiles) without generating code: seconds.
    args = ["bench", "--models", tiny_folders["bert"], "--batches", "2x8", "--ranks", "4", "--rounds", "2",
            "--min-time", "0.01", "--threads", "1", "--compile-backend", "eager", "--output", str(tmp_path / "c")]
    assert main(args) == 0
    compiled = json.loads((tmp_path / "c" / "bench.json").read_text())["models"][0]["configs"][0]["compiled"]
    assert compiled["backend"] == "eager" and compiled["floor"]["median_s"] > 0
    assert set(compiled["contenders"]) == {"floor"} | set(bench.TRAIN_REFERENCES)
    for name, v in compiled["train"].items():
        assert v["reference"] == bench.TRAIN_REFERENCES[name] and len(v["times_s"]) == 2
        assert v["graph_breaks"] >= 0 and v["recompiles"] >= 0 and v["graphs"] >= 1 and v["compile_s"] > 0
    assert compiled["train"]["replora-lora"]["graph_breaks"] == 0  # LoRA compiles whole
    report = (tmp_path / "c" / "bench.md").read_text()
    assert "compiled step (eager)" in report and "Compiled training-step time ratio" in report


def test_bench_options_and_the_quick_subset(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda s, root: seen.update(settings=s, root=root) or "report")
    assert main(["bench", "--quick", "--output", str(tmp_path)]) == 0
    quick = seen["settings"]
    assert (quick.models, quick.batches, quick.ranks, quick.rounds) == (("smollm2",), ((4, 32),), (8,), 5)
    assert quick.generation and not quick.compile and quick.sft_rounds == 0  # (TRL's runs take minutes)
    assert main(["bench", "--quick", "--ranks", "64", "--batches", "16x64", "--compile"]) == 0
    assert seen["settings"].ranks == (64,) and seen["settings"].batches == ((16, 64),) and seen["settings"].compile
    assert seen["settings"].compile_backend == "inductor"
    assert main(["bench"]) == 0
    full = seen["settings"]
    assert (full.models, full.batches, full.ranks) == (("minilm", "smollm2"), ((4, 32), (16, 64)), (8, 64))
    assert (full.sft_rounds, full.sft_steps, full.sft_items) == (3, 20, 2000)


def test_bench_refuses_bad_options_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--batches", "4by32"])
    assert exit_.value.code == 2 and "give examples x tokens" in capsys.readouterr().err
    assert main(["bench", "--rounds", "0", "--output", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("research: error: rounds must be at least 1") and "Traceback" not in err


def test_claim_2_verdict_reads_the_paired_differences():
    assert claim_2_verdict([0.80, 0.81, 0.79], [0.80, 0.80, 0.80]) == "Held here."
    # 0.5 points short on average, differences spread by 1 point: short, but within the spread.
    assert claim_2_verdict([0.795, 0.81, 0.78], [0.80, 0.80, 0.80]).startswith("Not reached here, by less")
    assert claim_2_verdict([0.77, 0.78, 0.77], [0.80, 0.80, 0.80]) == "Did not hold here."


def test_the_grids_and_the_bench_take_their_methods_from_the_registry():
    methods = tuple(METHODS)
    assert experiments.GRIDS["minilm-rt"].methods == (*methods, "full")
    assert experiments.GRIDS["smollm2-siqa"].methods == methods
    for grid in experiments.GRIDS.values():
        assert set(grid.lrs) == set(grid.methods) and all(grid.lrs.values())
    assert bench.REPLORA_METHODS == methods
    assert bench.TRAIN_REFERENCES == {"peft-lora": "peft-lora", "peft-dora": "peft-lora",
                                      **{f"replora-{m}": "peft-dora" if m == "dora" else "peft-lora" for m in methods}}
    assert bench.INFER_REFERENCES == {**bench.TRAIN_REFERENCES, "replora-lora-merged": "base",
                                      "replora-replora-merged": "base"}


def test_default_output_folders_are_under_research_results_wherever_it_runs(tmp_path, monkeypatch, capsys):
    assert cli.RESULTS == Path(research.__file__).resolve().parent / "results"
    assert cli.RESULTS == ROOT / "research" / "results"
    monkeypatch.setattr(cli, "RESULTS", tmp_path / "results")  # not the committed results
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["theory", "--ns", "20", "40", "--repetitions", "1", "--inits", "1", "--lbfgs-steps", "2"]) == 0
    assert (tmp_path / "results" / "theory" / "theory.csv").is_file()
    assert f"results in {tmp_path / 'results' / 'theory'}" in capsys.readouterr().out
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_theory_refuses_a_single_sample_size(tmp_path, capsys):
    assert main(["theory", "--ns", "50", "--output", str(tmp_path / "th")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("research: error: the theory simulation fits a slope") and "Traceback" not in err
    assert not (tmp_path / "th").exists()


def test_the_old_replora_commands_are_gone_and_unknown_ones_refused(capsys):
    for argv in (["experiment", "theory"], ["train"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_python_m_research_runs_from_the_repository_root():
    for command in ("theory", "bench"):
        done = subprocess.run([sys.executable, "-m", "research", command, "--help"], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: research {command}") and "--output" in done.stdout


def test_update_rank_probe_reports_every_method_and_design(tmp_path):
    from research import update_rank

    report = update_rank.probe(tmp_path, lrs=(1e-3,), steps=3, width=16)
    for name in update_rank.probe_contenders():
        assert f"| {name} | 0.001 |" in report
    rows = (tmp_path / "probe.csv").read_text().splitlines()
    assert len(rows) == 1 + len(update_rank.probe_contenders())


@pytest.mark.slow
@pytest.mark.research
def test_update_rank_traces_a_run_and_names_runs_by_their_design(tmp_path, tiny_folders):
    """A traced run records every step's update in its folder; runs are named by the options that differ from
    replora 0.2's, so the committed 0.2 runs keep their names and today's RepLoRA gets its own."""
    from research import update_rank

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(120))
    grid = experiments.Grid(model=tiny_folders["bert"], dataset=str(data), methods=("replora",), fractions=(1.0,),
                            seeds=(0,), lrs={"replora": (1e-3,)}, epochs=1, max_train_examples=None,
                            max_eval_examples=None, max_length=32)
    runs = tmp_path / "runs"
    metrics, trajectory = update_rank.traced_run(runs, grid, "replora", 1e-3)
    assert (runs / "replora-hidden_init_orthogonal-hidden_bias_none-head_bias_none-lr0.001-f1-s0" / "metrics.json").is_file()
    assert [t["step"] for t in trajectory] == list(range(1, metrics["steps"] + 1))
    assert all(t["norm"] > 0 for t in trajectory) and all("step_norm" in t for t in trajectory[1:])
    assert 0 < trajectory[0]["top_share_mean"] <= 1
    again = update_rank.traced_run(runs, grid, "replora", 1e-3)  # finished: read, not trained again
    assert again == (metrics, trajectory)
    # A grid recorded before grids had options ran 0.2's RepLoRA: its runs have the plain names.
    saved = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(grid))).items()
             if k not in ("options", "report_only")}
    old = experiments.Grid.from_json(saved)
    assert experiments.run_dir(runs, old, "replora", 1e-3, 1.0, 0).name == "replora-lr0.001-f1-s0"
    assert experiments.run_dir(runs, old, "replora", 1e-3, 1.0, 0, {"replora_activation": "gelu"}).name == \
        "replora-activation_gelu-lr0.001-f1-s0"
    assert experiments.run_dir(runs, grid, "lora", 1e-3, 1.0, 0).name == "lora-lr0.001-f1-s0"


def test_grid_option_flag_is_checked_and_recorded():
    grid = experiments.GRIDS["minilm-rt"]
    assert cli.parse_options(["replora_head_bias=shared", "replora_hidden_size=16"], grid.options) == {
        "replora": {"replora_head_bias": "shared", "replora_hidden_size": 16}}
    with pytest.raises(ValueError, match="unknown replora_head_bias 'sideways'"):
        cli.parse_options(["replora_head_bias=sideways"], {})
    with pytest.raises(ValueError, match="give a method option as name=value"):
        cli.parse_options(["head_bias=shared"], {})
    # An option two methods share (one Option object) is given to both.
    from replora.methods import LoRA, Option, register_method
    shared = Option("none", "a shared init", ("none", "some"))
    one = type("One", (LoRA,), {"name": "one", "summary": "s·B A", "options": {"shared_init": shared}})
    two = type("Two", (LoRA,), {"name": "two", "summary": "s·B A", "options": {"shared_init": shared}})
    try:
        register_method(one), register_method(two)
        assert cli.parse_options(["shared_init=some"], {}) == {"one": {"shared_init": "some"},
                                                              "two": {"shared_init": "some"}}
    finally:
        METHODS.pop("one", None), METHODS.pop("two", None)


def test_the_readme_quotes_the_committed_demo_table():
    """The README's demo table is research/results/demo/demo.txt, which `python -m research demo` writes."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = (Path(__file__).parents[1] / "research" / "results" / "demo" / "demo.txt").read_text()
    assert f"```\n{table}```" in readme
