"""The official codes' LLaVA-1.5 layout, for the tests that hold each peer to its official rule: 576 patches per
image (a 24 x 24 grid, as 336 px / 14), the image tokens at columns 35..610 of the prompt, text after them, a
32-layer decoder (the layer numbers of the official settings) on random weights."""

import torch
from transformers import LlavaForConditionalGeneration

from transprune.testing import IMAGE_ID, _build, tiny_llava_config

IMAGE_START, IMAGE_TOKENS, TEXT_AFTER = 35, 576, 40
IMAGE_END = IMAGE_START + IMAGE_TOKENS  # 611: the first column after the image


def llava_576(seed: int = 0, num_hidden_layers: int = 32, attn_implementation: str = "sdpa"):
    """A LLaVA-1.5-shaped model with 576 patches per image (48-px images of 2-px patches) and a 32-layer decoder."""
    config = tiny_llava_config(num_hidden_layers=num_hidden_layers)
    config.vision_config.image_size, config.vision_config.patch_size = 48, 2
    config.image_seq_length = IMAGE_TOKENS
    return _build(config, LlavaForConditionalGeneration, seed, attn_implementation, torch.float32)


def layout_inputs(seed: int, batch: int = 1) -> dict:
    """``batch`` prompts of 35 text tokens, the 576 image tokens at 35..610 and 40 text tokens, with images."""
    gen = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(5, 40, (batch, IMAGE_END + TEXT_AFTER), generator=gen)
    ids[:, IMAGE_START:IMAGE_END] = IMAGE_ID
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, 48, 48, generator=gen)}
