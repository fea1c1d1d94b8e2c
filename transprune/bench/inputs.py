"""The inputs every method of a bench run sees: synthetic (no tokenizer) or through a checkpoint's processor."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..loading import build_prompt

# Random text ids stay below 32000 (LLaVA's image id), clear of the special ids of every family's vocabulary.
TEXT_IDS_BELOW = 32000


@dataclass
class BenchInputs:
    tensors: dict  # model inputs: input_ids, attention_mask, pixel_values (+ image_sizes for NeXT)
    image_tokens: list[int]  # per sample
    text_tokens: list[int]  # per sample: every non-image token (BOS and chat template included)
    image_size: tuple[int, int]  # (height, width) of each synthetic image
    source: str  # how they were made

    @property
    def sha256(self) -> str:
        return inputs_sha256(self.tensors)


def inputs_sha256(tensors: dict) -> str:
    """Fingerprint of the exact tensors handed to the model (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            digest.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def synthetic_inputs(model, batch: int, text_tokens: int = 64, image_size=None, seed: int = 0) -> BenchInputs:
    """One image and ``text_tokens`` non-image tokens per sample, no tokenizer needed: BOS and 4 text ids,
    the image placeholders, then the rest of the text (the instruction IGA reads). Every sample has
    its own seeded image and text, all of the same length (no padding)."""
    if text_tokens < 2:
        raise ValueError(f"--text-tokens must be >= 2 (BOS and at least one instruction token), got {text_tokens}")
    from ..adapters import adapter_for

    config, adapter = model.config, adapter_for(model)
    size = tuple(image_size or adapter.default_image_size())
    n_image = adapter.image_tokens_for(size)
    gen = torch.Generator().manual_seed(seed)
    vocab = min(config.text_config.vocab_size, TEXT_IDS_BELOW)
    before = min(5, text_tokens - 1)
    rows = []
    for _ in range(batch):
        text = torch.randint(5, vocab, (text_tokens,), generator=gen)
        for reserved in (config.image_token_id, getattr(config, "pad_token_id", None),
                         getattr(config, "video_token_id", None)):  # Qwen: video placeholders are visual too
            if reserved is not None:
                text[text == reserved] = 5
        text[0] = config.text_config.bos_token_id if config.text_config.bos_token_id is not None else 1
        rows.append(torch.cat([text[:before], torch.full((n_image,), config.image_token_id), text[before:]]))
    input_ids = torch.stack(rows)
    tensors = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
               **adapter.synthetic_vision_inputs(batch, size, gen)}
    tensors.update(adapter.token_type_inputs(input_ids))  # mRoPE positions, Gemma 3's image blocks
    return BenchInputs(tensors, [n_image] * batch, [text_tokens] * batch, size,
                       f"synthetic (seed {seed}): N(0,1) pixel values, random text ids")


def checkpoint_inputs(processor, model, batch: int, text_tokens: int = 64, image_size=None,
                      seed: int = 0) -> BenchInputs:
    """Inputs for a real checkpoint: seeded synthetic images and a fixed question, through the checkpoint's
    own processor and chat template; the question is as many filler words as keep the non-image token
    count <= ``text_tokens``."""
    from ..adapters import adapter_for

    size = tuple(image_size or adapter_for(model).default_image_size())
    words = "describe the image in detail and list every object you can see".split()
    image_id = model.config.image_token_id

    image_token = getattr(processor, "image_token", "<image>")

    def prompt(n_words):
        return build_prompt(processor, " ".join(words[i % len(words)] for i in range(n_words)))

    def text_count(n_words):  # before the processor expands <image>: every token but the placeholder
        ids = processor.tokenizer(prompt(n_words).replace(image_token, ""))["input_ids"]
        return len(ids)

    n_words = 1
    while n_words < 4 * text_tokens and text_count(n_words + 1) <= text_tokens:
        n_words += 1
    images = [random_image(seed * 1000 + b, (size[1], size[0])) for b in range(batch)]
    out = processor(images=images, text=[prompt(n_words)] * batch, return_tensors="pt")
    tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    ids = tensors["input_ids"]
    return BenchInputs(tensors, (ids == image_id).sum(1).tolist(), (ids != image_id).sum(1).tolist(), size,
                       f"checkpoint processor, synthetic images (seed {seed}), a {n_words}-word question")


def random_image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """RGB image of ``size`` = (width, height): a seeded coarse colour pattern plus noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    blocks = rng.integers(0, 256, (max(height // 16, 1), max(width // 16, 1), 3)).astype(np.float32)
    coarse = np.asarray(Image.fromarray(blocks.astype(np.uint8)).resize((width, height), Image.NEAREST),
                        dtype=np.float32)
    pixels = np.clip(coarse + rng.normal(0, 24, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")
