"""Pruning by budget: `transprune.budget` / `plan_budget`, and `--budget` on flops, run, bench, eval and the plugin."""

import json

import pytest
import torch

import transprune
from transprune import FastVConfig, PDropConfig, TransPruneConfig, VisionZipConfig
from transprune.budget import plan_budget, scaled
from transprune.flops import ARCHS
from transprune.methods import build


def paper_ratio(counts, n, d, m):
    """The paper convention by hand: sum over layers of 4nd^2 + 2n^2d + 3ndm, relative to N tokens everywhere."""
    macs = lambda k: 4 * k * d * d + 2 * k * k * d + 3 * k * d * m  # noqa: E731
    return sum(macs(k) for k in counts) / (len(counts) * macs(n))


def tokens_per_layer(config, n, depth):
    """Visual tokens per layer of an in-LLM schedule, by hand: int(n * ratio) after each pruning layer (round() for a
    method whose code rounds: FastV), at least the method's ``min_keep`` (V2Drop keeps one)."""
    counts, current = [], n
    stages = dict(zip(config.pruning_layers, config.keep_ratios))
    for layer in range(1, depth + 1):
        counts.append(current)
        if layer in stages:
            share = n * stages[layer]
            current = max(getattr(config, "min_keep", 0), round(share) if config.keep_rounding == "round" else int(share))
    return counts


CASES = [TransPruneConfig(), FastVConfig(), PDropConfig(), TransPruneConfig.preset("low"), build("random"),
         VisionZipConfig(), build("visionzip+transprune"), build("dart"), build("v2drop"), build("v2drop-qwen"),
         build("divprune"), build("cdpruner"), build("cdpruner192+transprune")]


@pytest.mark.parametrize("arch", ["llava-1.5-7b", "qwen2.5-vl-7b", "gemma3-4b"])
@pytest.mark.parametrize("target", [0.3, 0.41, 0.6])
@pytest.mark.parametrize("config", CASES, ids=lambda c: "+".join(x.method for x in transprune.methods.as_list(c)))
def test_no_scale_of_the_knob_comes_closer_to_the_target(config, target, arch):
    from transprune.flops import estimate

    def grid_ratios(top):
        for i in range(1, 1201):  # a fine grid of the knob
            factor = top * i / 600
            try:
                report = estimate(scaled(config, factor), arch)
            except ValueError:
                continue
            if min(report.visual_tokens_per_layer) >= 1:
                yield factor, report.ratio

    try:
        plan = plan_budget(config, arch, target)
    except ValueError as exc:
        floor = float(str(exc).split("give a budget in [")[1].split(",")[0])
        assert floor > target and min(r for _, r in grid_ratios(8.0)) >= floor - 1e-4  # no valid scale goes lower
        return
    items = transprune.methods.as_list(plan.config)
    before = transprune.methods.as_list(config)
    for a, b in zip(items, before):  # layers unchanged
        assert getattr(a, "pruning_layers", None) == getattr(b, "pruning_layers", None)
    spec = ARCHS[arch]
    if len(items) == 1 and items[0].stage == "in":  # an independent count of the achieved cost
        counts = tokens_per_layer(items[0], spec.image_tokens, spec.num_layers)
        assert plan.visual_tokens_per_layer == tuple(counts)
        assert plan.achieved == pytest.approx(paper_ratio(counts, spec.image_tokens, spec.hidden_size,
                                                          spec.intermediate_size), rel=1e-12)
    best = abs(plan.achieved - target)
    for factor, ratio in grid_ratios(plan.factor):
        assert abs(ratio - target) >= best - 1e-12, factor


def test_errors_name_the_range():
    with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\]"):
        plan_budget(TransPruneConfig(), "llava-1.5-7b", 1.5)
    with pytest.raises(ValueError, match=r"give a budget in \[0.2212, 1\]"):
        plan_budget(TransPruneConfig(), "llava-1.5-7b", 0.1)
    with pytest.raises(ValueError, match="no pruning layers has no keep ratios"):
        plan_budget(TransPruneConfig.preset("off"), "llava-1.5-7b", 0.5)
    full = plan_budget(FastVConfig(), "llava-1.5-7b", 1.0)
    assert full.achieved == 1.0 and set(full.visual_tokens_per_layer) == {576} and full.config.r <= 0.5 / 576 + 1e-12


def test_the_model_reports_the_achieved_ratio():
    from transprune.testing import sample_inputs, tiny_llava, tiny_processor

    model, processor = tiny_llava(seed=0), tiny_processor("llava")
    inputs = sample_inputs(processor, 2, seed=0)
    for config in (TransPruneConfig(reference_depth=32), FastVConfig(), PDropConfig(layers=(2, 4, 6))):
        plan = plan_budget(config, model, 0.5, image_tokens=64)
        assert plan.image_tokens == 64
        with transprune.pruned(model, transprune.budget(config, model, 0.5, image_tokens=64)) as handle, torch.no_grad():
            model(**inputs)
        assert [s.tflops_ratio for s in handle.last_stats] == [pytest.approx(plan.achieved, rel=1e-12)] * 2
        assert abs(plan.achieved - 0.5) < 0.05


def test_cli_flops_run_and_bench_take_a_budget(tmp_path, capsys):
    from transprune.cli import main
    from transprune.testing import random_image, save_tiny_checkpoint

    assert main(["flops", "--arch", "llava-1.5-7b", "--method", "fastv", "--budget", "0.3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budget"]["target"] == 0.3 and abs(out["ratio"] - 0.3) < 0.002 and out["ratio"] == out["budget"]["achieved"]
    assert main(["flops", "--arch", "llava-1.5-7b", "--method", "pdrop", "--budget", "0.2"]) == 2
    assert "give a budget in [0.2832, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["flops", "--arch", "llava-1.5-7b", "--budget", "0"])
    folder = save_tiny_checkpoint(tmp_path / "ck", kind="llava")
    random_image(1).save(tmp_path / "img.png")
    assert main(["run", "--model", str(folder), "--image", str(tmp_path / "img.png"), "--prompt", "what is there ?",
                 "--method", "fastv", "--budget", "0.5", "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budget"] == 0.5 and out["tflops_ratio"] == pytest.approx(
        plan_budget(FastVConfig(), transprune.testing.tiny_llava(), 0.5, image_tokens=64).achieved)
    from transprune.bench import run_bench
    from transprune.bench import parse_methods

    report = run_bench("llava-1.5-reduced", parse_methods("none,fastv,pdrop"), repeats=1, warmup=0, new_tokens=1,
                       budget=0.4)
    ratios = [m["tflops"] / m["tflops_unpruned"] for m in report["methods"][1:]]
    assert report["budget"] == 0.4 and all(abs(r - 0.4) < 0.01 for r in ratios)


def test_eval_runs_every_method_at_one_budget(random_mini):
    from transprune.mini.evaluate import evaluate
    from transprune.mini.model import load_mini

    model, processor = load_mini(random_mini)
    results = evaluate(model, processor, ["none", "transprune-high", "fastv", "pdrop", "visionzip"], n=4, batch_size=4,
                       progress=False, budget=0.45)
    assert results[0].tflops_ratio == 1.0
    assert all(abs(r.tflops_ratio - 0.45) < 0.01 for r in results[1:]), [r.tflops_ratio for r in results]


def test_a_budget_for_a_larger_image_still_applies_to_the_model():
    """Planned for 1024 visual tokens on a model whose nominal image has 16: every stage still keeps a token of the
    nominal count, which `apply` checks."""
    from transprune.testing import tiny_qwen2_5_vl

    model = tiny_qwen2_5_vl(seed=0)
    for config in (PDropConfig(layers=(2, 4, 6)), TransPruneConfig(reference_depth=32), FastVConfig()):
        plan = plan_budget(config, model, 0.3, image_tokens=1024)
        transprune.apply(model, plan.config).remove()
        assert abs(plan.achieved - 0.3) < 0.01
