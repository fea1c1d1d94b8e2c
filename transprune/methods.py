"""The peers as configs of the same runtime: FastV, PDrop, random and uniform baselines (in the LLM),
VisionZip (before the LLM), and compositions such as VisionZip + TransPrune.

Every in-LLM config exposes the same four fields as `TransPruneConfig` (accumulation_layers,
pruning_layers, keep_ratios, reference_depth), so one `Schedule` and one decoder loop serve them all;
`scorer` says how image tokens are ranked at each pruning layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import POSITION_RULES, REFERENCE_DEPTH, Schedule, TransPruneConfig, _as_int_tuple, _choice


class _InLLM:
    """Shared behaviour of in-LLM method configs."""

    accumulation_layers: tuple[int, ...] = ()
    name = "custom"

    @property
    def enabled(self) -> bool:
        return bool(self.pruning_layers)

    def layers_for_depth(self, depth: int) -> Schedule:
        return Schedule.resolve(self, depth)

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


def _check_layers(name, layers, reference_depth):
    layers = _as_int_tuple(name, layers)
    if any(b <= a for a, b in zip(layers, layers[1:])) or (layers and layers[0] < 1):
        raise ValueError(f"{name} must be strictly increasing 1-indexed layer numbers, got {layers}")
    if reference_depth is not None and layers and layers[-1] >= reference_depth:
        raise ValueError(f"{name} must be < reference_depth={reference_depth}, got {layers}")
    return layers


def _check_fraction(name, value, low_open=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1 if low_open else 0 <= value < 1):
        allowed = "(0, 1]" if low_open else "[0, 1)"
        raise ValueError(f"{name} must be a number in {allowed}, got {value!r}")


@dataclass(frozen=True)
class FastVConfig(_InLLM):
    """FastV: after layer ``k`` (1-indexed), drop the fraction ``r`` of image tokens that the last token
    attends to least, using layer k's own attention (recomputed from its q and k)."""

    k: int = 2
    r: float = 0.5
    positions: str = "original"  # the official FastV keeps the kept tokens' position ids
    reference_depth: int | None = REFERENCE_DEPTH
    method = "fastv"
    scorer = "fastv"

    def __post_init__(self):
        _check_layers("k", (self.k,), self.reference_depth)
        _choice("positions", self.positions, POSITION_RULES)
        _check_fraction("r", self.r, low_open=False)

    @property
    def pruning_layers(self):
        return (self.k,)

    @property
    def keep_ratios(self):
        return (1.0 - self.r,)


@dataclass(frozen=True)
class PDropConfig(_InLLM):
    """PyramidDrop: after each of ``layers`` keep ``ratio`` of the tokens left, ranked by the last
    instruction token's attention with the next layer's weights (the official rule)."""

    layers: tuple[int, ...] = (8, 16, 24)
    ratio: float = 0.5
    positions: str = "compact"  # PDrop renumbers positions after each drop
    reference_depth: int | None = REFERENCE_DEPTH
    method = "pdrop"
    scorer = "pdrop"

    def __post_init__(self):
        _choice("positions", self.positions, POSITION_RULES)
        object.__setattr__(self, "layers", _check_layers("layers", self.layers, self.reference_depth))
        _check_fraction("ratio", self.ratio)

    @property
    def pruning_layers(self):
        return self.layers

    @property
    def keep_ratios(self):
        return tuple(self.ratio ** (i + 1) for i in range(len(self.layers)))


@dataclass(frozen=True)
class _Baseline(_InLLM):
    # Defaults: TransPrune-High's schedule, so a baseline costs exactly what TransPrune costs.
    pruning_layers: tuple[int, ...] = (7, 9, 12)
    keep_ratios: tuple[float, ...] = (0.875, 0.625, 0.125)
    positions: str = "compact"
    reference_depth: int | None = REFERENCE_DEPTH

    def __post_init__(self):
        _choice("positions", self.positions, POSITION_RULES)
        TransPruneConfig(accumulation_layers=(), pruning_layers=self.pruning_layers, keep_ratios=self.keep_ratios,
                         reference_depth=self.reference_depth)  # same validation and messages
        object.__setattr__(self, "pruning_layers", tuple(self.pruning_layers))
        object.__setattr__(self, "keep_ratios", tuple(float(r) for r in self.keep_ratios))


@dataclass(frozen=True)
class RandomConfig(_Baseline):
    """Keep a seeded random subset (the same for a sample alone or in a batch)."""

    seed: int = 0
    method = "random"
    scorer = "random"


@dataclass(frozen=True)
class UniformConfig(_Baseline):
    """Keep a spatially even subset of the image grid (farthest-point order from the centre)."""

    method = "uniform"
    scorer = "uniform"


@dataclass(frozen=True)
class VisionZipConfig:
    """VisionZip, before the LLM: per image keep the ``dominant`` patches with the most CLS attention in
    the vision feature layer and merge the rest into ``contextual`` tokens (by key similarity)."""

    dominant: int = 54
    contextual: int = 10
    method = "visionzip"

    def __post_init__(self):
        for name in ("dominant", "contextual"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.dominant + self.contextual == 0:
            raise ValueError("dominant + contextual must be >= 1 (tokens kept per image)")

    @property
    def tokens(self) -> int:
        return self.dominant + self.contextual

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


IN_LLM = (TransPruneConfig, FastVConfig, PDropConfig, RandomConfig, UniformConfig)
PRE_LLM = (VisionZipConfig,)


def split_methods(config) -> tuple[VisionZipConfig | None, object | None]:
    """(pre-LLM config or None, in-LLM config or None) from one config or a list of them."""
    items = list(config) if isinstance(config, (list, tuple)) else [config]
    pre = [c for c in items if isinstance(c, PRE_LLM)]
    llm = [c for c in items if isinstance(c, IN_LLM)]
    unknown = [c for c in items if not isinstance(c, PRE_LLM + IN_LLM)]
    if unknown or not items:
        names = ", ".join(c.__name__ for c in PRE_LLM + IN_LLM)
        raise TypeError(f"config must be one of {names} (or a list: at most one pre-LLM and one in-LLM), "
                        f"got {[type(c).__name__ for c in unknown] or 'nothing'}")
    if len(pre) > 1 or len(llm) > 1:
        raise ValueError("a composition takes at most one pre-LLM method (VisionZip) and one in-LLM method")
    return (pre[0] if pre else None), (llm[0] if llm else None)


# Paper Tables 4/5: VisionZip to 288 / 192 tokens, then TransPrune to 36 / 24 (ratios of the reduced count).
_VZ_TRANSPRUNE = dict(keep_ratios=(0.5, 0.25, 0.125))
COMPOSITIONS = {
    "visionzip288+transprune": lambda: [VisionZipConfig(256, 32), TransPruneConfig(**_VZ_TRANSPRUNE, name="visionzip288+transprune")],
    "visionzip192+transprune": lambda: [VisionZipConfig(162, 30), TransPruneConfig(**_VZ_TRANSPRUNE, name="visionzip192+transprune")],
}

METHODS = {
    "transprune": TransPruneConfig,
    "fastv": FastVConfig,
    "pdrop": PDropConfig,
    "visionzip": VisionZipConfig,
    "random": RandomConfig,
    "uniform": UniformConfig,
}


def preset(name: str):
    """A named method setting: TransPrune's high/low/off, or a composition (returns a list)."""
    if name in COMPOSITIONS:
        return COMPOSITIONS[name]()
    if name in ("high", "low", "off"):
        return TransPruneConfig.preset(name)
    raise ValueError(f"unknown preset {name!r}; choose one of 'high', 'low', 'off', {', '.join(map(repr, COMPOSITIONS))}")


def _parse_value(text: str):
    """'8,16,24' -> (8, 16, 24); '0.5' -> 0.5; '2' -> 2; 'none' -> None; anything else stays a string."""
    if "," in text:
        return tuple(_parse_value(t) for t in text.split(",") if t)
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build(methods: str = "transprune", preset_name: str | None = None, params: dict[str, str] | None = None):
    """A config (or composition list) from a method list such as ``"visionzip,transprune"``, an optional
    preset (TransPrune's high/low/off, or a composition name) and ``field=value`` overrides, each applied
    to the method that has that field. Raises ValueError naming the allowed values."""
    from dataclasses import fields

    params = dict(params or {})
    if preset_name in COMPOSITIONS:
        configs = preset(preset_name)
    else:
        names = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = [n for n in names if n not in METHODS]
        if unknown or not names:
            raise ValueError(f"unknown method {unknown or methods!r}; choose from {', '.join(METHODS)} "
                             f"(comma-separated to compose, e.g. visionzip,transprune)")
        if preset_name is not None and "transprune" not in names:
            raise ValueError(f"--preset {preset_name!r} applies to transprune; the methods are {names}")
        configs = [TransPruneConfig.preset(preset_name or "high") if n == "transprune" else METHODS[n]() for n in names]
    used = set()
    for i, cfg in enumerate(configs):
        names = {f.name for f in fields(cfg)}
        mine = {k: _parse_value(v) for k, v in params.items() if k in names}
        used |= mine.keys()
        if mine:
            configs[i] = type(cfg)(**{**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, **mine})
    if set(params) - used:
        allowed = sorted({f.name for cfg in configs for f in fields(cfg)} - {"name"})
        raise ValueError(f"unknown parameter(s) {sorted(set(params) - used)} for {'+'.join(c.method for c in configs)}; "
                         f"allowed: {', '.join(allowed)}")
    split_methods(configs)
    return configs[0] if len(configs) == 1 else configs
