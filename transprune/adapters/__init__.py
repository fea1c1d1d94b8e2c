"""Model families, one adapter each, behind one registry that every tool reads (runtime, CLI, flops,
bench, testing). A new family is one file: a `ModelAdapter` subclass and a `register_family` call."""

from __future__ import annotations

from .base import ModelAdapter
from .gemma3 import Gemma3Adapter
from .llava import LlavaAdapter
from .internvl import InternVLAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .smolvlm import SmolVLMAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter

FAMILIES: list[type[ModelAdapter]] = []


def register_family(adapter_cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Make a family known to every tool: its model classes (for `apply`) and model_types (for configs)."""
    taken = {t for a in FAMILIES if a is not adapter_cls for t in a.model_types}
    if taken & set(adapter_cls.model_types):
        raise ValueError(f"model_type(s) {sorted(taken & set(adapter_cls.model_types))} are already registered")
    if adapter_cls not in FAMILIES:
        FAMILIES.append(adapter_cls)
    return adapter_cls


def unregister_family(adapter_cls: type[ModelAdapter]) -> None:
    """Undo `register_family` (tests register families of their own)."""
    FAMILIES.remove(adapter_cls)


register_family(LlavaAdapter)
register_family(LlavaOnevisionAdapter)
register_family(SmolVLMAdapter)
register_family(InternVLAdapter)
register_family(Gemma3Adapter)
register_family(Qwen2VLAdapter)
register_family(Qwen3VLAdapter)


def supported_model_classes() -> list[str]:
    return [cls.__name__ for a in FAMILIES for cls in a.model_classes]


def supported_model_types() -> list[str]:
    return [t for a in FAMILIES for t in a.model_types]


def adapter_for(model) -> ModelAdapter:
    """The adapter of ``model``'s family (the most specific class match wins)."""
    for adapter in reversed(FAMILIES):  # later registrations may specialise earlier ones
        if isinstance(model, adapter.model_classes):
            return adapter(model)
    raise TypeError(f"transprune does not support {type(model).__name__}; supported model classes: "
                    f"{', '.join(supported_model_classes())}")


def family_for(model_type: str, where: str | None = None) -> type[ModelAdapter]:
    """The adapter class for an HF ``config.model_type`` (raises naming the supported ones)."""
    for adapter in FAMILIES:
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(f"{where + ': ' if where else ''}model_type {model_type!r} is not supported; supported: "
                     f"{', '.join(supported_model_types())}")
