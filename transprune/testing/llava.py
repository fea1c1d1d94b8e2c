"""Tiny LLaVA-1.5 and LLaVA-NeXT: a CLIP tower (hidden 32, 2 layers, 4 heads, 64x64 pixels, patch 8 -> 8x8 = 64
patches + CLS) and a Llama decoder (hidden 64, 8 layers, 4 query heads / 2 key-value heads, head_dim 16). LLaVA:
every image is 64 ``<image>`` tokens. LLaVA-NeXT: 64 base + unpadded grid features + one newline per grid row,
e.g. 136 for a 64x64 image, 200 for 128 wide x 64 high, 208 for 64 wide x 128 high, 336 for 128x128."""

from __future__ import annotations

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
)

from .common import (BOS_ID, CHAT_TEMPLATE, EOS_ID, GRID_PINPOINTS, IMAGE_ID, IMAGE_SIZE, INIT_STD, PAD_ID, PATCH_SIZE,
                     _build, _vocab, narrowed_folder, tiny_tokenizer)

def _vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)


def _text_config(**text_overrides) -> LlamaConfig:
    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(_vocab()), max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                  initializer_range=INIT_STD)
    fields.update(text_overrides)
    return LlamaConfig(**fields)


def _common(**text_overrides) -> dict:
    return dict(vision_config=_vision_config(), text_config=_text_config(**text_overrides),
                image_token_id=IMAGE_ID, pad_token_id=PAD_ID, vision_feature_select_strategy="default",
                vision_feature_layer=-2, tie_word_embeddings=False)


def tiny_llava_config(**text_overrides) -> LlavaConfig:
    """LLaVA-1.5-shaped config: 64 image tokens per image. ``text_overrides`` go to the Llama text config."""
    return LlavaConfig(**_common(**text_overrides), image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)


def tiny_llava_next_config(**text_overrides) -> LlavaNextConfig:
    """LLaVA-NeXT-shaped config with a small any-resolution grid (see ``GRID_PINPOINTS``)."""
    return LlavaNextConfig(**_common(**text_overrides), image_grid_pinpoints=[list(p) for p in GRID_PINPOINTS],
                           image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)



def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
               **text_overrides) -> LlavaForConditionalGeneration:
    """Random-init ``LlavaForConditionalGeneration`` in eval mode (346k params with 8 decoder layers)."""
    return _build(tiny_llava_config(**text_overrides), LlavaForConditionalGeneration, seed,
                  attn_implementation, dtype)


def tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                    **text_overrides) -> LlavaNextForConditionalGeneration:
    """Random-init ``LlavaNextForConditionalGeneration`` in eval mode."""
    return _build(tiny_llava_next_config(**text_overrides), LlavaNextForConditionalGeneration, seed,
                  attn_implementation, dtype)



def tiny_llava_processor(kind: str = "llava"):
    """The tiny LLaVA ("llava") or LLaVA-NeXT ("llava_next") processor; it expands each ``<image>`` to the count."""
    size, crop = {"shortest_edge": IMAGE_SIZE}, {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    common = dict(tokenizer=tiny_tokenizer(), patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                  image_token="<image>", num_additional_image_tokens=1,  # the CLIP CLS token
                  chat_template=CHAT_TEMPLATE)
    if kind == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(size=size, crop_size=crop), **common)
    image_processor = LlavaNextImageProcessorPil(size=size, crop_size=crop,
                                                 image_grid_pinpoints=[list(p) for p in GRID_PINPOINTS])
    return LlavaNextProcessor(image_processor=image_processor, **common)




def narrowed_llava_folder(real, folder, layers: int = 4, hidden: int = 128, vision_layers: int = 2):
    """A random-weight copy of a real LLaVA folder (``real``: its config, processor and tokenizer files, no
    weights) in ``folder``: the decoder narrowed to ``layers`` layers of width ``hidden`` (4 query / 2 KV heads),
    the CLIP tower to ``vision_layers`` layers at its own width, so the real processor and token counts run on a
    CPU. Returns ``folder``."""
    def narrow(config):
        config["text_config"].update(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                                     num_attention_heads=4, num_key_value_heads=2)
        config["vision_config"].update(num_hidden_layers=vision_layers)

    return narrowed_folder(real, folder, narrow)

TINY = {"llava": (tiny_llava, lambda: tiny_llava_processor("llava")),
        "llava_next": (tiny_llava_next, lambda: tiny_llava_processor("llava_next"))}
