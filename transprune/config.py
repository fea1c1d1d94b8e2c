"""TransPrune configuration: a validated dataclass, named presets, and the per-model schedule.

Layer numbers are 1-indexed, as in the paper: "prune at layer 7" means run ``layers[6]`` on the
full sequence, then drop image tokens from its output. Keep ratios are fractions of the ORIGINAL
image-token count of each sample (../shared/method.md §6.1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

DIRECTIONS = ("1-cos", "1-abs-cos")
POSITION_RULES = ("compact", "original")
SCORES = ("transprune", "ttv", "iga")
PRESETS = ("high", "low", "off")

# Presets are written for a 32-layer decoder (LLaVA-1.5-7B / LLaVA-NeXT-7B).
REFERENCE_DEPTH = 32
_PRESET_FIELDS = {
    "high": dict(keep_ratios=(0.875, 0.625, 0.125)),
    # Inferred in method.md §6.1: the only 1/16-grid schedule that reproduces 1.19 and 6.41 TFLOPs.
    "low": dict(keep_ratios=(0.625, 0.1875, 0.0625)),
    "off": dict(pruning_layers=(), keep_ratios=()),
}


def _as_int_tuple(name: str, value) -> tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of layer numbers (1-indexed ints), got {value!r}") from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name} must hold ints (1-indexed layer numbers), got {item!r}")
    return items


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class TransPruneConfig:
    """Token Transition Variation + Instruction-Guided Attention pruning inside the LLM.

    Defaults are the paper's TransPrune-High schedule (= ``preset("high")``) with the official code's
    choices for the points where paper and code differ (``direction``, ``positions``).
    """

    accumulation_layers: tuple[int, ...] = (7, 8, 9, 10, 11, 12)
    pruning_layers: tuple[int, ...] = (7, 9, 12)
    keep_ratios: tuple[float, ...] = (0.875, 0.625, 0.125)
    alpha: float = 0.5
    direction: str = "1-cos"
    positions: str = "compact"
    score: str = "transprune"
    # Depth the layer numbers are written for. Another depth maps them proportionally (see
    # `layers_for_depth`); None means the numbers are absolute for whatever model they are applied to.
    reference_depth: int | None = REFERENCE_DEPTH
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        acc = _as_int_tuple("accumulation_layers", self.accumulation_layers)
        prune = _as_int_tuple("pruning_layers", self.pruning_layers)
        try:
            ratios = tuple(float(r) for r in self.keep_ratios)
        except (TypeError, ValueError):
            raise TypeError(f"keep_ratios must be a sequence of floats in (0, 1], got {self.keep_ratios!r}") from None
        object.__setattr__(self, "accumulation_layers", acc)
        object.__setattr__(self, "pruning_layers", prune)
        object.__setattr__(self, "keep_ratios", ratios)

        if self.reference_depth is not None and (
            isinstance(self.reference_depth, bool) or not isinstance(self.reference_depth, int) or self.reference_depth < 2
        ):
            raise ValueError(f"reference_depth must be an int >= 2 or None, got {self.reference_depth!r}")
        top = self.reference_depth
        for name, layers in (("accumulation_layers", acc), ("pruning_layers", prune)):
            if any(b <= a for a, b in zip(layers, layers[1:])):
                raise ValueError(f"{name} must be strictly increasing, got {layers}")
            if layers and layers[0] < 1:
                raise ValueError(f"{name} are 1-indexed layer numbers (>= 1), got {layers}")
            if top is not None and layers and layers[-1] > top:
                raise ValueError(f"{name} must be <= reference_depth={top}, got {layers}")
        if top is not None and prune and prune[-1] >= top:
            raise ValueError(
                f"pruning_layers must be < reference_depth={top} (IGA needs the next layer), got {prune}"
            )
        if len(ratios) != len(prune):
            raise ValueError(
                f"keep_ratios needs one ratio per pruning layer: {len(prune)} pruning_layers {prune} "
                f"but {len(ratios)} keep_ratios {ratios}"
            )
        for r in ratios:
            if not 0.0 < r <= 1.0:
                raise ValueError(f"keep_ratios must lie in (0, 1] (fractions of the original count), got {ratios}")
        if any(b > a for a, b in zip(ratios, ratios[1:])):
            raise ValueError(f"keep_ratios must not increase from one pruning layer to the next, got {ratios}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        _choice("direction", self.direction, DIRECTIONS)
        _choice("positions", self.positions, POSITION_RULES)
        _choice("score", self.score, SCORES)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TransPruneConfig":
        """``high`` (paper defaults), ``low`` (ratios .625/.1875/.0625), or ``off`` (no pruning)."""
        if name not in _PRESET_FIELDS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(map(repr, PRESETS))}")
        return cls(**{**_PRESET_FIELDS[name], "name": name, **overrides})

    method = "transprune"

    @property
    def scorer(self) -> str:
        return self.score

    @property
    def enabled(self) -> bool:
        return bool(self.pruning_layers)

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}

    def layers_for_depth(self, depth: int) -> "Schedule":
        """Resolve the layer numbers for a decoder with ``depth`` layers (raises before any change)."""
        return Schedule.resolve(self, depth)


def _map_layer(layer: int, depth: int, reference: int) -> int:
    return max(1, round(layer * depth / reference))


@dataclass(frozen=True)
class Schedule:
    """Layer numbers (1-indexed) resolved for one model depth."""

    depth: int
    accumulation_layers: tuple[int, ...]
    pruning_layers: tuple[int, ...]
    keep_ratios: tuple[float, ...]

    @classmethod
    def resolve(cls, config: TransPruneConfig, depth: int) -> "Schedule":
        acc, prune = config.accumulation_layers, config.pruning_layers
        if not prune:
            acc = ()  # nothing is pruned, so nothing is scored
        ref = config.reference_depth
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
        if prune and prune[-1] >= depth:
            raise ValueError(
                f"pruning_layers {prune} do not fit a {depth}-layer decoder: every pruning layer must be "
                f"<= {depth - 1} (1-indexed), because IGA uses the following layer"
            )
        if acc and acc[-1] > depth:
            raise ValueError(f"accumulation_layers {acc} do not fit a {depth}-layer decoder (1..{depth} allowed)")
        return cls(depth, acc, prune, config.keep_ratios)

    def tokens_per_layer(self, n_image: int) -> list[int]:
        """Image tokens each layer processes in prefill, for a sample with ``n_image`` image tokens."""
        counts, current = [], n_image
        stages = dict(zip(self.pruning_layers, self.keep_ratios))
        for layer in range(1, self.depth + 1):
            counts.append(current)
            if layer in stages:
                current = int(n_image * stages[layer])
        return counts
