"""Which layers an in-LLM method scores and prunes at, resolved for one decoder depth.

Layer numbers are 1-indexed and used as written: "prune at layer 7" runs ``layers[6]`` on the full
sequence, then drops image tokens from its output, on any model deep enough. A method config that sets
``reference_depth=N`` says its numbers were written for an N-layer decoder; they are then mapped
proportionally to the model's depth (the mini model's evaluation maps the papers' 32-layer settings).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Protocol


class InLLMSchedule(Protocol):
    accumulation_layers: tuple[int, ...]
    pruning_layers: tuple[int, ...]
    keep_ratios: tuple[float, ...]
    reference_depth: int | None


# The depth the papers' layer numbers are written for (LLaVA-1.5-7B's decoder).
PAPER_DEPTH = 32


def _is_named_preset(config) -> bool:
    return config.name in config.presets


def _map_layer(layer: int, depth: int, reference: int) -> int:
    return max(1, round(layer * depth / reference))


@dataclass(frozen=True)
class Schedule:
    """Layer numbers (1-indexed) resolved for one model depth."""

    depth: int
    accumulation_layers: tuple[int, ...]
    pruning_layers: tuple[int, ...]
    keep_ratios: tuple[float, ...]
    min_keep: int = 0  # a stage keeps at least this many image tokens (V2Drop's code keeps max(1, ...))
    rounding: str = "floor"  # how n * ratio becomes a count: "floor" (int), or "round" (FastV's code: round(n (1 - R)))

    def keep_count(self, n_image: int, stage: int) -> int:
        """Image tokens stage ``stage`` keeps of a sample's ``n_image``: ``int(n * ratio)`` (``round`` for a method whose
        code rounds), at least ``min_keep``.
        The planning count (`apply` refuses a schedule that keeps 0 of the model's nominal image; the FLOPs tool and
        `budget` count with it); a prefill keeps at least one token of a smaller image (`runtime_keep_count`)."""
        share = n_image * self.keep_ratios[stage]
        return min(n_image, max(self.min_keep, round(share) if self.rounding == "round" else int(share)))

    def runtime_keep_count(self, n_image: int, stage: int) -> int:
        """What a prefill keeps of a sample's ``n_image``: `keep_count`, but at least one token of a sample that has
        any (a small image, or few tokens left by a pre-LLM method, whose ratio rounds to 0 keeps one rather than
        losing the image)."""
        return max(min(n_image, 1), self.keep_count(n_image, stage))

    @classmethod
    def none(cls, depth: int) -> "Schedule":
        """No in-LLM stage."""
        return cls(depth, (), (), ())

    @classmethod
    def resolve(cls, config: InLLMSchedule, depth: int) -> "Schedule":
        acc, prune = tuple(config.accumulation_layers), tuple(config.pruning_layers)
        if not prune:
            acc = ()  # nothing is pruned, so nothing is scored
        ref = config.reference_depth
        field = config.layer_field  # the field the user wrote (FastV: k)
        written = f"{field}={getattr(config, field)!r} (as written)"
        if ref is not None and depth != ref and prune:
            # Proportional map, then push collisions apart so each pruning stage keeps its own layer.
            mapped = []
            for p in prune:
                q = _map_layer(p, depth, ref)
                if mapped:
                    q = max(q, mapped[-1] + 1)
                mapped.append(q)
            mapped_acc = sorted({_map_layer(a, depth, ref) for a in acc})
            if acc and acc[0] == prune[0] and acc[-1] == prune[-1]:
                # The paper's window spans exactly the pruning layers (7..12 for 7, 9, 12): keep that shape.
                mapped_acc = list(range(mapped[0], mapped[-1] + 1))
            prune, acc = tuple(mapped), tuple(mapped_acc)
            written = f"{field}={getattr(config, field)!r} (mapped from reference_depth={ref} to {prune})"
        if prune and prune[-1] >= depth and ref is None and _is_named_preset(config):
            # A named preset is the paper's setting, written for its 32-layer decoder: on a shallower model it is
            # mapped from that depth (said in a warning) rather than refused.
            mapped = cls.resolve(dataclasses.replace(config, reference_depth=PAPER_DEPTH), depth)
            warnings.warn(f"preset {config.name!r}: {written} does not fit a {depth}-layer decoder; mapped from the "
                          f"paper's {PAPER_DEPTH}-layer decoder to pruning_layers={mapped.pruning_layers} (pass "
                          f"reference_depth=N to choose; CLI: --set reference_depth=N)", stacklevel=4)
            return mapped
        if prune and prune[-1] >= depth:
            hint = (f"; pass reference_depth=N to map layer numbers written for an N-layer decoder (CLI: --set "
                    f"reference_depth=N; the papers' settings are written for N={PAPER_DEPTH})" if ref is None else "")
            raise ValueError(
                f"{written} do not fit a {depth}-layer decoder: every pruning layer must be "
                f"<= {depth - 1} (1-indexed), because scores may use the following layer{hint}")
        if acc and acc[-1] > depth:
            hint = ("; pass reference_depth=N to map layer numbers written for an N-layer decoder (CLI: --set "
                    "reference_depth=N)" if ref is None else "")
            raise ValueError(f"accumulation_layers {acc} do not fit a {depth}-layer decoder (1..{depth} allowed){hint}")
        return cls(depth, acc, prune, tuple(config.keep_ratios), config.min_keep, config.keep_rounding)

    def tokens_per_layer(self, n_image: int, kept: list[int] | None = None) -> list[int]:
        """Image tokens each layer processes in prefill, for a sample with ``n_image`` image tokens (after
        any pre-LLM stage); ``kept``: the counts each stage actually kept (default: the keep ratios')."""
        counts, current = [], n_image
        stages = {layer: i for i, layer in enumerate(self.pruning_layers)}
        for layer in range(1, self.depth + 1):
            counts.append(current)
            if layer in stages:
                i = stages[layer]
                if kept is None:
                    current = self.keep_count(n_image, i)
                elif i < len(kept):
                    current = kept[i]
        return counts

