"""`transprune bench` on the reduced LLaVA-1.5 arch (576 image tokens, 32 layers, small hidden size), CPU."""

import contextlib
import io
import json

import pytest

from transprune import FastVConfig, TransPruneConfig
from transprune.bench import arch_config, arch_spec, method_names, summarize
from transprune.cli import main
from transprune.flops import estimate

BATCH, TEXT, NEW = 2, 16, 3


@pytest.fixture(scope="module")
def report():
    argv = ["bench", "--arch", "llava-1.5-reduced", "--methods", "none,transprune-high", "--batch", str(BATCH),
            "--dtype", "fp32", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--new-tokens", str(NEW),
            "--text-tokens", str(TEXT), "--json"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


def test_report_fields_and_same_inputs(report):
    assert report["random_weights"] is True and "random" in report["weights"]
    assert report["batch"] == BATCH and report["image_tokens"] == [576] * BATCH and report["text_tokens"] == [TEXT] * BATCH
    assert report["attn_implementation"] == "sdpa" and report["memory_measure"].startswith("cpu:")
    none, high = report["methods"]
    assert [none["name"], high["name"]] == ["none", "transprune-high"]
    assert none["inputs_sha256"] == high["inputs_sha256"] == report["inputs_sha256"]
    for m in (none, high):
        for key in ("prefill_s", "ttft_s", "decode_tokens_per_s"):
            assert m[key]["median"] > 0 and m[key]["min"] <= m[key]["median"] <= m[key]["max"]
        assert m["kv_cache_bytes"] > 0 and m["peak_memory_bytes"] > 0
    assert none["scoring_s"] is None and none["config"] == []
    assert 0 < high["scoring_s"]["median"] < high["prefill_s"]["median"]
    assert set(high["scoring_detail"]) >= {"ttv_s", "select_s", "drop_s", "scoring_s"}
    assert len(high["scoring_detail"]["select_s"]) == 3
    assert high["config"][0]["method"] == "transprune" and high["config"][0]["keep_ratios"] == [0.875, 0.625, 0.125]
    assert high["ratios"]["prefill"] == pytest.approx(high["prefill_s"]["median"] / none["prefill_s"]["median"])
    assert none["ratios"]["prefill"] == 1.0


def test_decode_count_equal_across_methods(report):
    assert all(m["new_tokens"] == [NEW] for m in report["methods"])


def test_tflops_match_the_estimate(report):
    none, high = report["methods"]
    spec = arch_spec("llava-1.5-reduced")
    assert (spec.image_tokens, spec.num_layers, spec.hidden_size) == (576, 32, 128)
    est = estimate(TransPruneConfig.preset("high"), spec, text_tokens=TEXT)
    assert high["tflops"] == pytest.approx(est.tflops, rel=1e-12)
    assert none["tflops"] == pytest.approx(est.tflops_unpruned, rel=1e-12)
    assert high["ratios"]["tflops"] == pytest.approx(est.ratio, rel=1e-12)
    assert high["visual_tokens_per_layer"] == [list(est.visual_tokens_per_layer)] * BATCH


def test_kv_bytes_are_what_the_kept_tokens_imply(report):
    text = arch_config("llava-1.5-reduced").text_config
    layers, kv_heads = text.num_hidden_layers, text.num_key_value_heads
    head_dim = text.hidden_size // text.num_attention_heads
    per_token = 2 * kv_heads * head_dim * 4  # key + value, fp32

    # Independently of the runtime: TransPrune-High keeps int(576 * r) image tokens after layers 7, 9, 12.
    image = [576] * 7 + [int(576 * 0.875)] * 2 + [int(576 * 0.625)] * 3 + [int(576 * 0.125)] * 20
    none, high = report["methods"]
    assert none["kv_tokens_per_layer"] == [576 + TEXT] * layers
    assert none["kv_cache_bytes"] == BATCH * layers * (576 + TEXT) * per_token
    assert high["kv_tokens_per_layer"] == [n + TEXT for n in image]
    assert high["kv_cache_bytes"] == BATCH * sum(n + TEXT for n in image) * per_token
    assert high["ratios"]["kv_cache"] == pytest.approx(sum(n + TEXT for n in image) / (layers * (576 + TEXT)))


def test_text_table_says_random_weights(report, capsys):
    from transprune.bench import format_report

    text = format_report(report)
    assert "random weights were used" in text and "transprune-high" in text and "0.37x" in text


def test_bad_method_is_a_usage_error_naming_the_allowed_values(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--arch", "llava-1.5-reduced", "--methods", "none,fastvv"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "fastvv" in err and all(name in err for name in method_names())


def test_full_size_arch_needs_random_weights(capsys):
    assert main(["bench", "--arch", "llava-1.5-7b", "--methods", "none", "--device", "cpu"]) == 2
    assert "--random-weights" in capsys.readouterr().err


def test_summarize():
    assert summarize([3.0, 1.0, 2.0, 4.0]) == {"median": 2.5, "min": 1.0, "max": 4.0, "q1": 1.75, "q3": 3.25, "n": 4}
    assert summarize([2.0])["q1"] == 2.0


def test_checkpoint_folder_runs_through_its_processor(tmp_path):
    from transprune.testing import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "ckpt", kind="llava", seed=0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "--arch", str(folder), "--methods", "none,fastv", "--batch", "2", "--device", "cpu",
                     "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--text-tokens", "12", "--json"]) == 0
    rep = json.loads(out.getvalue())
    assert rep["random_weights"] is False and rep["weights"].startswith("checkpoint")
    assert rep["image_tokens"] == [64, 64] and all(n <= 12 for n in rep["text_tokens"])
    assert [m["new_tokens"] for m in rep["methods"]] == [[2], [2]]
    # FastV k=2 as written (layer numbers are no longer mapped from 32 layers unless reference_depth says so)
    assert rep["methods"][1]["visual_tokens_per_layer"][0] == [64] * 2 + [32] * 6


def test_llava_next_inputs_use_the_models_own_packing():
    from transprune.bench import measure_method, synthetic_inputs
    from transprune.testing import tiny_llava_next

    model = tiny_llava_next(seed=0)
    inputs = synthetic_inputs(model, 2, text_tokens=10)
    assert inputs.image_tokens == [336, 336]  # 128x128: base 64 + 2x2 grid 256 + 16 newlines
    assert inputs.tensors["pixel_values"].shape[:2] == (2, 5)
    cfg = TransPruneConfig(accumulation_layers=(2, 3), pruning_layers=(2, 3), keep_ratios=(0.5, 0.25), reference_depth=None)
    result = measure_method(model, inputs, "tp", cfg, repeats=1, warmup=0, new_tokens=2)
    assert result.new_tokens == [2] and result.visual_tokens_per_layer[0] == [336] * 2 + [168] + [84] * 5
    assert result.kv_tokens_per_layer == [346] * 2 + [178] + [94] * 5


# The public config.json facts of the named full-size archs, written here once as the reference the families' own
# declarations (`ModelAdapter.archs`, read through `arch_spec`) must give: d, m, layers, heads, KV heads, head_dim, N.
PUBLIC_FACTS = {
    "llava-1.5-7b": (4096, 11008, 32, 32, 32, 128, 576), "llava-1.5-13b": (5120, 13824, 40, 40, 40, 128, 576),
    "llava-next-7b": (4096, 11008, 32, 32, 32, 128, 2880), "llava-onevision-7b": (3584, 18944, 28, 28, 4, 128, 1485),
    "smolvlm-256m": (576, 1536, 30, 9, 3, 64, 1088), "internvl3-8b": (3584, 18944, 28, 28, 4, 128, 256),
    "gemma3-4b": (2560, 10240, 34, 8, 4, 256, 256), "qwen2-vl-7b": (3584, 18944, 28, 28, 4, 128, 256),
    "qwen2.5-vl-7b": (3584, 18944, 28, 28, 4, 128, 256), "qwen3-vl-8b": (4096, 12288, 36, 32, 8, 128, 256),
    # Qwen3-VL-30B-A3B: m is the active FFN width, 8 of 128 experts x 768 (moe_intermediate_size) per token
    "qwen3-vl-30b-a3b": (2048, 8 * 768, 48, 32, 4, 128, 256),
}


def test_every_family_declares_its_archs_and_flops_and_bench_read_them():
    """flops' ARCHS and bench's CONFIGS / REDUCED are the registry's (`adapters.named_archs`): each full-size arch
    holds its public facts, each reduced arch builds a model of its family, and no arch is written twice."""
    from transprune.adapters import FAMILIES, named_archs
    from transprune.bench.archs import CONFIGS, REDUCED
    from transprune.flops import ARCHS

    declared = named_archs()
    assert list(ARCHS) == [n for n, (_, _, reduced) in declared.items() if not reduced]
    assert sorted(ARCHS) == sorted(PUBLIC_FACTS)
    assert list(CONFIGS) == list(declared) and list(REDUCED) == [n for n, (_, _, r) in declared.items() if r]
    for name, facts in PUBLIC_FACTS.items():
        a = ARCHS[name]
        assert (a.hidden_size, a.intermediate_size, a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim,
                a.image_tokens) == facts, name
    for name in REDUCED:
        family = declared[name][0]
        assert arch_config(name).model_type in family.model_types and family in FAMILIES
    assert all(vars(f).get("archs") for f in FAMILIES)  # every family names a full-size model of its own


def test_llava_1_5_7b_has_the_checkpoints_parameter_count():
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):  # the llava-hf/llava-1.5-7b-hf parameter count, built on the meta device
        model = LlavaForConditionalGeneration._from_config(arch_config("llava-1.5-7b"))
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072


def _bench_json(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


def test_random_weights_from_a_config_folder(tmp_path):
    """A folder holding only a config.json (or the config.json itself) + --random-weights: the model of that
    config with the seeded random init, on synthetic inputs."""
    from transprune.testing import tiny_llava_config

    tiny_llava_config(num_hidden_layers=32).save_pretrained(tmp_path)  # TransPrune's layers 7, 9, 12 fit
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    argv = ["--random-weights", "--methods", "none,transprune-high", "--batch", "1", "--device", "cpu",
            "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--text-tokens", "8", "--json"]
    reports = [_bench_json(["bench", "--arch", str(arch), *argv]) for arch in (tmp_path, tmp_path / "config.json")]
    for rep in reports:
        assert rep["random_weights"] is True and "random" in rep["weights"]
        assert rep["image_tokens"] == [64] and rep["text_tokens"] == [8]
        none, high = rep["methods"]
        assert [none["name"], high["name"]] == ["none", "transprune-high"]
        assert none["ratios"]["tflops"] == 1.0 and none["visual_tokens_per_layer"] == [[64] * 32]
        assert high["visual_tokens_per_layer"] == [[64] * 7 + [56] * 2 + [40] * 3 + [8] * 20]
        assert high["ratios"]["tflops"] == pytest.approx(high["tflops"] / none["tflops"])
        assert high["ratios"]["tflops"] < 1 and high["kv_cache_bytes"] < none["kv_cache_bytes"]
    assert reports[0]["inputs_sha256"] == reports[1]["inputs_sha256"]
    import torch  # the machine a figure ran on: its CPU kernels, threads

    env = reports[0]["environment"]
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["torch_threads"] >= 1


def test_random_weights_refuse_an_unsupported_config_naming_the_supported_ones(tmp_path, capsys):
    from transprune.adapters import supported_model_types

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert main(["bench", "--arch", str(tmp_path), "--random-weights", "--methods", "none", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "'mamba'" in err and f"supported: {', '.join(supported_model_types())}" in err and "llava_next" in err


# -- Qwen archs ---------------------------------------------------------------------------------------------
def test_qwen_reduced_bench_runs_on_cpu():
    """The reduced Qwen2.5-VL (28 layers, GQA 7:1, 256 visual tokens at 448 x 448, small widths) through the CLI,
    with the model's own mRoPE positions (synthetic inputs carry mm_token_type_ids)."""
    report = _bench_json(["bench", "--arch", "qwen2.5-vl-reduced", "--methods", "none,transprune-high", "--batch", "2",
                          "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--random-weights", "--json"])
    assert report["image_tokens"] == [256, 256] and report["decoder"]["layers"] == 28
    none, high = report["methods"]
    assert none["visual_tokens_per_layer"][0] == [256] * 28
    assert high["visual_tokens_per_layer"][0] == [256] * 7 + [224] * 2 + [160] * 3 + [32] * 16
    assert high["kv_tokens_per_layer"] == [320] * 7 + [288] * 2 + [224] * 3 + [96] * 16


def test_methods_run_interleaved_in_rotating_order_with_per_round_ratios(monkeypatch):
    """Every round runs each method once, the order rotating by one per round; the per-round ratios to none
    are computed within each round."""
    from transprune.bench import add_ratios, measure_methods, synthetic_inputs
    from transprune.bench import measure as measure_module
    from transprune.testing import tiny_llava

    model = tiny_llava(seed=0)
    inputs = synthetic_inputs(model, 1, text_tokens=8)
    order, original = [], measure_module._MethodRun.once

    def recording(run, timed, measure_memory=False):
        order.append((run.name, timed, measure_memory))
        return original(run, timed, measure_memory)

    monkeypatch.setattr(measure_module._MethodRun, "once", recording)
    cfg = TransPruneConfig(accumulation_layers=(2, 3), pruning_layers=(2, 3), keep_ratios=(0.5, 0.25))
    methods = [("none", None), ("tp", cfg), ("fastv", FastVConfig(k=2, r=0.5))]
    results = measure_methods(model, inputs, methods, repeats=3, warmup=1, new_tokens=2)
    assert [name for name, _, _ in order] == ["none", "tp", "fastv", "tp", "fastv", "none",
                                              "fastv", "none", "tp", "none", "tp", "fastv"]
    assert [t for _, t, _ in order] == [False] * 3 + [True] * 9
    assert [name for name, _, m in order if m] == ["tp", "fastv", "none"]  # memory in the first timed round
    add_ratios(results)
    none, tp, _ = results
    assert len(tp.rounds["prefill_s"]) == 3 and tp.prefill_s["n"] == 3
    per_round = [a / b for a, b in zip(tp.rounds["prefill_s"], none.rounds["prefill_s"])]
    assert tp.round_ratios["prefill_s"]["min"] == min(per_round) and tp.round_ratios["prefill_s"]["max"] == max(per_round)
    assert none.round_ratios["prefill_s"]["median"] == 1.0


def test_llava_onevision_reduced_bench_runs_on_cpu():
    """The reduced LLaVA-OneVision (Qwen2-7B's 28 layers at small widths, SigLIP-384/14 geometry) with 768 x 768
    synthetic images: a 2 x 2 grid packed by the model's own anyres-max code (729 + 54 x 55 tokens)."""
    report = _bench_json(["bench", "--arch", "llava-onevision-reduced", "--methods", "none,fastv", "--batch", "1",
                          "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--random-weights", "--json"])
    n = 729 + 54 * 55
    assert report["image_tokens"] == [n] and report["decoder"]["layers"] == 28
    assert report["methods"][1]["visual_tokens_per_layer"][0] == [n] * 2 + [round(n * 0.5)] * 26  # FastV keeps round(n * 0.5)


def test_smolvlm_reduced_bench_runs_on_cpu():
    """The reduced SmolVLM (the 256M's 30 layers, 9 / 3 heads at head_dim 64 over hidden 144; 512-px crops): the
    default 2048 x 2048 image is 4 x 4 crops + the global view, 64 tokens each (1088, the issue's count)."""
    report = _bench_json(["bench", "--arch", "smolvlm-reduced", "--methods", "none,transprune-high", "--batch", "1",
                          "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--random-weights", "--json"])
    assert report["image_tokens"] == [1088] and report["decoder"]["layers"] == 30
    assert report["methods"][1]["visual_tokens_per_layer"][0] == [1088] * 7 + [952] * 2 + [680] * 3 + [136] * 18


def test_internvl_reduced_bench_runs_on_cpu():
    """The reduced InternVL (Qwen2.5-7B's 28 layers at small widths, 448-px tiles): one tile, 256 tokens."""
    report = _bench_json(["bench", "--arch", "internvl-reduced", "--methods", "none,pdrop", "--batch", "2",
                          "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--random-weights", "--json"])
    assert report["image_tokens"] == [256, 256] and report["decoder"]["layers"] == 28
    assert report["methods"][1]["visual_tokens_per_layer"][0] == [256] * 8 + [128] * 8 + [64] * 8 + [32] * 4


def test_prefill_flops_are_the_decoders_matrix_products_counted_by_hand():
    """A text-only prefill of the tiny LLaVA: every layer's projections (q, k, v, o with GQA-sized k / v, the
    3 MLP matrices) and its attention (q k^T and weights x v over the whole L x L), plus the LM head on the last
    token (``logits_to_keep=1``): 2 FLOPs per multiply-accumulate."""
    import torch

    from transprune.bench.measure import prefill_flops
    from transprune.testing import tiny_model

    model = tiny_model("llava", seed=0)
    text = model.config.text_config
    length = 11
    ids = torch.randint(5, text.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    d, m, v = text.hidden_size, text.intermediate_size, text.vocab_size
    kv = text.num_key_value_heads * (d // text.num_attention_heads)
    per_layer = 2 * length * d * (2 * d + 2 * kv) + 2 * length * d * m * 3 + 4 * length * length * d
    want = text.num_hidden_layers * per_layer + 2 * d * v
    # plus whatever the rotary embedding itself multiplies (a small matmul in releases before 5.19, none after)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as rotary:
        model.model.language_model.rotary_emb(torch.zeros(1, length, d), torch.arange(length)[None])
    want += rotary.get_total_flops()
    assert prefill_flops(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None) == want


def test_report_carries_the_flops_ratio_next_to_the_time_ratio(report):
    none, high = report["methods"]
    assert none["ratios"]["flops"] == 1.0 and none["prefill_flops"] > high["prefill_flops"] > 0
    assert high["ratios"]["flops"] == pytest.approx(high["prefill_flops"] / none["prefill_flops"])
    assert high["ratios"]["prefill_per_flops"] == pytest.approx(high["ratios"]["prefill"] / high["ratios"]["flops"])


def test_the_efficiency_table_carries_each_reports_ratios(report, tmp_path, capsys):
    from transprune.bench.efficiency import main as efficiency

    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    assert efficiency([str(path), "--before", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    high = report["methods"][1]
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[:3] == ["llava-1.5-reduced", str(BATCH), "transprune-high"]
    assert cells[3] == f"{high['ratios']['flops']:.3f}" and cells[5] == f"{high['ratios']['prefill']:.3f}"
    assert cells[4].startswith(f"{high['ratios']['prefill']:.3f} [")
    assert cells[6] == f"{high['ratios']['prefill_per_flops']:.2f}"
