"""What differs between the transformers releases transprune runs on (5.16.1 through 5.24), each difference found
once, here, from the installed release's own code (its classes' fields and signatures; the form of what its
functions return), never from a version string; nothing else in the tree looks at the version.

1. The decoder's KV cache: 5.24 names it ``cache`` (argument and output field), earlier releases
   ``past_key_values``.
2. Qwen2-VL / Qwen2.5-VL mRoPE: before 5.17 the rotary embedding returns one (cos, sin) row per section
   (3, B, L, head_dim) and the attention composes them (``apply_multimodal_rotary_pos_emb(..., mrope_section)``);
   later the rotary embedding returns the composed (B, L, head_dim).
3. Per-image features: before 5.18 (Qwen3-VL DeepStack) and 5.20 (SmolVLM / Idefics3) an encoder returns one
   tensor of all rows where later releases return a tuple of per-image (per-sample) tensors.
4. Image processors without torchvision: before 5.18 `AutoImageProcessor` is a placeholder that needs
   torchvision; the PIL class of the saved type loads the same settings.
5. LLaVA-OneVision videos: before 5.18 `get_video_features` leaves each video's newline row for the forward to
   append (and takes ``pixel_values``, later ``pixel_values_videos``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from pathlib import Path

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

# 1. ------------------------------------------------------------------------------------------------------------
CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``: the keyword the installed decoders take."""
    return {CACHE: cache}


def cache_of(output):
    """The KV cache a model or decoder output carries."""
    return getattr(output, CACHE)


def decoder_output(last_hidden_state, cache, hidden_states) -> BaseModelOutputWithPast:
    return BaseModelOutputWithPast(last_hidden_state=last_hidden_state, hidden_states=hidden_states,
                                   **cache_kwargs(cache))


# 2. ------------------------------------------------------------------------------------------------------------
def attention_composes_mrope(modeling_module) -> bool:
    """Whether this Qwen-VL modeling module's attention composes the mRoPE sections itself (before 5.17)."""
    compose = getattr(modeling_module, "apply_multimodal_rotary_pos_emb", None)
    return compose is not None and "mrope_section" in inspect.signature(compose).parameters


def composed_mrope(cos: torch.Tensor, sin: torch.Tensor, sections) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, head_dim) cos / sin from per-section rows (3, B, L, head_dim): the head dimension's chunks (``sections``
    twice, for the two rotated halves) taken from the t, h, w rows in turn, as the old attention composed them."""
    chunks = list(sections) * 2
    return tuple(torch.cat([part[i % 3] for i, part in enumerate(x.split(chunks, dim=-1))], dim=-1) for x in (cos, sin))


def per_section(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Composed (B, L, head_dim) cos / sin as the old attention takes them: three equal rows, so its composition
    returns them unchanged."""
    return tuple(x[None].expand(3, *x.shape) for x in (cos, sin))


# 3. ------------------------------------------------------------------------------------------------------------
def rows_of(features) -> torch.Tensor:
    """All rows of an encoder's features, given as one tensor (older releases) or per image / sample."""
    return features if isinstance(features, torch.Tensor) else torch.cat(list(features))


def like(features, rows: torch.Tensor, sizes=None):
    """``rows`` in the form ``features`` came in: one tensor of its shape, or split as it was (``sizes``: the rows
    of each part; default: the parts' own lengths)."""
    if isinstance(features, torch.Tensor):
        return rows.reshape(features.shape)
    return type(features)(rows.split(sizes if sizes is not None else [len(x) for x in features]))


# 5. ------------------------------------------------------------------------------------------------------------
def newline_rows_left_to_the_forward(packed_rows: int, encoded_rows: int) -> int:
    """1 where an encoder returned one row fewer than the model's packing of the same video (its newline row, which
    the forward appends), else 0."""
    return int(encoded_rows == packed_rows - 1)


# 4. ------------------------------------------------------------------------------------------------------------
def load_image_processor(folder):
    """The image processor saved in ``folder``, without torchvision: `AutoImageProcessor` where the installed
    release resolves it without torchvision, else the PIL class of the saved ``image_processor_type``."""
    import transformers
    from transformers.utils.import_utils import DummyObject

    if not isinstance(transformers.AutoImageProcessor, DummyObject):
        return transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    folder = Path(folder)
    saved = {}
    if (folder / "preprocessor_config.json").is_file():
        saved = json.loads((folder / "preprocessor_config.json").read_text())
    elif (folder / "processor_config.json").is_file():
        saved = json.loads((folder / "processor_config.json").read_text()).get("image_processor", {})
    name = saved.get("image_processor_type", "").removesuffix("Pil").removesuffix("Fast") + "Pil"
    for model_type, names in IMAGE_PROCESSOR_MAPPING_NAMES.items():
        if name in (names.values() if isinstance(names, dict) else names):
            module = model_type_to_module_name(model_type)
            pil = importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}")
            return getattr(pil, name).from_pretrained(folder, local_files_only=True)
    raise ValueError(f"{folder}: no image processor class {name!r} that runs without torchvision in this transformers")
