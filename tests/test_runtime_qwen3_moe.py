"""Qwen3-VL-MoE (tiny, random init, fp32, CPU): Qwen3-VL with sparse MLPs on layers 1, 3, 5, 7 (4 experts of
width 32, 2 per token; dense layers 128 wide). The grid (tests/test_grid.py) runs every method on it; here: the
pruned forward against transformers' own layers run by hand on the kept tokens (the router then sees only them),
and the FLOPs tool's active FFN width against the model's own modules."""

import pytest
import torch

import transprune
from transprune import FastVConfig
from transprune.accounting import active_ffn_width, paper_layer_macs
from transprune.adapters import adapter_for
from transprune.flops import ARCHS, arch_from_hf_config, estimate
from transprune.testing import qwen_sample_inputs_unbatched, tiny_qwen3_vl_config, tiny_qwen_processor
from transprune.testing.qwen import tiny_qwen3_vl_moe

from test_runtime_qwen import SIZES, logits  # noqa: E402
from test_runtime_qwen3 import reference_last_logits  # noqa: E402


@pytest.fixture(scope="module")
def moe():
    return tiny_qwen3_vl_moe(seed=0), tiny_qwen_processor("qwen3_vl_moe")


def test_the_family_is_qwen3_vl_with_sparse_mlps(moe):
    model, _ = moe
    assert adapter_for(model).family == "qwen3-vl-moe"
    kinds = [type(layer.mlp).__name__ for layer in model.model.language_model.layers]
    assert kinds == ["Qwen3VLMoeTextMLP", "Qwen3VLMoeTextSparseMoeBlock"] * 4


@pytest.mark.parametrize("k", [1, 2])
def test_fastv_before_a_sparse_layer_matches_the_layers_run_by_hand(moe, k):
    """FastV after layer k (1: the next layer is sparse; 2: dense, then sparse): the same kept tokens as the eager
    model's own attention weights rank, and the logits of transformers' layers run by hand on the gathered kept
    sequence (each kept token routed on its own hidden state)."""
    model, processor = moe
    inputs = qwen_sample_inputs_unbatched(processor, 2, seed=5, sizes=SIZES[1:])[1]
    config = FastVConfig(k=k, r=0.75)
    with transprune.pruned(model, config) as handle:
        got = logits(model, inputs)[:, -1]
    kept = handle.last_stats[0].kept_indices[0]
    eager = tiny_qwen3_vl_moe(seed=0, attn_implementation="eager")
    with torch.no_grad():  # reference only: the library never asks for attention weights
        attn = eager(**inputs, output_attentions=True).attentions[k - 1][0]
    image = (inputs["mm_token_type_ids"][0] > 0).nonzero().squeeze(1)
    assert kept == sorted(torch.topk(attn[:, -1].mean(0)[image], int(len(image) * (1 - config.r))).indices.tolist())
    expected = reference_last_logits(model, inputs, k, kept)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    unpruned = logits(model, inputs)[:, -1]
    assert not torch.allclose(unpruned, expected, atol=1e-3)  # the reference tells pruned from unpruned


def test_flops_count_the_active_ffn_width_of_each_layer(moe):
    """The FFN width a token computes per layer, read from the model's own modules (experts' weights x the
    router's top-k on sparse layers, the dense MLP's width elsewhere), averaged: what the FLOPs tool counts."""
    model, _ = moe
    widths = []
    for layer in model.model.language_model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            widths.append(mlp.gate.top_k * mlp.experts.down_proj.shape[-1])
        else:
            widths.append(mlp.down_proj.in_features)
    assert widths == [128, 64] * 4
    text = model.config.text_config
    assert active_ffn_width(text) == (96, "mixture of experts: 2 of 4 experts x 32 active per token on 4 of 8 "
                                          "layers (router not counted)")
    arch = arch_from_hf_config(model.config, "tiny-moe")
    assert arch.intermediate_size == sum(widths) / len(widths) and arch.ffn.startswith("mixture of experts")
    report = estimate(FastVConfig(k=2, r=0.5), arch, text_tokens=10)
    d, n = text.hidden_size, arch.image_tokens
    assert report.tflops_unpruned == pytest.approx(sum(paper_layer_macs(n, d, w) for w in widths) / 1e12)
    assert report.tflops == pytest.approx(sum(paper_layer_macs(n if i < 2 else n // 2, d, w)
                                              for i, w in enumerate(widths)) / 1e12)
    assert report.ffn == arch.ffn
    dense = arch_from_hf_config(tiny_qwen3_vl_config(), "tiny-dense")
    assert dense.ffn is None and dense.intermediate_size == text.intermediate_size == 128


def test_the_named_moe_arch_counts_8_of_128_experts():
    arch = ARCHS["qwen3-vl-30b-a3b"]
    assert (arch.hidden_size, arch.intermediate_size, arch.num_layers) == (2048, 8 * 768, 48)
    assert arch.ffn == "mixture of experts: 8 of 128 experts x 768 active per token on 48 of 48 layers (router not counted)"
