"""Tiny Gemma 3: a SigLIP tower pooled to 16 tokens per image (bidirectional among themselves), sliding and global layers."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from .common import BOS_ID, CHAT_TEMPLATE, EOS_ID, IMAGE_ID, IMAGE_SIZE, INIT_STD, PAD_ID, PATCH_SIZE, _build, tiny_tokenizer

def tiny_gemma3_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """`tiny_tokenizer` plus Gemma 3's markers: ``<start_of_image>`` (the placeholder a prompt writes, which the
    processor expands to ``\n\n<start_of_image>`` + 16 ``<image>`` + ``<end_of_image>\n\n``), named as the
    processor reads them."""
    base = tiny_tokenizer(padding_side)
    return PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side=padding_side, model_max_length=512,
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image>"})


GEMMA3_SLIDING_WINDOW = 24  # shorter than the tiny prompts: sliding layers do not see every token


def tiny_gemma3_config(**text_overrides):
    """Gemma 3-shaped config: a 2-layer SigLIP tower on 64-px images (8 x 8 patches average-pooled 2 x 2: 16 tokens
    per image, bidirectional among themselves), a Gemma 3 decoder (GQA, q/k norms, four norms per layer,
    ``query_pre_attn_scalar`` 24 != head_dim 16), sliding and global layers alternating with a window of
    `GEMMA3_SLIDING_WINDOW` tokens and a RoPE base each."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    tokenizer = tiny_gemma3_tokenizer()
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                sliding_window=GEMMA3_SLIDING_WINDOW, sliding_window_pattern=2, max_position_embeddings=2048,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
                initializer_range=INIT_STD)
    text.update(text_overrides)
    return Gemma3Config(text_config=Gemma3TextConfig(**text), vision_config=vision, mm_tokens_per_image=16,
                        boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                        image_token_index=IMAGE_ID, tie_word_embeddings=False)


def tiny_gemma3(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                **text_overrides):
    """Random-init ``Gemma3ForConditionalGeneration`` in eval mode (the image markers' logits are 0 too)."""
    from transformers import Gemma3ForConditionalGeneration

    config = tiny_gemma3_config(**text_overrides)
    model = _build(config, Gemma3ForConditionalGeneration, seed, attn_implementation, torch.float32)
    with torch.no_grad():
        model.lm_head.weight[[config.boi_token_index, config.eoi_token_index]] = 0.0
    return model.to(dtype)



def tiny_gemma3_processor():
    """Gemma 3 processor for the tiny model: every image resized to 64 x 64 (16 tokens between its markers);
    prompts write ``<start_of_image>`` where an image goes (the chat template does)."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return Gemma3Processor(Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                           tiny_gemma3_tokenizer(), chat_template=CHAT_TEMPLATE.replace("<image>", "<start_of_image>"),
                           image_seq_length=16)




TINY = {"gemma3": (tiny_gemma3, tiny_gemma3_processor)}
