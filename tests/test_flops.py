import dataclasses
import json

import pytest
import transformers

from transprune.cli import main
from transprune.config import TransPruneConfig
from transprune.methods import FastVConfig
from transprune.flops import ARCHS, ArchSpec, arch_from_config, compress_runs, estimate, paper_tflops, resolve_arch

D, M = 4096, 11008  # LLaVA-1.5-7B / NeXT-7B decoder


def by_hand(counts, d=D, m=M):
    """Paper Eq. 7, first term, summed over an explicit per-layer list (independent of flops.py)."""
    return sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in counts) / 1e12


@pytest.mark.parametrize("arch, preset, paper", [
    ("llava-1.5-7b", "high", 1.56), ("llava-1.5-7b", "low", 1.19), ("llava-1.5-7b", "off", 3.82),
    ("llava-next-7b", "high", 8.33), ("llava-next-7b", "low", 6.41), ("llava-next-7b", "off", 20.83),
])
def test_paper_tables(arch, preset, paper):
    report = estimate(TransPruneConfig.preset(preset), arch)
    assert round(report.tflops, 2) == paper
    assert report.ratio == pytest.approx(report.tflops / report.tflops_unpruned)
    assert round(report.tflops_unpruned, 2) == {"llava-1.5-7b": 3.82, "llava-next-7b": 20.83}[arch]


def test_matches_hand_sum_over_explicit_token_lists():
    high = estimate(TransPruneConfig.preset("high"), "llava-1.5-7b")
    counts = [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20
    assert list(high.visual_tokens_per_layer) == counts
    assert high.tflops == pytest.approx(by_hand(counts), rel=1e-12)
    assert compress_runs(counts) == "7x576, 2x504, 3x360, 20x72"
    low = estimate(TransPruneConfig.preset("low"), "llava-next-7b")
    assert low.tflops == pytest.approx(by_hand([2880] * 7 + [1800] * 2 + [540] * 3 + [180] * 20), rel=1e-12)
    assert paper_tflops(ARCHS["llava-1.5-7b"], [576] * 32) == pytest.approx(by_hand([576] * 32))
    with pytest.raises(ValueError, match="32 layers"):
        paper_tflops(ARCHS["llava-1.5-7b"], [576] * 31)


@pytest.mark.parametrize("layers, paper", [
    ((5, 7, 10), 1.35), ((6, 8, 11), 1.45), ((7, 9, 12), 1.56), ((8, 10, 13), 1.66), ((9, 11, 14), 1.77),
])
def test_table9_layer_ablation(layers, paper):
    cfg = TransPruneConfig(accumulation_layers=tuple(range(layers[0], layers[-1] + 1)), pruning_layers=layers,
                           keep_ratios=(0.875, 0.625, 0.125))
    assert round(estimate(cfg, "llava-1.5-7b").tflops, 2) == paper


def test_full_prefill_includes_text_and_scoring():
    T, kv = 64, 32 * 128

    def layer(n):
        return 2 * n * D * D + 2 * n * D * kv + 2 * n * n * D + 3 * n * D * M

    off = estimate(TransPruneConfig.preset("off"), "llava-1.5-7b", text_tokens=T)
    assert off.tflops_scoring == 0
    assert off.tflops_full == off.tflops_full_unpruned == pytest.approx(32 * layer(576 + T) / 1e12, rel=1e-12)

    high = estimate(TransPruneConfig.preset("high"), "llava-1.5-7b", text_tokens=T)
    counts = [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20
    seq = [c + T for c in counts]
    ttv = sum(8 * seq[l - 1] * D for l in range(7, 13))  # 2 module pairs x 4nd, layers 7..12
    iga = sum(seq[p - 1] * D + seq[p - 1] * D * kv + T * D * D + T * seq[p - 1] * D for p in (7, 9, 12))
    assert high.tflops_scoring == pytest.approx((ttv + iga) / 1e12, rel=1e-12)
    assert high.tflops_full == pytest.approx((sum(map(layer, seq)) + ttv + iga) / 1e12, rel=1e-12)
    assert high.tflops_full > high.tflops and high.tflops_full_unpruned > high.tflops_unpruned
    assert high.tflops_full_unpruned == off.tflops_full_unpruned
    # Fewer IGA query rows cost less; the paper number does not depend on text at all.
    fewer = estimate(TransPruneConfig.preset("high"), "llava-1.5-7b", text_tokens=T, query_tokens=8)
    assert fewer.tflops_scoring < high.tflops_scoring and fewer.tflops == high.tflops
    with pytest.raises(ValueError, match="query_tokens"):
        estimate(TransPruneConfig.preset("high"), "llava-1.5-7b", text_tokens=4, query_tokens=5)


def tiny_vision(**kw):
    return dict(model_type="clip_vision_model", image_size=64, patch_size=8, hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, **kw)


TINY_TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2)


def test_arch_from_llava_config(tmp_path):
    transformers.LlavaConfig(vision_config=tiny_vision(), text_config=TINY_TEXT).save_pretrained(tmp_path)
    expected = ArchSpec(tmp_path.name, 64, 128, 4, 4, 2, 16, 64, model_type="llava")
    assert arch_from_config(tmp_path) == expected
    assert arch_from_config(tmp_path / "config.json") == expected
    assert resolve_arch(str(tmp_path / "config.json")) == expected

    full = tmp_path / "full"
    transformers.LlavaConfig(vision_config=tiny_vision(), text_config=TINY_TEXT,
                             vision_feature_select_strategy="full").save_pretrained(full)
    assert arch_from_config(full).image_tokens == 65  # CLS kept

    default = tmp_path / "default"
    transformers.LlavaConfig().save_pretrained(default)  # defaults = LLaVA-1.5-7B shapes
    assert arch_from_config(default) == dataclasses.replace(ARCHS["llava-1.5-7b"], name="default")


def test_arch_from_llava_next_config(tmp_path):
    transformers.LlavaNextConfig(vision_config=tiny_vision(), text_config=TINY_TEXT).save_pretrained(tmp_path / "t")
    assert arch_from_config(tmp_path / "t").image_tokens == 5 * 64  # base + 2x2 grid, newlines not counted
    transformers.LlavaNextConfig().save_pretrained(tmp_path / "next")
    assert arch_from_config(tmp_path / "next") == dataclasses.replace(ARCHS["llava-next-7b"], name="next")


def test_unsupported_and_unknown_arch(tmp_path):
    transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="llava, llava_next"):
        arch_from_config(tmp_path)
    with pytest.raises(ValueError, match="llava-1.5-7b, llava-1.5-13b, llava-next-7b"):
        resolve_arch("llava-2-70b")


def test_cli_json(capsys):
    assert main(["flops", "--arch", "llava-1.5-7b", "--preset", "high", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert round(out["tflops"], 3) == 1.557 and round(out["tflops_unpruned"], 3) == 3.817
    assert out["tflops_full"] > out["tflops"] and out["text_tokens"] == 64
    assert out["pruning_layers"] == [7, 9, 12] and out["arch"] == "llava-1.5-7b"
    main(["flops", "--arch", "llava-next-7b", "--preset", "low", "--json", "--text-tokens", "0"])
    out = json.loads(capsys.readouterr().out)
    assert round(out["tflops"], 2) == 6.41 and out["text_tokens"] == 0


def test_cli_table_and_config_path(capsys, tmp_path):
    assert main(["flops", "--arch", "llava-1.5-7b", "--preset", "high"]) == 0
    out = capsys.readouterr().out
    assert "7x576, 2x504, 3x360, 20x72" in out and "1.557 (40.8%" in out
    assert "full prefill (text + scoring included)" in out
    transformers.LlavaConfig().save_pretrained(tmp_path)
    main(["flops", "--arch", str(tmp_path / "config.json"), "--preset", "off", "--json"])
    assert round(json.loads(capsys.readouterr().out)["tflops"], 2) == 3.82


@pytest.mark.parametrize("argv, names", [
    (["--arch", "nope", "--preset", "high"], "llava-1.5-7b, llava-1.5-13b, llava-next-7b"),
    (["--arch", "llava-1.5-7b", "--preset", "medium"], "'high', 'low', 'off'"),
])
def test_cli_bad_arguments_exit_2(capsys, argv, names):
    with pytest.raises(SystemExit) as exc:
        main(["flops", *argv])
    assert exc.value.code == 2
    assert names in capsys.readouterr().err


# -- Qwen: the paper's Table 3 ratios follow a token-linear cost (../shared/method.md 6.1) ---------------------
@pytest.mark.parametrize("config, paper", [(TransPruneConfig.preset("high"), 45.1), ("fastv", 53.6)])
def test_qwen2_5_vl_7b_paper_ratios_are_token_linear(config, paper):
    from transprune import FastVConfig

    config = FastVConfig() if config == "fastv" else config
    report = estimate(config, "qwen2.5-vl-7b")
    assert report.depth == 28 and report.image_tokens == 256
    if paper == 45.1:  # the preset as written: layers 7, 9, 12 of 28 (no mapping)
        assert report.pruning_layers == (7, 9, 12)
        assert list(report.visual_tokens_per_layer) == [256] * 7 + [224] * 2 + [160] * 3 + [32] * 16
        assert report.ratio_token_linear == pytest.approx((7 + 2 * .875 + 3 * .625 + 16 * .125) / 28)
    else:
        assert report.ratio_token_linear == pytest.approx((2 + 26 * 0.5) / 28)
    assert round(100 * report.ratio_token_linear, 1) == paper
    # The per-layer formula (quadratic in n) lands 0.1-0.2 points lower: the paper did not use it for Qwen.
    assert round(100 * report.ratio, 1) == {45.1: 45.0, 53.6: 53.4}[paper]


def test_qwen_archs():
    facts = {name: (a.hidden_size, a.intermediate_size, a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim)
             for name, a in ARCHS.items() if name.startswith("qwen")}
    assert facts == {"qwen2-vl-7b": (3584, 18944, 28, 28, 4, 128), "qwen2.5-vl-7b": (3584, 18944, 28, 28, 4, 128),
                     "qwen3-vl-8b": (4096, 12288, 36, 32, 8, 128),
                     "qwen3-vl-30b-a3b": (2048, 6144, 48, 32, 4, 128)}  # m: 8 active experts x 768
    high = estimate(TransPruneConfig.preset("high"), "qwen3-vl-8b")
    assert high.pruning_layers == (7, 9, 12) and high.ratio_token_linear == pytest.approx((7 + 1.75 + 1.875 + 24 * .125) / 36)


def test_cli_prints_the_token_linear_ratio(capsys):
    assert main(["flops", "--arch", "qwen2.5-vl-7b", "--preset", "high"]) == 0
    out = capsys.readouterr().out
    assert "45.1% (visual tokens summed over the layers" in out and "45.0% of" in out


def test_kv_cache_bytes_of_a_prefill_and_the_serving_table():
    from transprune.bench.serving import table

    report = estimate(TransPruneConfig.preset("high"), "llava-1.5-7b", text_tokens=64)
    assert report.kv_cache_bytes_unpruned == 32 * (576 + 64) * 2 * 4096 * 2  # layers x tokens x (k, v) x d x bf16
    kept = [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20
    assert report.kv_cache_bytes == sum((n + 64) * 2 * 4096 * 2 for n in kept)
    qwen = estimate(FastVConfig(), "qwen2.5-vl-7b", text_tokens=64)  # GQA: 4 KV heads x 128
    assert qwen.kv_cache_bytes == sum((n + 64) * 2 * 512 * 2 for n in [256] * 2 + [128] * 26)
    text = table(["llava-1.5-7b"], [1, 32])
    assert "| llava-1.5-7b | none | 3.817 (1.00) |" in text and "| 10,240 |" in text
