"""Tiny, random-init, offline LLaVA / LLaVA-NeXT models and processors for tests.

Nothing here touches the network: the tokenizer is built with the ``tokenizers`` library from a fixed word
list, the image processors are the PIL backends (no torchvision needed) and the models are random-init from
a config, then re-initialised with a seeded normal so activations, attention patterns and logits are clearly
non-uniform (the transformers default of std 0.02 gives near-uniform attention and degenerate greedy decoding).

    model, processor = tiny_llava(seed=0), tiny_processor("llava")
    inputs = processor(images=random_image(0), text="USER: <image>\\nwhat is the colour ? ASSISTANT:",
                       return_tensors="pt")
    model.generate(**inputs, max_new_tokens=5)

Sizes: CLIP vision tower (hidden 32, 2 layers, 4 heads, 64x64 pixels, patch 8 -> 8x8 = 64 patches + CLS),
Llama decoder (hidden 64, 8 layers, 4 query heads / 2 key-value heads, head_dim 16, vocab = the tokenizer's).
LLaVA: every image is 64 ``<image>`` tokens. LLaVA-NeXT: 64 base + unpadded grid features + one newline per
grid row, e.g. 136 for a 64x64 image, 200 for 128 wide x 64 high, 208 for 64 wide x 128 high, 336 for
128x128.

The lm_head rows of the special tokens (ids 0-4: <unk> <s> </s> <pad> <image>) are zero, so their logit is
exactly 0 while the top logit is ~+4: greedy decoding never emits them, ``generate`` always runs to
``max_new_tokens`` (pass another ``eos_token_id`` to test early stopping) and a generated token is never
mistaken for an image placeholder or padding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BatchFeature,
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
    PreTrainedTokenizerFast,
)

__all__ = [
    "IMAGE_SIZE", "PATCH_SIZE", "GRID_PINPOINTS", "INIT_STD", "UNK_ID", "BOS_ID", "EOS_ID", "PAD_ID", "IMAGE_ID",
    "SPECIAL_TOKENS", "CHAT_TEMPLATE", "word_level_tokenizer", "tiny_tokenizer", "tiny_llava_config", "tiny_llava_next_config", "tiny_llava", "tiny_llava_next",
    "tiny_model", "tiny_processor", "save_tiny_checkpoint", "random_image", "sample_prompts", "sample_images",
    "sample_inputs", "sample_inputs_unbatched",
    "QWEN_SPECIAL_TOKENS", "QWEN_PATCH_SIZE", "QWEN_MERGE_SIZE", "QWEN_CHAT_TEMPLATE", "tiny_qwen_tokenizer",
    "tiny_qwen2_5_vl_config", "tiny_qwen2_vl_config", "tiny_qwen2_5_vl", "tiny_qwen2_vl", "tiny_qwen_processor",
    "tiny_qwen3_vl_config", "tiny_qwen3_vl", "QWEN3_DEEPSTACK_LAYERS",
    "qwen_sample_prompts", "qwen_sample_inputs", "qwen_sample_inputs_unbatched",
]

IMAGE_SIZE = 64
PATCH_SIZE = 8
GRID_PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128]]  # (height, width) candidates for LLaVA-NeXT
INIT_STD = 0.2  # std of every weight matrix / embedding; large enough for peaked attention and logits

# ---------------------------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))
PUNCTUATION = [":", "?", ".", ",", "!", "'", "\n"]
WORDS = (
    "USER ASSISTANT SYSTEM what is the colour color of this that a an image picture photo in on at and or it "
    "there how many describe shape size left right top bottom middle red green blue yellow black white orange "
    "purple big small large cat dog car tree house sky person man woman please answer question yes no one two "
    "three four five which where who why do does are there"
).split()
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
DIGITS = [str(d) for d in range(10)]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _vocab() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + PUNCTUATION + WORDS + LETTERS + DIGITS:
        vocab.setdefault(token, len(vocab))
    return vocab


def word_level_tokenizer(vocab: dict[str, int], padding_side: str = "left") -> PreTrainedTokenizerFast:
    """Offline word-level tokenizer over ``vocab`` whose first five ids are ``SPECIAL_TOKENS``.

    Whitespace separates words, ``\\n`` and punctuation are tokens of their own, digits are split,
    unknown words map to ``<unk>`` and ``<s>`` is prepended to every sequence.
    """
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[ \t\r]+"), behavior="removed"),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side=padding_side, model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID and len(tokenizer) == len(vocab)
    return tokenizer


def tiny_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """Word-level tokenizer (~150 ids) over a fixed word list (see `word_level_tokenizer`).

    Ids: ``<unk>`` 0, ``<s>`` 1 (prepended to every sequence), ``</s>`` 2, ``<pad>`` 3, ``<image>`` 4.
    """
    return word_level_tokenizer(_vocab(), padding_side)


# ---------------------------------------------------------------------------------------------- configs

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


# ---------------------------------------------------------------------------------------------- models

@torch.no_grad()
def _reinit(model: torch.nn.Module, seed: int, std: float = INIT_STD) -> None:
    """Seeded, order-deterministic init: norms 1, biases 0, every other parameter N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1 and "norm" in name:
            param.fill_(1.0)
        else:
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def _build(config, model_cls, seed: int, attn_implementation: str, dtype: torch.dtype):
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    _reinit(model, seed)
    with torch.no_grad():  # special tokens get logit exactly 0, far below the max: greedy never emits them
        model.lm_head.weight[:len(SPECIAL_TOKENS)] = 0.0
    return model.to(dtype).eval()


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


def tiny_model(kind: str = "llava", **kwargs):
    """The tiny model of a supported ``model_type`` (`TINY_MODELS`: one per registered family's model type)."""
    return TINY_MODELS[_check_kind(kind, TINY_MODELS)](**kwargs)


def _check_kind(kind: str, kinds=("llava", "llava_next")) -> str:
    if kind not in kinds:
        raise ValueError(f"kind must be one of {', '.join(map(repr, kinds))}, not {kind!r}")
    return kind


# ---------------------------------------------------------------------------------------------- processors

def tiny_onevision_processor():
    """LLaVA-OneVision processor for the tiny model: PIL image processor, images only (its video processor needs
    torchvision), each ``<image>`` expanded to the model's packed count."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    from .adapters.base import image_only_processor

    image_processor = LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                      image_grid_pinpoints=[list(p) for p in GRID_PINPOINTS])
    return image_only_processor(LlavaOnevisionProcessor, image_processor, tiny_onevision_tokenizer(),
                                num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
                                vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE)


def tiny_smolvlm_processor():
    """SmolVLM processor for the tiny model: images resized to a longest edge of 128 px and split into 64-px crops
    (a grid plus the global view, 16 tokens each); images only (its video processor needs torchvision)."""
    from transformers import SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from .adapters.base import image_only_processor

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


def tiny_internvl_processor():
    """InternVL processor for the tiny model: 64-px tiles (up to 4, plus a thumbnail), 16 tokens each; images only
    (its video processor needs torchvision)."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    from .adapters.base import image_only_processor

    image_processor = GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=4,
                                               size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return image_only_processor(InternVLProcessor, image_processor, tiny_internvl_tokenizer(), image_seq_length=16,
                                chat_template=CHAT_TEMPLATE)


def tiny_gemma3_processor():
    """Gemma 3 processor for the tiny model: every image resized to 64 x 64 (16 tokens between its markers);
    prompts write ``<start_of_image>`` where an image goes (the chat template does)."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return Gemma3Processor(Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                           tiny_gemma3_tokenizer(), chat_template=CHAT_TEMPLATE.replace("<image>", "<start_of_image>"),
                           image_seq_length=16)


def tiny_processor(kind: str = "llava"):
    """Processor matching the tiny configs; it expands each image placeholder in the text to the model's count."""
    if kind in QWEN_KINDS:
        return tiny_qwen_processor(kind)
    if kind == "llava_onevision":
        return tiny_onevision_processor()
    if kind == "smolvlm":
        return tiny_smolvlm_processor()
    if kind == "idefics3":
        return tiny_idefics3_processor()
    if kind == "internvl":
        return tiny_internvl_processor()
    if kind == "gemma3":
        return tiny_gemma3_processor()
    size, crop = {"shortest_edge": IMAGE_SIZE}, {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    common = dict(tokenizer=tiny_tokenizer(), patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                  image_token="<image>", num_additional_image_tokens=1,  # the CLIP CLS token
                  chat_template=CHAT_TEMPLATE)
    if _check_kind(kind) == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(size=size, crop_size=crop), **common)
    image_processor = LlavaNextImageProcessorPil(size=size, crop_size=crop,
                                                 image_grid_pinpoints=[list(p) for p in GRID_PINPOINTS])
    return LlavaNextProcessor(image_processor=image_processor, **common)


def save_tiny_checkpoint(path: str | os.PathLike, kind: str = "llava", seed: int = 0, **text_overrides) -> Path:
    """Write a tiny model + processor with ``save_pretrained``; load them back with ``from_pretrained(path)``."""
    path = Path(path)
    tiny_model(kind, seed=seed, **text_overrides).save_pretrained(path)
    tiny_processor(kind).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- inputs

def random_image(seed: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> Image.Image:
    """RGB image of ``size`` = (width, height): a seeded coarse colour pattern plus noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    blocks = rng.integers(0, 256, (max(height // 16, 1), max(width // 16, 1), 3)).astype(np.float32)
    coarse = np.asarray(Image.fromarray(blocks.astype(np.uint8)).resize((width, height), Image.NEAREST),
                        dtype=np.float32)
    pixels = np.clip(coarse + rng.normal(0, 24, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


_QUESTION_WORDS = ("what is the colour of the big red car on the left of this picture and how many "
                   "dogs are there in the image").split()


def sample_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` LLaVA-style prompts with one ``<image>`` each; prompt ``i`` has ``3 + 2 * i`` question words."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), 3 + 2 * i)]
        prompts.append(f"USER: <image>\n{' '.join(words)} ? ASSISTANT:")
    return prompts


def sample_images(n: int, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> list[Image.Image]:
    """``n`` different random images; ``sizes`` is an optional (width, height) per image (default 64x64)."""
    sizes = sizes or [(IMAGE_SIZE, IMAGE_SIZE)] * n
    return [random_image(seed * 1000 + i, sizes[i]) for i in range(n)]


def _kind_of(processor) -> str:
    return "llava_next" if isinstance(processor, LlavaNextProcessor) else "llava"


def sample_inputs(processor, n: int = 3, seed: int = 0, kind: str | None = None,
                  sizes: list[tuple[int, int]] | None = None) -> BatchFeature:
    """Left-padded batch of ``n`` prompts of different lengths, each with its own image.

    Returns the processor's ``BatchFeature`` (``input_ids``, ``attention_mask``, ``pixel_values`` and, for
    LLaVA-NeXT, ``image_sizes``). ``kind`` defaults to the processor's type; ``sizes`` as in ``sample_images``.
    """
    _check_kind(kind or _kind_of(processor))
    processor.tokenizer.padding_side = "left"
    return processor(images=_per_sample(processor, sample_images(n, seed, sizes)),
                     text=_placeholders(processor, sample_prompts(n, seed)), padding=True, return_tensors="pt")


def sample_inputs_unbatched(processor, n: int = 3, seed: int = 0, kind: str | None = None,
                            sizes: list[tuple[int, int]] | None = None) -> list[BatchFeature]:
    """The same prompts and images as ``sample_inputs``, one unpadded ``BatchFeature`` (batch size 1) each."""
    _check_kind(kind or _kind_of(processor))
    images, prompts = sample_images(n, seed, sizes), _placeholders(processor, sample_prompts(n, seed))
    return [processor(images=_per_sample(processor, [image]), text=[prompt], return_tensors="pt")
            for image, prompt in zip(images, prompts)]


def prompt_inputs(processor, prompts: list[str], images: list, padding_side: str = "left") -> BatchFeature:
    """One batch (padded on ``padding_side``) of LLaVA-style ``prompts``, ``<image>`` where each sample's image goes,
    for the tiny processor of any family (Qwen's and Gemma 3's placeholders are written for them)."""
    processor.tokenizer.padding_side = padding_side
    if "<|vision_start|>" in processor.tokenizer.get_vocab():  # Qwen: the image between its markers
        prompts = [p.replace("<image>\n", "<image>").replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
                   for p in prompts]
        return processor(images=images, text=prompts, padding=True, return_tensors="pt")
    return processor(images=_per_sample(processor, images), text=_placeholders(processor, prompts), padding=True,
                     return_tensors="pt")


def _per_sample(processor, images: list) -> list:
    """The images as the processor wants them: SmolVLM's and Gemma 3's take one list of images per prompt."""
    nested = type(processor).__name__ in ("SmolVLMProcessor", "Idefics3Processor", "Gemma3Processor")
    return [[image] for image in images] if nested else images


def _placeholders(processor, prompts: list[str]) -> list[str]:
    """The prompts with the processor's own image placeholder (Gemma 3's is ``<start_of_image>``)."""
    token = getattr(processor, "image_token", "<image>")
    return [p.replace("<image>", token) for p in prompts]


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


def tiny_qwen2_5_vl_config(**text_overrides):
    """Qwen2.5-VL-shaped config (window attention in vision block 0). ``text_overrides`` go to the text config."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=QWEN_PATCH_SIZE,
                  spatial_merge_size=QWEN_MERGE_SIZE, temporal_patch_size=2, window_size=32,
                  fullatt_block_indexes=[1], out_hidden_size=64, tokens_per_second=2, initializer_range=INIT_STD)
    return Qwen2_5_VLConfig(vision_config=vision, **_qwen_common(**text_overrides))


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


def tiny_qwen3_vl_config(**text_overrides):
    """Qwen3-VL-shaped config (DeepStack into decoder layers 0-2). ``text_overrides`` go to the text config."""
    from transformers import Qwen3VLConfig

    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=QWEN_PATCH_SIZE,
                  spatial_merge_size=QWEN_MERGE_SIZE, temporal_patch_size=2, out_hidden_size=64,
                  num_position_embeddings=64, deepstack_visual_indexes=list(range(QWEN3_DEEPSTACK_LAYERS)),
                  initializer_range=INIT_STD)
    text = dict(head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2],
                                              "mrope_interleaved": True, "rope_theta": 10000.0})
    return Qwen3VLConfig(vision_config=vision, **_qwen_common(**{**text, **text_overrides}))


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
                    **text_overrides):
    """Random-init ``Qwen2_5_VLForConditionalGeneration`` in eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return _qwen_build(tiny_qwen2_5_vl_config(**text_overrides), Qwen2_5_VLForConditionalGeneration, seed,
                       attn_implementation, dtype)


def tiny_qwen2_vl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                  **text_overrides):
    """Random-init ``Qwen2VLForConditionalGeneration`` in eval mode."""
    from transformers import Qwen2VLForConditionalGeneration

    return _qwen_build(tiny_qwen2_vl_config(**text_overrides), Qwen2VLForConditionalGeneration, seed,
                       attn_implementation, dtype)


def tiny_qwen3_vl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                  **text_overrides):
    """Random-init ``Qwen3VLForConditionalGeneration`` in eval mode."""
    from transformers import Qwen3VLForConditionalGeneration

    return _qwen_build(tiny_qwen3_vl_config(**text_overrides), Qwen3VLForConditionalGeneration, seed,
                       attn_implementation, dtype)


def tiny_qwen_processor(kind: str = "qwen2_5_vl"):
    """Processor for the tiny Qwen models (PIL image processor; images resized to multiples of 16 pixels,
    between 32x32 and 128x128 worth of pixels). ``kind``: "qwen2_5_vl", "qwen2_vl" or "qwen3_vl"."""
    from transformers import Qwen2VLImageProcessorPil

    import transformers

    from .adapters import family_for
    from .adapters.base import image_only_processor

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


# model_type -> tiny model builder: what tests build for every registered family
# (tests/test_testing.py checks that each model type of the adapter registry has one).
TINY_MODELS = {"llava": tiny_llava, "llava_next": tiny_llava_next, "llava_onevision": tiny_llava_onevision,
               "smolvlm": tiny_smolvlm, "idefics3": lambda **kw: tiny_idefics3(**kw), "internvl": tiny_internvl,
               "gemma3": tiny_gemma3,
               "qwen2_vl": tiny_qwen2_vl,
               "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl}
QWEN_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
