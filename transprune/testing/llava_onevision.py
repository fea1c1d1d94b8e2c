"""Tiny LLaVA-OneVision: a SigLIP tower (no CLS), a Qwen2 decoder, the tiny any-resolution grid."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from .common import (BOS_ID, CHAT_TEMPLATE, EOS_ID, GRID_PINPOINTS, IMAGE_ID, IMAGE_SIZE, INIT_STD, PAD_ID, PATCH_SIZE,
                     _build, tiny_tokenizer)

def tiny_onevision_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """`tiny_tokenizer` plus ``<video>`` (the id after the word list) for LLaVA-OneVision's video placeholders."""
    tokenizer = tiny_tokenizer(padding_side)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tokenizer


def tiny_llava_onevision_config(**text_overrides):
    """LLaVA-OneVision-shaped config: SigLIP tower (no CLS; all patches kept, strategy "full"), Qwen2 decoder
    (GQA, q/k/v biases), the tiny any-resolution grid (``GRID_PINPOINTS``) and anyres_max_9 packing."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    tokenizer = tiny_onevision_tokenizer()
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                initializer_range=INIT_STD)
    text.update(text_overrides)
    return LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**text), image_token_index=IMAGE_ID,
                                video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                vision_feature_select_strategy="full", vision_feature_layer=-1,
                                image_grid_pinpoints=[list(p) for p in GRID_PINPOINTS], tie_word_embeddings=False)


def tiny_llava_onevision(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                         **text_overrides):
    """Random-init ``LlavaOnevisionForConditionalGeneration`` in eval mode."""
    from transformers import LlavaOnevisionForConditionalGeneration

    return _build(tiny_llava_onevision_config(**text_overrides), LlavaOnevisionForConditionalGeneration, seed,
                  attn_implementation, dtype)



def tiny_onevision_processor():
    """LLaVA-OneVision processor for the tiny model: PIL image processor, images only (its video processor needs
    torchvision), each ``<image>`` expanded to the model's packed count."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    from ..adapters.base import image_only_processor

    image_processor = LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                      image_grid_pinpoints=[list(p) for p in GRID_PINPOINTS])
    return image_only_processor(LlavaOnevisionProcessor, image_processor, tiny_onevision_tokenizer(),
                                num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
                                vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE)




TINY = {"llava_onevision": (tiny_llava_onevision, tiny_onevision_processor)}
