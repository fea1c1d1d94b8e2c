"""The mini LLaVA: architecture, tokenizer and processor of the project's own trained testbed model.

A real ``LlavaForConditionalGeneration`` (CLIP vision tower, two-layer projector, Llama decoder), small
enough to train from scratch on this project's generated questions (`transprune.mini.data`) on a CPU:
96x96 images, patch 6 -> 16x16 = 256 image tokens, 12 decoder layers (so the pruning schedule maps to
layers 3/4/5 of 12 like 8/12/16 of LLaVA-1.5's 32 ... see `TransPruneConfig.layers_for_depth`).

The tokenizer is word level over the generator's vocabulary; the processor is a ``LlavaProcessor``
(``AutoProcessor`` loads it from the checkpoint folder). Prompt format, as LLaVA-1.5:
``USER: <image>\\n{question} ASSISTANT:`` and the answer is one word followed by ``</s>``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from ..testing import CHAT_TEMPLATE, SPECIAL_TOKENS, word_level_tokenizer
from .data import COLOURS, IMAGE_SIZE, PATCH_SIZE, SHAPES, SIZES

IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 256
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))
WORDS = (
    ["USER", "ASSISTANT", ":", "?", "\n", "what", "colour", "is", "the", "shape", "left", "of", "how", "many",
     "objects", "are", "there", "a", "digit", "on", "yes", "no"]
    + list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(SIZES) + [str(d) for d in range(10)]
)


def prompt(question: str) -> str:
    """The model's prompt for one question (what the chat template produces)."""
    return f"USER: <image>\n{question} ASSISTANT:"


def vocab() -> dict[str, int]:
    table: dict[str, int] = {}
    for token in SPECIAL_TOKENS + WORDS:
        table.setdefault(token, len(table))
    return table


def mini_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the generator's words (51 ids); ``<s>`` is prepended to every sequence."""
    return word_level_tokenizer(vocab(), padding_side)


def mini_processor() -> LlavaProcessor:
    """``LlavaProcessor``: CLIP-normalised 96x96 pixels, each ``<image>`` expanded to 256 tokens."""
    size, crop = {"shortest_edge": IMAGE_SIZE}, {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return LlavaProcessor(image_processor=CLIPImageProcessorPil(size=size, crop_size=crop),
                          tokenizer=mini_tokenizer(), patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                          image_token="<image>", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def mini_config() -> LlavaConfig:
    """CLIP tower (d=64, 4 layers) -> projector -> Llama decoder (d=96, 12 layers, 4 heads / 2 kv heads)."""
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64)
    text = LlamaConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=12, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(vocab()), max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                       rope_theta=10000.0)
    # vision_feature_layer=-1: the last CLIP layer feeds the projector (with -2 it would be dead weight).
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, pad_token_id=PAD_ID,
                       vision_feature_select_strategy="default", vision_feature_layer=-1,
                       image_seq_length=IMAGE_TOKENS, tie_word_embeddings=False)


def build_mini(seed: int = 0, attn_implementation: str = "sdpa") -> LlavaForConditionalGeneration:
    """A freshly initialised (untrained) mini LLaVA."""
    import torch

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration._from_config(mini_config(), attn_implementation=attn_implementation,
                                                      dtype=torch.float32)


def checkpoint_path() -> Path:
    """The shipped trained checkpoint folder (package data)."""
    return Path(str(resources.files("transprune.mini") / "checkpoint"))


def _check_is_mini(path: Path) -> None:
    """Raise ValueError unless the folder's config.json has the mini model's shape (read before any weights)."""
    import json

    saved, mini = json.loads((path / "config.json").read_text()), mini_config().to_dict()
    facts = [("model_type",), ("vision_config", "image_size"), ("vision_config", "patch_size"),
             ("text_config", "num_hidden_layers"), ("text_config", "hidden_size"), ("text_config", "vocab_size")]
    for keys in facts:
        have, want = saved, mini
        for key in keys:
            have, want = (have or {}).get(key), want.get(key)
        if have != want:
            raise ValueError(f"{path} is not a mini checkpoint: its {'.'.join(keys)} is {have!r}, the mini model's is "
                             f"{want!r}")


def load_mini(path: str | Path | None = None, attn_implementation: str = "sdpa"):
    """(model, processor) from a trained checkpoint folder (default: the shipped one), in eval mode."""
    import torch
    from transformers import AutoProcessor

    path = Path(path) if path is not None else checkpoint_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no mini checkpoint at {path} (train one with `transprune train-mini --out DIR`)")
    _check_is_mini(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                          attn_implementation=attn_implementation).eval()
    return model, AutoProcessor.from_pretrained(path, local_files_only=True)
