"""Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from .common import (BOS_ID, EOS_ID, INIT_STD, PAD_ID, PUNCTUATION, SPECIAL_TOKENS, WORDS, LETTERS, DIGITS, _reinit,
                     narrowed_folder, sample_images, sample_prompts, word_level_tokenizer)

QWEN_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")

# ---------------------------------------------------------------------------------------------- Qwen2-VL / 2.5-VL
#
# Tiny Qwen2-VL / Qwen2.5-VL models, tokenizer and processor, built like the LLaVA ones (offline, seeded re-init).
# Vision: 2 blocks, hidden 32, patch 8, 2x2 merge (one visual token per 16x16 pixels; Qwen2.5-VL: window
# attention in block 0, full attention in block 1). Decoder: hidden 64, 4 query / 2 KV heads (GQA), head_dim
# 16, mRoPE sections (2, 3, 3), 8 layers unless ``num_hidden_layers`` says otherwise. A 64x64 image is 16
# visual tokens, 128x96 (w x h) 48, 128x128 64. No video processor (Qwen's needs torchvision): build video
# inputs by hand (`pixel_values_videos`, `video_grid_thw`, token type 2).

QWEN_SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_PATCH_SIZE = 8
QWEN_MERGE_SIZE = 2
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _qwen_vocab() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + QWEN_SPECIAL_TOKENS + PUNCTUATION + WORDS + LETTERS + DIGITS:
        vocab.setdefault(token, len(vocab))
    return vocab


def _qwen_ids() -> dict[str, int]:
    vocab = _qwen_vocab()
    return {t: vocab[t] for t in QWEN_SPECIAL_TOKENS}


def tiny_qwen_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """`tiny_tokenizer`'s words plus Qwen's vision tokens (ids 5-8: ``<|vision_start|>``, ``<|vision_end|>``,
    ``<|image_pad|>``, ``<|video_pad|>``), which the processor expands and never splits."""
    tokenizer = word_level_tokenizer(_qwen_vocab(), padding_side)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"] + QWEN_SPECIAL_TOKENS})
    assert len(tokenizer) == len(_qwen_vocab())
    return tokenizer


def _qwen_text(**overrides) -> dict:
    fields = dict(vocab_size=len(_qwen_vocab()), hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, initializer_range=INIT_STD,
                  tie_word_embeddings=False)
    fields.update(overrides)
    return fields


def _qwen_common(**text_overrides) -> dict:
    ids = _qwen_ids()
    return dict(text_config=_qwen_text(**text_overrides), image_token_id=ids["<|image_pad|>"],
                video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def tiny_qwen2_5_vl_config(vision_overrides: dict | None = None, **text_overrides):
    """Qwen2.5-VL-shaped config (window attention in vision block 0). ``text_overrides`` go to the text config,
    ``vision_overrides`` to the vision config (``out_hidden_size`` must follow a wider decoder)."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=QWEN_PATCH_SIZE,
                  spatial_merge_size=QWEN_MERGE_SIZE, temporal_patch_size=2, window_size=32,
                  fullatt_block_indexes=[1], out_hidden_size=64, tokens_per_second=2, initializer_range=INIT_STD)
    return Qwen2_5_VLConfig(vision_config={**vision, **(vision_overrides or {})}, **_qwen_common(**text_overrides))


def tiny_qwen2_vl_config(**text_overrides):
    """Qwen2-VL-shaped config. ``text_overrides`` go to the text config."""
    from transformers import Qwen2VLConfig

    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=QWEN_PATCH_SIZE,
                  spatial_merge_size=QWEN_MERGE_SIZE, temporal_patch_size=2, initializer_range=INIT_STD)
    return Qwen2VLConfig(vision_config=vision, **_qwen_common(**text_overrides))


# Qwen3-VL: the same tokenizer, patch (8) and merge (2): one visual token per 16x16 pixels. Vision: 3 blocks
# (hidden 32), a learned 8x8 position grid, DeepStack features taken after every block (indexes 0, 1, 2) and
# added after decoder layers 0, 1, 2, as the real model adds its three. Decoder: Qwen3's layer (q/k norms
# per head), hidden 64, 4 query / 2 KV heads, head_dim 16, interleaved mRoPE sections (4, 2, 2).
QWEN3_DEEPSTACK_LAYERS = 3


def tiny_qwen3_vl_config(vision_overrides: dict | None = None, **text_overrides):
    """Qwen3-VL-shaped config (DeepStack into decoder layers 0-2). ``text_overrides`` go to the text config,
    ``vision_overrides`` to the vision config."""
    from transformers import Qwen3VLConfig

    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=QWEN_PATCH_SIZE,
                  spatial_merge_size=QWEN_MERGE_SIZE, temporal_patch_size=2, out_hidden_size=64,
                  num_position_embeddings=64, deepstack_visual_indexes=list(range(QWEN3_DEEPSTACK_LAYERS)),
                  initializer_range=INIT_STD)
    text = dict(head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2],
                                              "mrope_interleaved": True, "rope_theta": 10000.0})
    return Qwen3VLConfig(vision_config={**vision, **(vision_overrides or {})}, **_qwen_common(**{**text, **text_overrides}))


def tiny_qwen3_vl_moe_config(vision_overrides: dict | None = None, **text_overrides):
    """Qwen3-VL-MoE-shaped config: the tiny Qwen3-VL with sparse MLPs on every second layer (``decoder_sparse_step``
    2; layer 0 dense by ``mlp_only_layers`` too): 4 experts of width 32, 2 per token; dense layers 128 wide."""
    from transformers import Qwen3VLMoeConfig

    base = tiny_qwen3_vl_config(vision_overrides, **text_overrides)
    text = {**base.text_config.to_dict(), "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "decoder_sparse_step": 2, "mlp_only_layers": [0], **text_overrides}
    for key in ("model_type", "architectures", "transformers_version"):
        text.pop(key, None)
    ids = {k: getattr(base, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                         "vision_end_token_id")}
    vision = {k: v for k, v in base.vision_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    return Qwen3VLMoeConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)


@torch.no_grad()
def _qwen_build(config, model_cls, seed: int, attn_implementation: str, dtype: torch.dtype):
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    _reinit(model, seed)
    for name, param in model.named_parameters():  # the vision merger's LayerNorm (ln_q) is a norm too
        if param.dim() == 1 and ".ln_" in name and not name.endswith("bias"):
            param.fill_(1.0)
    model.lm_head.weight[:len(SPECIAL_TOKENS) + len(QWEN_SPECIAL_TOKENS)] = 0.0  # never generated
    return model.to(dtype).eval()


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                    vision_overrides: dict | None = None, **text_overrides):
    """Random-init ``Qwen2_5_VLForConditionalGeneration`` in eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return _qwen_build(tiny_qwen2_5_vl_config(vision_overrides, **text_overrides), Qwen2_5_VLForConditionalGeneration, seed,
                       attn_implementation, dtype)


def tiny_qwen2_vl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                  **text_overrides):
    """Random-init ``Qwen2VLForConditionalGeneration`` in eval mode."""
    from transformers import Qwen2VLForConditionalGeneration

    return _qwen_build(tiny_qwen2_vl_config(**text_overrides), Qwen2VLForConditionalGeneration, seed,
                       attn_implementation, dtype)


def tiny_qwen3_vl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                  vision_overrides: dict | None = None, **text_overrides):
    """Random-init ``Qwen3VLForConditionalGeneration`` in eval mode."""
    from transformers import Qwen3VLForConditionalGeneration

    return _qwen_build(tiny_qwen3_vl_config(vision_overrides, **text_overrides), Qwen3VLForConditionalGeneration, seed,
                       attn_implementation, dtype)


def tiny_qwen3_vl_moe(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                      vision_overrides: dict | None = None, **text_overrides):
    """Random-init ``Qwen3VLMoeForConditionalGeneration`` in eval mode."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    return _qwen_build(tiny_qwen3_vl_moe_config(vision_overrides, **text_overrides), Qwen3VLMoeForConditionalGeneration,
                       seed, attn_implementation, dtype)


def tiny_qwen_processor(kind: str = "qwen2_5_vl"):
    """Processor for the tiny Qwen models (PIL image processor; images resized to multiples of 16 pixels,
    between 32x32 and 128x128 worth of pixels). ``kind``: "qwen2_5_vl", "qwen2_vl" or "qwen3_vl"."""
    from transformers import Qwen2VLImageProcessorPil

    import transformers

    from ..adapters import family_for
    from ..adapters.base import image_only_processor

    if kind not in QWEN_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, QWEN_KINDS))}, not {kind!r}")
    image_processor = Qwen2VLImageProcessorPil(patch_size=QWEN_PATCH_SIZE, temporal_patch_size=2,
                                               merge_size=QWEN_MERGE_SIZE, min_pixels=32 * 32,
                                               max_pixels=128 * 128)
    # Images only: Qwen's video processor needs torchvision, so the processor is built without one.
    base = getattr(transformers, family_for(kind).processor_classes[kind])
    return image_only_processor(base, image_processor, tiny_qwen_tokenizer(), chat_template=QWEN_CHAT_TEMPLATE)


def qwen_sample_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts with one image each (Qwen's placeholder); prompt ``i`` has ``3 + 2 * i`` question words."""
    return [p.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>") for p in sample_prompts(n, seed)]


def qwen_sample_inputs(processor, n: int = 3, seed: int = 0, sizes: list[tuple[int, int]] | None = None):
    """Left-padded batch of ``n`` prompts of different lengths, each with its own image (``sizes``: (width,
    height) per image, default 64x64): ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``
    and ``mm_token_type_ids``."""
    processor.tokenizer.padding_side = "left"
    return processor(images=sample_images(n, seed, sizes), text=qwen_sample_prompts(n, seed), padding=True,
                     return_tensors="pt")


def qwen_sample_inputs_unbatched(processor, n: int = 3, seed: int = 0, sizes: list[tuple[int, int]] | None = None):
    """The same prompts and images as ``qwen_sample_inputs``, one unpadded batch of one each."""
    images, prompts = sample_images(n, seed, sizes), qwen_sample_prompts(n, seed)
    return [processor(images=[image], text=[prompt], return_tensors="pt") for image, prompt in zip(images, prompts)]




def narrowed_qwen_folder(real, folder, layers: int = 4, hidden: int = 128, vision_depth: int | None = None):
    """A random-weight copy of a real Qwen2.5-VL or Qwen3-VL folder (``real``: its config, processor and tokenizer
    files, no weights) in ``folder``: the decoder narrowed to ``layers`` layers of width ``hidden`` (4 query / 2 KV
    heads, head_dim ``hidden / 4``, mRoPE sections scaled to it), the tower to ``vision_depth`` blocks (default: 2
    on Qwen2.5-VL, the last one full attention; 3 on Qwen3-VL, each a DeepStack level, at width 128), so real
    processors and token counts run on a CPU. Returns ``folder``."""
    head_dim = hidden // 4
    narrow = dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                  num_key_value_heads=2)

    def narrowed(config):
        kind = config["model_type"]
        if kind == "qwen2_5_vl":  # mRoPE sections 16:24:24 of head_dim 128, scaled
            depth = vision_depth or 2
            config.update(narrow)
            config["rope_scaling"]["mrope_section"] = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
            config["vision_config"].update(depth=depth, fullatt_block_indexes=[depth - 1], out_hidden_size=hidden)
        elif kind == "qwen3_vl":  # 24:20:20 of 128, rounded
            depth = vision_depth or 3
            config["text_config"].update(narrow, head_dim=head_dim)
            config["text_config"]["rope_scaling"]["mrope_section"] = [head_dim // 4, head_dim // 8, head_dim // 8]
            config["vision_config"].update(depth=depth, deepstack_visual_indexes=list(range(min(depth, layers, 3))),
                                           hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=hidden)
        else:
            raise ValueError(f"{real}: model_type {kind!r}; narrowed folders are built for qwen2_5_vl and qwen3_vl")

    return narrowed_folder(real, folder, narrowed)

TINY = {kind: (model, lambda kind=kind: tiny_qwen_processor(kind))
        for kind, model in (("qwen2_vl", tiny_qwen2_vl), ("qwen2_5_vl", tiny_qwen2_5_vl), ("qwen3_vl", tiny_qwen3_vl),
                            ("qwen3_vl_moe", tiny_qwen3_vl_moe))}
