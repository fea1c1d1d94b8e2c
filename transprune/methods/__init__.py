"""Pruning methods, one module each (config + scorer + cost), behind one registry (`METHODS`).

In the LLM: TransPrune, FastV, PDrop, DART, V2Drop, and the random / uniform baselines; before it: VisionZip
(vision-tower hooks), DivPrune and CDPruner (on the LLM's input embeddings).
Compositions (one pre-LLM + one in-LLM config, as a list) and named presets are built here from the
registry, so the CLI, flops, bench and the mini suite share one grammar.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# Each module registers its method; this order is the order tools list them in.
from . import transprune, fastv, pdrop, dart, v2drop, visionzip, divprune, cdpruner, baselines  # noqa: F401,I001
from .base import (METHODS, POSITION_RULES, InLLMMethod, OnEmbeddings, OnVisionTower, PreLLMMethod, StageView,
                   register_method, unregister_method)
from .baselines import RandomConfig, UniformConfig
from .cdpruner import CDPrunerConfig
from .dart import DARTConfig
from .divprune import DivPruneConfig
from .fastv import FastVConfig
from .pdrop import PDropConfig
from .transprune import PRESETS, REFERENCE_DEPTH, TransPruneConfig
from .v2drop import V2DropConfig
from .visionzip import VisionZipConfig

__all__ = ["METHODS", "POSITION_RULES", "InLLMMethod", "StageView", "register_method", "unregister_method", "TransPruneConfig",
           "FastVConfig", "PDropConfig", "RandomConfig", "UniformConfig", "VisionZipConfig", "DARTConfig", "V2DropConfig",
           "DivPruneConfig", "CDPrunerConfig", "REFERENCE_DEPTH",
           "COMPOSITIONS", "preset", "build", "Plan", "split_methods", "PreLLMMethod", "OnEmbeddings", "OnVisionTower", "as_list", "default_preset", "all_presets"]


def as_list(config) -> list:
    """One config, a composition or a `Plan`, as a list of its methods."""
    if isinstance(config, Plan):
        return config.methods
    return list(config) if isinstance(config, (list, tuple)) else [config]


@dataclass(frozen=True)
class Plan:
    """A composition, split once and carried everywhere (apply, the handle, flops, budget, the CLI): at most one
    pre-LLM method and one in-LLM method. ``config`` is what the user gave (one config or a list), kept for
    reports."""

    pre: PreLLMMethod | None
    llm: InLLMMethod | None
    config: object

    @classmethod
    def of(cls, config) -> "Plan":
        """The plan of one config, a list of them, or a plan (returned as it is); raises naming what is wrong."""
        if isinstance(config, Plan):
            return config
        items = as_list(config)
        known = tuple(METHODS.values())
        unknown = [c for c in items if not isinstance(c, known)]
        if unknown or not items:
            names = ", ".join(c.__name__ for c in known)
            raise TypeError(f"config must be one of {names} (or a list: at most one pre-LLM and one in-LLM), "
                            f"got {[type(c).__name__ for c in unknown] or 'nothing'}")
        pre = [c for c in items if c.stage == "pre"]
        llm = [c for c in items if c.stage == "in"]
        if len(pre) > 1 or len(llm) > 1:
            raise ValueError("a composition takes at most one pre-LLM method (VisionZip, DivPrune, CDPruner) and one "
                             "in-LLM method")
        return cls(pre[0] if pre else None, llm[0] if llm else None, config)

    @property
    def methods(self) -> list:
        """The methods in the order they run."""
        return [c for c in (self.pre, self.llm) if c is not None]

    @property
    def names(self) -> str:
        return "+".join(c.method for c in self.methods)

    def with_llm(self, llm) -> "Plan":
        """This plan with its in-LLM method replaced (``config`` in the same shape)."""
        config = (type(self.config)(llm if c is self.llm else c for c in self.config)
                  if isinstance(self.config, (list, tuple)) else llm)
        return Plan(self.pre, llm, config)

    def resolved_for(self, family) -> "Plan":
        """This plan with its in-LLM method's position rule as it runs on ``family`` (an adapter class or
        instance): a rule left at the method's default becomes the family's own; an explicit rule the family
        cannot honour raises, saying why. `apply` does this; the FLOPs tool and the bench report the result."""
        import dataclasses

        from .base import is_default_rule

        if self.llm is None:
            return self
        rule = family.resolve_position_rule(self.llm.positions, is_default_rule(self.llm.positions))
        if rule == self.llm.positions:  # kept as given (a defaulted rule stays marked as such)
            return self
        return self.with_llm(dataclasses.replace(self.llm, positions=rule))


def split_methods(config) -> tuple[object | None, object | None]:
    """(pre-LLM config or None, in-LLM config or None) from one config or a list of them (`Plan.of`)."""
    plan = Plan.of(config)
    return plan.pre, plan.llm


# Paper Tables 4/5: VisionZip to 288 / 192 tokens, then TransPrune to 36 / 24 (ratios of the reduced count). The
# counts are LLaVA-1.5's (of 576 patches): on another unit size they are that share of it (reference_tokens).
_VZ_TRANSPRUNE = dict(keep_ratios=(0.5, 0.25, 0.125))
COMPOSITIONS = {
    "visionzip288+transprune": lambda: [VisionZipConfig(256, 32, reference_tokens=576), TransPruneConfig(**_VZ_TRANSPRUNE, name="visionzip288+transprune")],
    "visionzip192+transprune": lambda: [VisionZipConfig(162, 30, reference_tokens=576), TransPruneConfig(**_VZ_TRANSPRUNE, name="visionzip192+transprune")],
    # The paper's CDPruner + TransPrune rows (0.66 / 0.44 TFLOPs): CDPruner to 288 / 192 tokens, then the same ratios.
    "cdpruner288+transprune": lambda: [CDPrunerConfig(288 / 576), TransPruneConfig(**_VZ_TRANSPRUNE, name="cdpruner288+transprune")],
    "cdpruner192+transprune": lambda: [CDPrunerConfig(192 / 576), TransPruneConfig(**_VZ_TRANSPRUNE, name="cdpruner192+transprune")],
}


def preset(name: str):
    """A named setting: a composition (returns a list), or the preset of the one method that has it (TransPrune's
    high/low/off, V2Drop's llava/qwen, ...); a name two methods share asks for ``METHOD-PRESET`` (`build`)."""
    if name in COMPOSITIONS:
        return COMPOSITIONS[name]()
    method, _, own = name.rpartition("-")
    if method in METHODS and own in METHODS[method].presets:  # "dart-192": the method's preset by its full name
        return METHODS[method].preset(own)
    owners = _owners(name)
    if len(owners) == 1:
        return METHODS[owners[0]].preset(name)
    if owners:
        raise ValueError(f"preset {name!r} is one of {' and '.join(owners)}'s: name the method, e.g. "
                         f"{owners[0] + '-' + name!r}")
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(map(repr, all_presets()))}")


def _owners(preset_name) -> list[str]:
    """The registered methods that have a preset of this name."""
    return [n for n, cls in METHODS.items() if preset_name in cls.presets]


def all_presets() -> list[str]:
    """Every registered method's preset names and the compositions, in registry order (the CLI's --preset)."""
    names = [p for cls in METHODS.values() for p in cls.presets]
    return list(dict.fromkeys(names + list(COMPOSITIONS)))


def default_preset(name: str) -> str | None:
    """The preset a bare method name stands for (its first named setting), or None for a method without presets."""
    return METHODS[name].default_preset()


def _parse_value(text: str):
    """'8,16,24' -> (8, 16, 24); '0.5' -> 0.5; '2' -> 2; 'none' -> None; 'true' / 'false' -> bools; anything else
    stays a string."""
    if "," in text:
        return tuple(_parse_value(t) for t in text.split(",") if t)
    if text.lower() in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def spelling() -> str:
    """The method grammar every tool shares, for help texts and errors."""
    with_presets = [f"{n}-{p}" for n in METHODS for p in METHODS[n].presets]
    return (f"METHOD or METHOD-PRESET ({', '.join(with_presets)}), composed with '+' "
            f"(e.g. visionzip+transprune), or a named composition ({', '.join(COMPOSITIONS)}); "
            f"methods: {', '.join(METHODS)}")


def parse_spec(spec: str) -> list[tuple[str, str | None]]:
    """``"visionzip+transprune-low"`` -> [("visionzip", None), ("transprune", "low")]: the one method grammar of
    the Python API and every subcommand (``,`` only separates the entries of a list, as in ``--methods``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a method is a non-empty string: {spelling()}")
    if "," in spec:
        raise ValueError(f"{spec!r}: compose methods with '+', e.g. {'+'.join(s.strip() for s in spec.split(','))!r} "
                         "(',' separates the entries of a list, as in --methods)")
    items = []
    for text in (t.strip() for t in spec.split("+")):
        name, _, suffix = text.rpartition("-")
        if text in METHODS:
            items.append((text, None))
        elif name in METHODS and suffix in METHODS[name].presets:
            items.append((name, suffix))
        else:
            raise ValueError(f"unknown method {text!r} in {spec!r}; use {spelling()}")
    return items


def build(methods: str | None = None, preset_name: str | None = None, params: dict[str, str] | None = None):
    """A config (or composition list) from a method spec such as ``"visionzip+transprune"`` or
    ``"transprune-low"`` (see `parse_spec`), an optional preset (one of `all_presets`: it applies to the methods
    that have it, as TransPrune's high/low/off or V2Drop's qwen; or a composition name) and ``field=value`` overrides, each applied to the method that has
    that field. Raises ValueError naming the allowed values."""
    params = dict(params or {})
    if preset_name in COMPOSITIONS and methods not in (None, preset_name):
        raise ValueError(f"--preset {preset_name!r} is a named composition of its own methods; it cannot apply to "
                         f"{methods!r} (give one of them)")
    if methods is None and preset_name not in COMPOSITIONS and preset_name is not None:  # --preset alone: its method's
        owners = _owners(preset_name)
        methods = owners[0] if len(owners) == 1 else None
    methods = "transprune" if methods is None else methods
    if methods in COMPOSITIONS or preset_name in COMPOSITIONS:
        if methods in COMPOSITIONS and preset_name not in (None, methods):
            raise ValueError(f"{methods!r} is a named composition: it takes no --preset (got {preset_name!r})")
        configs = preset(methods if methods in COMPOSITIONS else preset_name)
    else:
        items = parse_spec(methods)
        if preset_name is not None and not any(preset_name in METHODS[n].presets for n, _ in items):
            theirs = {n: list(METHODS[n].presets) for n, _ in items if METHODS[n].presets}
            raise ValueError(f"--preset {preset_name!r} is no preset of {'+'.join(n for n, _ in items)}"
                             + (f"; theirs: {theirs}" if theirs else " (it has none)")
                             + f"; presets: {', '.join(all_presets())}")
        sharing = [n for n, own in items if own is None and preset_name in METHODS[n].presets]
        if len(sharing) > 1:
            raise ValueError(f"--preset {preset_name!r} is a preset of {' and '.join(sharing)}: name it on the one it is "
                             f"for, e.g. {'+'.join(f'{n}-{preset_name}' if n == sharing[0] else n for n, _ in items)!r}")
        for name, own in items:
            if own is not None and preset_name in METHODS[name].presets and own != preset_name:
                raise ValueError(f"{name}-{own} names preset {own!r} but --preset says {preset_name!r}: give one")
        # each method takes the preset it was named with, else --preset where it is one of its own, else its first
        configs = [METHODS[n].preset(own or (preset_name if preset_name in METHODS[n].presets else None)
                                     or default_preset(n)) if METHODS[n].presets else METHODS[n]() for n, own in items]
    used = set()
    for i, cfg in enumerate(configs):
        names = {f.name for f in fields(cfg)}
        mine = {k: _parse_value(v) for k, v in params.items() if k in names}
        # a single value for a sequence field (--set keep_ratios=0.5 on a one-stage schedule)
        mine = {k: (v,) if isinstance(getattr(cfg, k), tuple) and not isinstance(v, tuple) else v for k, v in mine.items()}
        used |= mine.keys()
        if mine:
            configs[i] = type(cfg)(**{**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, **mine})
    if set(params) - used:
        allowed = sorted({f.name for cfg in configs for f in fields(cfg)} - {"name"})
        raise ValueError(f"unknown parameter(s) {sorted(set(params) - used)} for {'+'.join(c.method for c in configs)}; "
                         f"allowed: {', '.join(allowed)}")
    Plan.of(configs)  # at most one method of each stage
    return configs[0] if len(configs) == 1 else configs
