"""A family adapter whose transformers classes no release has yet (for the registry's unavailable-family test)."""

from transformers import Qwen9VLForConditionalGeneration  # noqa: F401

from transprune.adapters.base import ModelAdapter


class FutureAdapter(ModelAdapter):
    family = "future"
    model_types = ("qwen9_vl",)
