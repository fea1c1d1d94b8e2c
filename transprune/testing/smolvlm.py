"""Tiny SmolVLM and Idefics3 (SmolVLM's architecture under its first name): 64-px crops, pixel shuffle x2."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from .common import CHAT_TEMPLATE, IMAGE_ID, IMAGE_SIZE, PAD_ID, PATCH_SIZE, _build, _vocab, tiny_tokenizer, word_level_tokenizer
from .llava import _text_config

def tiny_smolvlm_config(**text_overrides):
    """SmolVLM-shaped config: a 2-layer tower on 64-px crops (8-px patches), pixel shuffle x2 (16 tokens per
    crop), a Llama decoder (GQA)."""
    from transformers import SmolVLMConfig
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    vision = SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    return SmolVLMConfig(vision_config=vision, text_config=_text_config(**text_overrides), image_token_id=IMAGE_ID,
                         scale_factor=2, tie_word_embeddings=False, pad_token_id=PAD_ID)


def tiny_smolvlm(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                 **text_overrides):
    """Random-init ``SmolVLMForConditionalGeneration`` in eval mode."""
    from transformers import SmolVLMForConditionalGeneration

    return _build(tiny_smolvlm_config(**text_overrides), SmolVLMForConditionalGeneration, seed, attn_implementation,
                  dtype)


def tiny_idefics3(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                  **text_overrides):
    """Random-init ``Idefics3ForConditionalGeneration`` in eval mode (SmolVLM's architecture under its first name)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    smol = tiny_smolvlm_config(**{"vocab_size": len(tiny_idefics3_tokenizer()), **text_overrides})
    config = Idefics3Config(vision_config=smol.vision_config.to_dict(), text_config=smol.text_config.to_dict(),
                            image_token_id=IMAGE_ID, scale_factor=2, tie_word_embeddings=False, pad_token_id=PAD_ID)
    return _build(config, Idefics3ForConditionalGeneration, seed, attn_implementation, dtype)


IDEFICS3_TOKENS = ["<fake_token_around_image>", "<end_of_utterance>"]  # what Idefics3's processor adds if missing


def tiny_idefics3_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """`tiny_tokenizer`'s words plus the two tokens Idefics3's processor needs (ids 143, 144)."""
    vocab = _vocab()
    for token in IDEFICS3_TOKENS:
        vocab.setdefault(token, len(vocab))
    tokenizer = word_level_tokenizer(vocab, padding_side)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"] + IDEFICS3_TOKENS})
    return tokenizer



def tiny_smolvlm_processor():
    """SmolVLM processor for the tiny model: images resized to a longest edge of 128 px and split into 64-px crops
    (a grid plus the global view, 16 tokens each); images only (its video processor needs torchvision)."""
    from transformers import SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from ..adapters.base import image_only_processor

    image_processor = SmolVLMImageProcessorPil(do_image_splitting=True, max_image_size={"longest_edge": IMAGE_SIZE},
                                               size={"longest_edge": 2 * IMAGE_SIZE})
    return image_only_processor(SmolVLMProcessor, image_processor, tiny_tokenizer(), image_seq_len=16,
                                chat_template=CHAT_TEMPLATE)


def tiny_idefics3_processor():
    """Idefics3 processor for the tiny Idefics3 model: SmolVLM's crops (64 px, 16 tokens each, plus the global
    view) under Idefics3's own processor class."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    image_processor = Idefics3ImageProcessorPil(do_image_splitting=True, max_image_size={"longest_edge": IMAGE_SIZE},
                                                size={"longest_edge": 2 * IMAGE_SIZE})
    return Idefics3Processor(image_processor, tiny_idefics3_tokenizer(), image_seq_len=16, chat_template=CHAT_TEMPLATE)




TINY = {"smolvlm": (tiny_smolvlm, tiny_smolvlm_processor), "idefics3": (tiny_idefics3, tiny_idefics3_processor)}
