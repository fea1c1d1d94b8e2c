"""Tiny, random-init, offline models and processors of every supported family, for tests and the mini testbed.

Nothing here touches the network: the tokenizers are built with the ``tokenizers`` library from a fixed word
list, the image processors are the PIL backends (no torchvision needed) and the models are random-init from
a config, then re-initialised with a seeded normal so activations, attention patterns and logits are clearly
non-uniform (the transformers default of std 0.02 gives near-uniform attention and degenerate greedy decoding).

    model, processor = tiny_model("llava", seed=0), tiny_processor("llava")
    inputs = processor(images=random_image(0), text="USER: <image>\\nwhat is the colour ? ASSISTANT:",
                       return_tensors="pt")
    model.generate(**inputs, max_new_tokens=5)

One file per family (``testing/<family>.py``; `qwen.py` for the three Qwen model types) builds its tiny models
and processors and declares them in its ``TINY`` table ({model_type: (model builder, processor builder)});
`common.py` holds what they share. The
lm_head rows of the special tokens (ids 0-4: <unk> <s> </s> <pad> <image>) are zero, so their logit is exactly 0
while the top logit is ~+4: greedy decoding never emits them, ``generate`` always runs to ``max_new_tokens``
(pass another ``eos_token_id`` to test early stopping) and a generated token is never mistaken for an image
placeholder or padding. The runtime, flops and bench never import this package; the mini testbed (`transprune.mini`,
the CLI's mini commands) builds its tokenizer with it.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

from .common import (BOS_ID, CHAT_TEMPLATE, DIGITS, EOS_ID, GRID_PINPOINTS, IMAGE_ID, IMAGE_SIZE,  # noqa: F401
                     INIT_STD, LETTERS, PAD_ID, PATCH_SIZE, PUNCTUATION, SPECIAL_TOKENS, WORDS, UNK_ID, _build, prompt_inputs, random_image, sample_images, sample_inputs,
                     sample_inputs_unbatched, sample_prompts, tiny_tokenizer, word_level_tokenizer)
from .gemma3 import (GEMMA3_SLIDING_WINDOW, tiny_gemma3, tiny_gemma3_config, tiny_gemma3_processor,  # noqa: F401
                     tiny_gemma3_tokenizer)
from .internvl import (tiny_internvl, tiny_internvl_config, tiny_internvl_processor,  # noqa: F401
                       tiny_internvl_tokenizer)
from .llava import _common, tiny_llava, tiny_llava_config, tiny_llava_next, tiny_llava_next_config  # noqa: F401
from .llava_onevision import (tiny_llava_onevision, tiny_llava_onevision_config,  # noqa: F401
                              tiny_onevision_processor, tiny_onevision_tokenizer)
from .qwen import (QWEN3_DEEPSTACK_LAYERS, QWEN_CHAT_TEMPLATE, QWEN_KINDS, QWEN_MERGE_SIZE,  # noqa: F401
                   QWEN_PATCH_SIZE, QWEN_SPECIAL_TOKENS, qwen_sample_inputs, qwen_sample_inputs_unbatched,
                   qwen_sample_prompts, tiny_qwen2_5_vl, tiny_qwen2_5_vl_config, tiny_qwen2_vl, tiny_qwen2_vl_config,
                   tiny_qwen3_vl, tiny_qwen3_vl_config, tiny_qwen3_vl_moe, tiny_qwen3_vl_moe_config, tiny_qwen_processor,
                   tiny_qwen_tokenizer)
from .smolvlm import (tiny_idefics3, tiny_idefics3_processor, tiny_idefics3_tokenizer,  # noqa: F401
                      tiny_smolvlm, tiny_smolvlm_config, tiny_smolvlm_processor)


def _tables() -> dict[str, tuple]:
    """{model_type: (model builder, processor builder)} from every family file's ``TINY`` (read once)."""
    out: dict[str, tuple] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "common":
            continue
        for kind, builders in getattr(importlib.import_module(f"{__name__}.{info.name}"), "TINY", {}).items():
            if kind in out:
                raise RuntimeError(f"tiny model type {kind!r} declared twice (testing/{info.name}.py)")
            out[kind] = builders
    return out


_TINY = _tables()
# model_type -> tiny model builder: what tests build for every registered family
# (tests/test_testing.py checks that each model type of the adapter registry has one).
TINY_MODELS = {kind: model for kind, (model, _) in _TINY.items()}


def register_tiny(kind: str, model, processor) -> None:
    """Declare the tiny model and processor builders of ``kind`` (a model_type) from outside the package, as a family
    defined in a test does; a family of the package declares them in its file's ``TINY``."""
    if kind in _TINY:
        raise ValueError(f"tiny model type {kind!r} is already declared")
    _TINY[kind] = (model, processor)
    TINY_MODELS[kind] = model


def unregister_tiny(kind: str) -> None:
    """Undo `register_tiny`."""
    del _TINY[kind], TINY_MODELS[kind]


def _check_kind(kind: str, kinds=TINY_MODELS) -> str:
    if kind not in kinds:
        raise ValueError(f"kind must be one of {', '.join(map(repr, kinds))}, not {kind!r}")
    return kind


def tiny_model(kind: str = "llava", **kwargs):
    """The tiny model of a supported ``model_type`` (`TINY_MODELS`: one per registered family's model type)."""
    return TINY_MODELS[_check_kind(kind)](**kwargs)


def tiny_processor(kind: str = "llava"):
    """The processor matching ``kind``'s tiny model; it expands each image placeholder in the text to the count."""
    return _TINY[_check_kind(kind)][1]()


def save_tiny_checkpoint(path: str | os.PathLike, kind: str = "llava", seed: int = 0, **text_overrides) -> Path:
    """Write a tiny model + processor with ``save_pretrained``; load them back with ``from_pretrained(path)``."""
    path = Path(path)
    tiny_model(kind, seed=seed, **text_overrides).save_pretrained(path)
    tiny_processor(kind).save_pretrained(path)
    return path
