"""Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`): Qwen3-VL with mixture-of-experts MLPs.

Everything but the MLP is Qwen3-VL's (`Qwen3VLAdapter`, subclassed): placeholders, mRoPE positions that kept
tokens keep, q/k norms in the scoring q and k, DeepStack injection, the vision tower and its VisionZip hooks.

The MLP of a layer is a sparse block (`decoder_sparse_step`, `mlp_only_layers` say which layers): a router picks
``num_experts_per_tok`` of ``num_experts`` experts for each token on its own and mixes their outputs, with no
capacity limit, so dropping tokens changes neither the experts a kept token is routed to nor their weights, and
the layer body runs as it is (the `llama` body: TTV reads the MLP's input and output, whatever computes it).
Pruning saves expert compute per dropped token: the FLOPs tool counts a MoE layer's FFN at its active width,
``num_experts_per_tok x moe_intermediate_size`` per token (`ArchSpec.of_decoder`), labelled in its report.
"""

from __future__ import annotations

# What the registry reads without importing this module (`adapters.discover`): the adapter class, its model
# types, the transformers release that first has their classes, and its place in the registry's order.
FAMILY = {"adapter": "Qwen3VLMoeAdapter", "model_types": ('qwen3_vl_moe',), "since": "5.16.1", "order": 71}

from transformers import Qwen3VLMoeForConditionalGeneration

from .qwen2_vl import QWEN_IDS, _qwen_text
from .qwen3_vl import Qwen3VLAdapter, qwen3_vision


# -- named archs: public config.json facts, written in code (no download), for flops and bench -------------

def _qwen3_vl_30b_a3b():
    """Qwen/Qwen3-VL-30B-A3B-Instruct: 48 layers of width 2048, 32 query / 4 KV heads of 128, every MLP a sparse
    block of 128 experts (768 wide) with 8 per token; the 27-block SigLIP-2 tower of Qwen3-VL, out width 2048."""
    from transformers import Qwen3VLMoeConfig

    text = _qwen_text(2048, 6144, 48, 32, 4, (24, 20, 20), head_dim=128, vocab_size=151936,
                      moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                      mlp_only_layers=[],
                      rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                       "mrope_interleaved": True})
    return Qwen3VLMoeConfig(vision_config=qwen3_vision(out_hidden_size=2048), text_config=text,
                            tie_word_embeddings=False, **QWEN_IDS)


def _qwen3_vl_moe_reduced():
    """The 30B-A3B's geometry at CPU size: 12 layers of width 128 (GQA 2:1, head_dim 32), every MLP 16 experts of 64
    with 4 per token (the same active share of experts, 1/4 against 1/16, is not kept: a CPU runs only this
    many), a 2-block tower of width 64."""
    from transformers import Qwen3VLMoeConfig

    text = _qwen_text(128, 256, 12, 4, 2, (8, 4, 4), head_dim=32, moe_intermediate_size=64, num_experts=16,
                      num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
                      rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [8, 4, 4],
                                       "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=2304, deepstack_visual_indexes=[0, 1])
    return Qwen3VLMoeConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **QWEN_IDS)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3-vl-moe"
    model_classes = (Qwen3VLMoeForConditionalGeneration,)
    model_types = ("qwen3_vl_moe",)
    archs = {"qwen3-vl-30b-a3b": _qwen3_vl_30b_a3b}
    reduced_archs = {"qwen3-vl-moe-reduced": _qwen3_vl_moe_reduced}
    processor_classes = {"qwen3_vl_moe": "Qwen3VLProcessor"}
