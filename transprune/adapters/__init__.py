"""Model adapters: per-family knowledge (where image tokens are, how a decoder layer runs)."""

from __future__ import annotations

from .llava import LlavaAdapter

ADAPTERS = [LlavaAdapter]


def adapter_for(model):
    for adapter in ADAPTERS:
        if isinstance(model, adapter.model_classes):
            return adapter(model)
    supported = ", ".join(cls.__name__ for a in ADAPTERS for cls in a.model_classes)
    raise TypeError(f"transprune does not support {type(model).__name__}; supported model classes: {supported}")
