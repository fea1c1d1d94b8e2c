"""Tiny InternVL: a 2-layer InternViT on 64-px tiles (CLS dropped), pixel shuffle 0.5, a Qwen2 decoder."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from .common import BOS_ID, CHAT_TEMPLATE, EOS_ID, IMAGE_ID, IMAGE_SIZE, INIT_STD, PAD_ID, PATCH_SIZE, _build, tiny_tokenizer

def tiny_internvl_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """`tiny_tokenizer` plus InternVL's markers: ``<img>`` / ``</img>`` around each image, ``<image>`` as its
    context token (the placeholder), ``<video>``; named as the processor reads them (saved with the tokenizer)."""
    base = tiny_tokenizer(padding_side)
    return PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side=padding_side, model_max_length=512,
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<image>", "video_token": "<video>"})


def tiny_internvl_config(**text_overrides):
    """InternVL-shaped config: a 2-layer InternViT on 64-px tiles (8-px patches, CLS dropped), pixel shuffle 0.5
    (16 tokens per tile), a Qwen2 decoder (GQA)."""
    from transformers import InternVLConfig, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[PATCH_SIZE, PATCH_SIZE])
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tiny_internvl_tokenizer()), max_position_embeddings=2048,
                tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                initializer_range=INIT_STD)
    text.update(text_overrides)
    return InternVLConfig(vision_config=vision, text_config=Qwen2Config(**text), image_token_id=IMAGE_ID,
                          downsample_ratio=0.5, tie_word_embeddings=False)


def tiny_internvl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                  **text_overrides):
    """Random-init ``InternVLForConditionalGeneration`` in eval mode."""
    from transformers import InternVLForConditionalGeneration

    return _build(tiny_internvl_config(**text_overrides), InternVLForConditionalGeneration, seed,
                  attn_implementation, dtype)



def tiny_internvl_processor():
    """InternVL processor for the tiny model: 64-px tiles (up to 4, plus a thumbnail), 16 tokens each; images only
    (its video processor needs torchvision)."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    from ..adapters.base import image_only_processor

    image_processor = GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=4,
                                               size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return image_only_processor(InternVLProcessor, image_processor, tiny_internvl_tokenizer(), image_seq_length=16,
                                chat_template=CHAT_TEMPLATE)




TINY = {"internvl": (tiny_internvl, tiny_internvl_processor)}
