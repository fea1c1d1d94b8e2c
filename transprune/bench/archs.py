"""The models `transprune bench` builds with random weights: the named archs (configs written in code, no
download) and any supported config.json. No default init: every matrix is filled with seeded N(0, 1/fan_in)
noise (norms 1, biases 0), so attention is not degenerate; their cost does not depend on the weight values."""

from __future__ import annotations

import math

import torch

from ..flops import ArchSpec, arch_from_hf_config
from ..loading import model_class

ANYRES_GRID = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-NeXT-7B's pinpoints
IMAGE_TOKEN_ID, PAD_TOKEN_ID, VOCAB = 32000, 32001, 32064  # llava-hf's Vicuna-based checkpoints


def _clip_l336(**overrides):
    from transformers import CLIPVisionConfig

    fields = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return CLIPVisionConfig(**{**fields, **overrides})


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None = None, **overrides):
    from transformers import LlamaConfig

    fields = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads or heads, vocab_size=VOCAB,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False)
    return LlamaConfig(**{**fields, **overrides})


def _llava(vision, text, anyres: bool):
    from transformers import LlavaConfig, LlavaNextConfig

    common = dict(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, pad_token_id=PAD_TOKEN_ID,
                  projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                  image_seq_length=(vision.image_size // vision.patch_size) ** 2, tie_word_embeddings=False)
    if anyres:
        return LlavaNextConfig(**common, image_grid_pinpoints=[list(p) for p in ANYRES_GRID])
    return LlavaConfig(**common)


# Reduced: LLaVA's geometry (336 px / 14 px patches -> 576 image tokens per crop, 32 decoder layers, MHA,
# SwiGLU at ~2.7x) with a small hidden size and a 2-layer vision tower, so it runs on a CPU in seconds.
_REDUCED_TEXT = dict(hidden=128, intermediate=344, layers=32, heads=4)
_REDUCED_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       projection_dim=64)

# Qwen: the public config.json facts of Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct and
# Qwen/Qwen3-VL-8B-Instruct (transformers' defaults are other sizes), written in code; the vision towers'
# depth and widths matter only for the vision cost. Token ids are Qwen's (image 151655, video 151656).
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def _qwen_text(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, mrope, **overrides):
    fields = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=152064,
                  max_position_embeddings=128000, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(mrope)})
    return {**fields, **overrides}


def _qwen2_5_vl(text, **vision_overrides):
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  out_hidden_size=text["hidden_size"], tokens_per_second=2, hidden_act="silu")
    return Qwen2_5_VLConfig(vision_config={**vision, **vision_overrides}, text_config=text, tie_word_embeddings=False,
                            **QWEN_IDS)


def _qwen2_vl(text):
    from transformers import Qwen2VLConfig

    vision = dict(depth=32, embed_dim=1280, hidden_size=text["hidden_size"], mlp_ratio=4, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **QWEN_IDS)


def _qwen3_vl():
    from transformers import Qwen3VLConfig

    text = _qwen_text(4096, 12288, 36, 32, 8, (24, 20, 20), head_dim=128, vocab_size=151936,
                      rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                       "mrope_interleaved": True})
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=4096, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24])
    return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **QWEN_IDS)


# LLaVA-OneVision-7B (llava-hf/llava-onevision-qwen2-7b-ov-hf, public config.json facts, written in code): SigLIP
# so400m-384/14 (27 x 27 patches per crop, all kept: strategy "full", last layer), the Qwen2-7B decoder, anyres
# grids of 1 x 1 to 6 x 6 crops of 384 px, anyres_max_9 packing. Token ids are its Qwen2 vocabulary's.
ONEVISION_GRID = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def _siglip_384(**overrides):
    from transformers import SiglipVisionConfig

    # 26 layers: as llava-hf's OneVision config.json (as known; not read from a file here: no hub)
    fields = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                  image_size=384, patch_size=14, layer_norm_eps=1e-6)
    return SiglipVisionConfig(**{**fields, **overrides})


def _llava_onevision(vision, text):
    from transformers import LlavaOnevisionConfig, Qwen2Config

    return LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**text), image_token_index=151646,
                                video_token_index=151647, vision_feature_select_strategy="full",
                                vision_feature_layer=-1, image_grid_pinpoints=ONEVISION_GRID,
                                vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)


def _qwen2_text(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int):
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=152128,
                max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=151643,
                eos_token_id=151645, tie_word_embeddings=False)


# SmolVLM-256M-Instruct (public config.json facts, as known; written in code): SigLIP-B/16 at 512 px (12 layers,
# hidden 768), pixel shuffle x4 (64 tokens per crop), the 30-layer SmolLM2 decoder (d 576, 9 / 3 heads).
def _smolvlm(vision_overrides=None, **text_overrides):
    from transformers import LlamaConfig, SmolVLMConfig

    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=512, patch_size=16)
    text = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, head_dim=64, vocab_size=49280, max_position_embeddings=8192,
                rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                tie_word_embeddings=False)
    return SmolVLMConfig(vision_config={**vision, **(vision_overrides or {})},
                         text_config=LlamaConfig(**{**text, **text_overrides}).to_dict(), image_token_id=49190,
                         scale_factor=4, tie_word_embeddings=False)


# InternVL3-8B (OpenGVLab/InternVL3-8B-hf, public config.json facts as known; written in code): InternViT-300M at
# 448 px (24 layers, hidden 1024, 14-px patches, CLS dropped), pixel shuffle 0.5 (256 tokens per tile), the
# Qwen2.5-7B decoder.
def _internvl(vision_overrides=None, text=None):
    from transformers import InternVLConfig, Qwen2Config

    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=[448, 448], patch_size=[14, 14], layer_norm_eps=1e-6)
    return InternVLConfig(vision_config={**vision, **(vision_overrides or {})},
                          text_config=Qwen2Config(**(text or _qwen2_text(3584, 18944, 28, 28, 4))).to_dict(),
                          image_token_id=151667, downsample_ratio=0.5, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", tie_word_embeddings=False)


# Gemma 3 4B (google/gemma-3-4b-it, public config.json facts as known; written in code): SigLIP so400m at 896 px
# (27 layers, hidden 1152, 14-px patches: 64 x 64, average-pooled 4 x 4 to 256 tokens), the Gemma 3 decoder
# (34 layers, 5 sliding layers of window 1024 per global one, RoPE bases 10k local / 1M global scaled 8x).
GEMMA3_IDS = dict(boi_token_index=255999, eoi_token_index=256000, image_token_index=262144)


def _gemma3(vision_overrides=None, **text_overrides):
    from transformers import Gemma3Config

    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=896, patch_size=14, layer_norm_eps=1e-6, vision_use_head=False)
    text = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                sliding_window_pattern=6, vocab_size=262208, max_position_embeddings=131072, rms_norm_eps=1e-6,
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    return Gemma3Config(vision_config={"model_type": "siglip_vision_model", **vision, **(vision_overrides or {})},
                        text_config={**text, **text_overrides}, mm_tokens_per_image=256, tie_word_embeddings=False,
                        **GEMMA3_IDS)


# Reduced Qwen2.5-VL: the 7B's geometry (28 decoder layers, GQA 7:1, m/d ~ 5.3, 14-pixel patches merged 2 x 2:
# 256 visual tokens for the default 448 x 448 image, window attention with full layers) at hidden 112 and a
# 2-block vision tower, so it runs on a CPU in seconds.
_QWEN_REDUCED_TEXT = (112, 592, 28, 7, 1, (2, 3, 3))
_QWEN_REDUCED_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, fullatt_block_indexes=[1])

CONFIGS = {
    "llava-1.5-7b": lambda: _llava(_clip_l336(), _llama(4096, 11008, 32, 32), anyres=False),
    "llava-1.5-13b": lambda: _llava(_clip_l336(), _llama(5120, 13824, 40, 40), anyres=False),
    "llava-next-7b": lambda: _llava(_clip_l336(), _llama(4096, 11008, 32, 32), anyres=True),
    "llava-1.5-reduced": lambda: _llava(_clip_l336(**_REDUCED_VISION), _llama(**_REDUCED_TEXT), anyres=False),
    "llava-next-reduced": lambda: _llava(_clip_l336(**_REDUCED_VISION), _llama(**_REDUCED_TEXT), anyres=True),
    "llava-onevision-7b": lambda: _llava_onevision(_siglip_384(), _qwen2_text(3584, 18944, 28, 28, 4)),
    "llava-onevision-reduced": lambda: _llava_onevision(
        _siglip_384(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        _qwen2_text(112, 592, 28, 7, 1)),
    "smolvlm-256m": _smolvlm,
    "smolvlm-reduced": lambda: _smolvlm(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4), hidden_size=144, intermediate_size=384),
    "internvl3-8b": _internvl,
    "internvl-reduced": lambda: _internvl(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4), _qwen2_text(112, 592, 28, 7, 1)),
    "gemma3-4b": _gemma3,
    "gemma3-reduced": lambda: _gemma3(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4), hidden_size=128, intermediate_size=512,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                      query_pre_attn_scalar=64),
    "qwen2-vl-7b": lambda: _qwen2_vl(_qwen_text(3584, 18944, 28, 28, 4, (16, 24, 24))),
    "qwen2.5-vl-7b": lambda: _qwen2_5_vl(_qwen_text(3584, 18944, 28, 28, 4, (16, 24, 24))),
    "qwen3-vl-8b": _qwen3_vl,
    "qwen2.5-vl-reduced": lambda: _qwen2_5_vl(_qwen_text(*_QWEN_REDUCED_TEXT), **_QWEN_REDUCED_VISION),
}
REDUCED = ("llava-1.5-reduced", "llava-next-reduced", "llava-onevision-reduced", "smolvlm-reduced", "internvl-reduced",
           "gemma3-reduced", "qwen2.5-vl-reduced")


def arch_config(name: str):
    """The Hugging Face config (Llava, LlavaNext, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) of a named bench arch, built in code."""
    if name not in CONFIGS:
        raise ValueError(f"unknown arch {name!r}; choose one of {', '.join(CONFIGS)} or a checkpoint folder")
    return CONFIGS[name]()


def arch_spec(name: str) -> ArchSpec:
    """The ArchSpec (FLOPs dimensions, nominal image tokens) of a named bench arch."""
    return arch_from_hf_config(arch_config(name), name)


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Seeded weights: norms 1, biases 0, other vectors N(0, 0.02), matrices N(0, 1/fan_in) (unit-scale
    activations, so attention logits are O(1): neither uniform nor one-hot)."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1 and "norm" in name:
            param.fill_(1.0)
        else:
            gen = generators.get(param.device)
            if gen is None:
                gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            std = 0.02 if param.dim() == 1 else 1.0 / math.sqrt(param[0].numel())
            param.normal_(0.0, std, generator=gen)


def build_random_model(config, dtype: torch.dtype, device, attn_implementation: str = "sdpa", seed: int = 0):
    """A random-weight model of a supported Hugging Face config (e.g. ``arch_config(name)``), created directly
    on ``device`` in ``dtype`` (no meta device, no default init, no download), in eval mode."""
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device):
        model = model_class(config)._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    fill_random(model, seed)
    return model.eval()
