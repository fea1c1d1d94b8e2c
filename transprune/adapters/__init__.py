"""Model families, one adapter each, behind one registry that every tool reads (runtime, CLI, flops,
bench, testing). A new family is one file: a `ModelAdapter` subclass and a ``FAMILY`` declaration, which
`discover` finds (plus its tiny model in ``testing/<family>.py``)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from collections.abc import Mapping

import transformers

from .base import ModelAdapter

FAMILIES: list[type[ModelAdapter]] = []
# model_type -> why its family is not available with the installed transformers (its classes are missing)
UNAVAILABLE: dict[str, str] = {}


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


def load_family(module: str, adapter: str, model_types: tuple[str, ...], since: str) -> type[ModelAdapter] | None:
    """Import and register a family's adapter; where the installed transformers lacks its classes (a release
    before ``since``), record it in `UNAVAILABLE` under its ``model_types`` instead of failing at import."""
    try:
        adapter_cls = getattr(importlib.import_module(module, __name__), adapter)
    except ImportError as error:
        if not (error.name or "").startswith("transformers"):  # not a class missing from transformers: a real error
            raise
        for model_type in model_types:
            UNAVAILABLE[model_type] = (f"needs transformers >= {since}, and {transformers.__version__} is installed "
                                       f"({error})")
        return None
    return register_family(adapter_cls)


def discover() -> list[tuple[str, dict]]:
    """(module, its ``FAMILY`` declaration) of every family module in this package, in their declared order, read
    from the module's source through its loader (not imported: a module whose transformers classes are missing is
    still named; any install the loader reads from works, a wheel or a zip)."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        spec = importlib.util.find_spec(f"{__name__}.{info.name}")
        source = spec.loader.get_source(spec.name) if spec is not None and spec.loader is not None else None
        for node in ast.parse(source).body if source is not None else ():
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            if [getattr(t, "id", None) for t in targets] == ["FAMILY"] and node.value is not None:
                found.append((f".{info.name}", ast.literal_eval(node.value)))
    if not found:  # an install without sources (compiled only) cannot be read this way: say so, not "unsupported"
        raise RuntimeError(f"no module of {__name__} declares FAMILY, or their sources cannot be read (a compiled-only "
                           "install): install transprune with its .py files")
    return sorted(found, key=lambda item: (item[1].get("order", 1000), item[0]))


# Every family module with a FAMILY declaration, registered in its declared order (all within the tested range,
# 5.16.1-5.24: a family added later declares a later release): adding a family is its file, nothing here.
for _module, _facts in discover():
    load_family(_module, _facts["adapter"], tuple(_facts["model_types"]), _facts["since"])


def named_archs() -> dict:
    """{name: (family, config builder, reduced?)} of every registered family's own `archs` and `reduced_archs`, in
    registry order: what flops (`ARCHS`) and bench (`CONFIGS`, `REDUCED`) name."""
    out = {}
    for family in FAMILIES:
        own = vars(family)  # declared by this family, not inherited from the one it specialises
        for reduced, table in ((False, own.get("archs", {})), (True, own.get("reduced_archs", {}))):
            for name, build in table.items():
                if name in out:
                    raise ValueError(f"arch {name!r} is declared by {out[name][0].__name__} and {family.__name__}")
                out[name] = (family, build, reduced)
    return out


class ArchTable(Mapping):
    """A live, read-only view of `named_archs` (a family registered later, or an arch table replaced, is seen at the
    next access): ``kind`` "full" or "reduced" (None: both); each entry is ``convert(family, build, name)``, made
    when it is first read and kept for as long as that family declares that same builder."""

    def __init__(self, convert, kind: str | None = None):
        self._convert, self._kind, self._made = convert, kind, {}

    def _entries(self) -> dict:
        wanted = {None: (False, True), "full": (False,), "reduced": (True,)}[self._kind]
        return {name: (family, build) for name, (family, build, reduced) in named_archs().items() if reduced in wanted}

    def __getitem__(self, name):
        family, build = self._entries()[name]
        key = (name, family, build)
        if key not in self._made:
            self._made[key] = self._convert(family, build, name)
        return self._made[key]

    def __contains__(self, name) -> bool:
        return name in self._entries()

    def __iter__(self):
        return iter(self._entries())

    def __len__(self):
        return len(self._entries())

    def __repr__(self):
        return f"ArchTable({list(self)})"


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
    if model_type in UNAVAILABLE:
        raise ValueError(f"{where + ': ' if where else ''}model_type {model_type!r} {UNAVAILABLE[model_type]}")
    raise ValueError(f"{where + ': ' if where else ''}model_type {model_type!r} is not supported; supported: "
                     f"{', '.join(supported_model_types())}")
