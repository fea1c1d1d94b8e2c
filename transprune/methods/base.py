"""What every method shares: the `Method` contract and its kinds, field validators, the stage view a scorer
reads, and the registry that every tool reads (the CLI, flops, bench, the mini suite): nothing outside a
method's own module branches on its name, and no tool probes a method for optional attributes: every one is
declared on `Method` (defaults) and set where a method differs.

Three kinds, each a base class a method's frozen dataclass subclasses:

- `InLLMMethod` (``stage = "in"``): the schedule fields (``pruning_layers``, ``keep_ratios``,
  ``reference_depth``, ``positions``; ``accumulation_layers`` where TTV is needed) and
  ``rank(view) -> (score (R, n), parts)``, one score per image token of each row of the `StageView`;
- `OnEmbeddings` (``stage = "pre"``): ``order(image, text, k)`` on the LLM's input embeddings (any family);
- `OnVisionTower` (``stage = "pre"``): ``install`` wraps the vision tower through the family's vision hooks
  (``needs = {"vision_hooks"}``), ``llm_tokens(arch)`` says how many tokens reach the LLM.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..schedule import Schedule

POSITION_RULES = ("compact", "original")


class DefaultRule(str):
    """A position rule a method config was left at (not passed explicitly). It equals, prints and serialises
    as the plain rule name; `apply` replaces it by the model family's own rule where the family cannot honour
    it (the 1-D "compact" rule means nothing under mRoPE), while an explicit rule the family cannot honour
    raises."""

    __slots__ = ()

    def __reduce__(self):
        return (DefaultRule, (str(self),))


DEFAULT_COMPACT = DefaultRule("compact")
DEFAULT_ORIGINAL = DefaultRule("original")


def is_default_rule(value) -> bool:
    return isinstance(value, DefaultRule)


def as_int_tuple(name: str, value) -> tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of layer numbers (1-indexed ints), got {value!r}") from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name} must hold ints (1-indexed layer numbers), got {item!r}")
    return items


def choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def check_reference_depth(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise ValueError(f"reference_depth must be an int >= 2 or None (layer numbers as written), got {value!r}")


def check_layers(name: str, layers, reference_depth, strict_top: bool = True) -> tuple[int, ...]:
    """Strictly increasing 1-indexed layers; below ``reference_depth`` when one is given (a pruning layer
    needs a following layer; ``strict_top=False`` allows the last layer itself)."""
    layers = as_int_tuple(name, layers)
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {layers}")
    if layers and layers[0] < 1:
        raise ValueError(f"{name} are 1-indexed layer numbers (>= 1), got {layers}")
    if reference_depth is not None and layers:
        if layers[-1] > reference_depth:
            raise ValueError(f"{name} must be <= reference_depth={reference_depth}, got {layers}")
        if strict_top and layers[-1] >= reference_depth:
            raise ValueError(f"{name} must be < reference_depth={reference_depth} (scores may use the next layer), "
                             f"got {layers}")
    return layers


def check_fraction(name: str, value, low_open: bool = True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if not ok or not (0 < value <= 1 if low_open else 0 <= value < 1):
        raise ValueError(f"{name} must be a number in {'(0, 1]' if low_open else '[0, 1)'}, got {value!r}")


def check_keep_ratios(ratios, pruning_layers, allow_zero: bool = False) -> tuple[float, ...]:
    """One fraction of the original count per pruning layer, in (0, 1] (``allow_zero``: [0, 1], for a method whose
    stages keep at least one token), never increasing."""
    span = "[0, 1]" if allow_zero else "(0, 1]"
    if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__iter__"):
        raise TypeError(f"keep_ratios must be a sequence of numbers in {span}, got {ratios!r}")
    ratios = tuple(ratios)
    wrong = [r for r in ratios if isinstance(r, (bool, str, bytes)) or not isinstance(r, numbers.Real)]
    if wrong:  # a string or bool would silently become a number ("0.5" -> 0.5, True -> 1.0)
        raise TypeError(f"keep_ratios must hold numbers in {span} (floats, fractions of the original count), got "
                        f"{wrong[0]!r} in {ratios!r}")
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) != len(pruning_layers):
        raise ValueError(f"keep_ratios needs one ratio per pruning layer: {len(pruning_layers)} pruning_layers "
                         f"{tuple(pruning_layers)} but {len(ratios)} keep_ratios {ratios}")
    if any(not (0.0 <= r if allow_zero else 0.0 < r) or r > 1.0 for r in ratios):
        raise ValueError(f"keep_ratios must lie in {span} (fractions of the original count), got {ratios}")
    if any(b > a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f"keep_ratios must not increase from one pruning layer to the next, got {ratios}")
    return ratios


# What a method can need of a model family (`Method.needs`), as the error names it.
NEEDS = {"vision_hooks": "vision-tower hooks"}


class Method:
    """The contract of every method config (a frozen dataclass subclassing one of the kinds below). Tools read
    these attributes and call these methods; a method sets or overrides where it differs."""

    method = ""  # the registry name (`register_method`)
    stage = ""  # "in": inside the LLM; "pre": before it (the kinds set it)
    name = "custom"  # the preset a config was built from (TransPrune records it as a field)
    presets: dict[str, dict] = {}  # preset name -> field values, for `preset`; a bare method name means the first
    needs: frozenset[str] = frozenset()  # what the method needs of a family (`NEEDS`), checked before any change
    from_embeddings = False  # a pre-LLM method that chooses from the LLM's input embeddings (no vision hooks)
    enabled = True  # False: the config prunes nothing (TransPrune "off")

    @classmethod
    def preset(cls, name: str, **overrides):
        """The named setting ``name`` (one of ``presets``), with ``overrides`` on top."""
        if name not in cls.presets:
            raise ValueError(f"unknown {cls.method} preset {name!r}; choose one of {', '.join(map(repr, cls.presets))}"
                             if cls.presets else f"{cls.method} has no presets (got {name!r})")
        return cls(**{**cls.presets[name], **overrides})

    @classmethod
    def default_preset(cls) -> str | None:
        """The preset a bare method name stands for (the first), or None."""
        return next(iter(cls.presets), None)

    def check_family(self, family) -> None:
        """Raise, before any change, when ``family`` (an adapter class or instance) lacks what this method needs."""
        for need in sorted(self.needs):
            why = family.lacks(need)
            if why:
                raise ValueError(f"{type(self).__name__} needs {NEEDS[need]} that the {family.family} adapter does "
                                 f"not have: {why}")

    def check(self, adapter) -> None:
        """Raise, before the model changes, when this setting cannot run on this model (beyond `check_family`)."""

    def check_arch(self, arch) -> None:
        """Raise, as `check` would on a model, when this setting cannot run on ``arch`` (an `ArchSpec`)."""

    def selection_macs(self, n_image: int, hidden_size: int, text_tokens: int) -> int:
        """Multiply-accumulates of this method's own selection at a stage that ``n_image`` tokens enter, beyond the
        attention rows `scoring_query_rows` counts (FLOPs tool); 0: nothing worth counting."""
        return 0

    def scaled(self, factor: float):
        """This method keeping ``factor`` times as many tokens: the knob `transprune.budget` turns."""
        raise NotImplementedError(f"{type(self).__name__} does not say how it scales to a budget")

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


class InLLMMethod(Method):
    """Shared behaviour of in-LLM method configs (a base for frozen dataclasses)."""

    stage = "in"
    accumulation_layers: tuple[int, ...] = ()
    needs_ttv = False
    layer_field = "pruning_layers"  # the field the user writes the layers in (FastV: k), for error messages
    min_keep = 0  # tokens every stage keeps at least (V2Drop: 1)
    keep_rounding = "floor"  # a stage keeps int(n * ratio) tokens; "round" where the official code rounds (FastV)

    @property
    def enabled(self) -> bool:
        return bool(self.pruning_layers)

    def check_schedule(self, allow_zero: bool = False) -> None:
        """The schedule fields' validation every in-LLM method with ``pruning_layers`` and ``keep_ratios`` fields
        shares (``allow_zero``: a ratio may be 0, for a method whose stages keep at least one token)."""
        check_reference_depth(self.reference_depth)
        choice("positions", self.positions, POSITION_RULES)
        prune = check_layers("pruning_layers", self.pruning_layers, self.reference_depth)
        object.__setattr__(self, "pruning_layers", prune)
        object.__setattr__(self, "keep_ratios", check_keep_ratios(self.keep_ratios, prune, allow_zero=allow_zero))

    def layers_for_depth(self, depth: int) -> Schedule:
        """Resolve the layer numbers for a decoder with ``depth`` layers (raises before any change)."""
        return Schedule.resolve(self, depth)

    def scoring_query_rows(self, query_tokens: int) -> int | None:
        """Attention query rows each scoring stage computes, given the prompt's ``query_tokens`` text rows
        after the image (FLOPs tool); None: the score costs nothing."""
        return None

    def scaled(self, factor: float):
        """This method with every keep ratio times ``factor`` (at most 1), its layers unchanged. A method whose
        ratios derive from other fields overrides it."""
        import dataclasses

        return dataclasses.replace(self, keep_ratios=tuple(min(1.0, r * factor) for r in self.keep_ratios))


class PreLLMMethod(Method):
    """A method that chooses before the LLM: how many tokens reach it (`llm_tokens`)."""

    stage = "pre"

    def llm_tokens(self, arch) -> int:
        """Image tokens that reach the LLM on ``arch`` (an `ArchSpec`; FLOPs tool)."""
        raise NotImplementedError

    def kept_of(self, units: list[int]) -> int:
        """Visual tokens that reach the LLM of an item cut into ``units`` (their token counts: an image's tiles or
        a video's frames), a function of the counts alone, never of scores: what an engine must know before the
        encoder runs (the vLLM plugin's placeholder count)."""
        raise NotImplementedError

    def install(self, adapter, hand_over) -> tuple[list, list]:
        """Wrap what the method needs on this model instance; returns what `PruneHandle.remove` undoes:
        ([(module, attribute, previous instance value)], [hooks])."""
        return [], []


class OnVisionTower(PreLLMMethod):
    """A pre-LLM method that reads the vision tower through the family's vision hooks (`adapters.vision`)."""

    needs = frozenset({"vision_hooks"})


@dataclass
class StageView:
    """What a scorer sees at one pruning stage, for R rows that line up (the whole aligned batch, or one
    sample's valid tokens): S tokens per row, n of them image tokens at the same columns ``image_at``."""

    h: torch.Tensor  # (R, S, d) output of the pruning layer
    h_in: torch.Tensor  # (R, S, d) its input
    image_at: torch.Tensor  # (n,) columns of the image tokens among the S
    image_rank: torch.Tensor  # (R, n) each image token's index among its sample's original image tokens
    ttv: torch.Tensor  # (R, n) accumulated TTV of the image tokens (zeros unless the method needs it)
    stage: int  # 0-based pruning stage
    last_image: int  # column of the last image token (host int)
    # attention(which, h, query_idx) -> (R, S): mean attention of the query rows to every token, computed
    # from q and k with the pruning layer's ("this") or the following layer's ("next") weights.
    attention: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
    # token_coords(r) -> (n, c) coordinates of row r's image tokens on their grid (the family's geometry)
    token_coords: Callable[[int], torch.Tensor]
    # keys(which, h) -> (R, S, heads * head_dim): every token's rotated key in the pruning ("this") or the following
    # ("next") layer, KV heads repeated as the attention uses them (DART's pivots)
    keys: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    # final_norm(h): the decoder's final norm (DART compares tokens in that space)
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    keep: int = 0  # image tokens this stage keeps in each row (a rule whose choice depends on it: DART's quota)

    @property
    def length(self) -> int:
        return self.h.shape[1]


# name -> config class; filled by `register_method` in each method's module.
METHODS: dict[str, type] = {}


def register_method(name: str, config_cls: type) -> type:
    """Make a method config known to every tool by ``name`` (its ``method`` attribute)."""
    if name in METHODS and METHODS[name] is not config_cls:
        raise ValueError(f"method {name!r} is already registered to {METHODS[name].__name__}")
    if not (isinstance(config_cls, type) and issubclass(config_cls, (InLLMMethod, PreLLMMethod))):
        raise TypeError(f"{getattr(config_cls, '__name__', config_cls)!r} must subclass one kind of method: InLLMMethod "
                        "(inside the LLM), OnEmbeddings or OnVisionTower (before it; transprune.methods.base)")
    if not set(config_cls.needs) <= set(NEEDS):
        raise TypeError(f"{config_cls.__name__}.needs {sorted(config_cls.needs)}: each one of {', '.join(NEEDS)}")
    METHODS[name] = config_cls
    return config_cls


def unregister_method(name: str) -> None:
    """Undo `register_method` (tests register methods of their own)."""
    del METHODS[name]


# Cosine distance below which two visual tokens count as the same token: far above the rounding noise between
# copies of one token (~1e-7 in fp32), far below the distance between different image patches.
TIE_DISTANCE = 1e-5


def cosine_with_ties(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (n, n) cosine of the (n, d) ``image`` rows with each other, where copies of one token are exactly tied,
    and (n,) the first token each one is a copy of (itself if none).

    Copies of a token (LLaVA-NeXT's repeated newline embeddings; the identical tiles of a small image, which the
    vision tower encodes at different batch rows) differ by rounding noise that depends on the CPU's kernels (AVX2,
    AVX-512) and on where a row falls in a matrix product's blocks, so a choice between them would differ from
    machine to machine. Every token within ``TIE_DISTANCE`` of an earlier one takes the first such token's row,
    products are computed once per distinct row, and the cosine of tied tokens (a token with itself included) is
    exactly 1: ties then break by index (argmax takes the first), as in exact arithmetic, on every machine.
    Without copies the matrix is the plain product, bit for bit, but for its diagonal."""
    unit = F.normalize(image, dim=-1)
    cosine = unit @ unit.T
    tied = 1.0 - cosine <= TIE_DISTANCE
    first = tied.int().argmax(1)  # the earliest token each one ties with (itself at worst)
    if bool((first == torch.arange(unit.shape[0], device=unit.device)).all()):
        return cosine.masked_fill(tied, 1.0), first
    distinct, inverse = torch.unique(first, return_inverse=True)
    rows = unit[distinct]
    return (rows @ rows.T)[inverse][:, inverse].masked_fill(tied[first][:, first], 1.0), first


def cosine_to(image: torch.Tensor, other: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """(n, m) the cosine of the ``image`` rows with the ``other`` rows, the same bits for copies of one token
    (``first``: from `cosine_with_ties`)."""
    unit, other = F.normalize(image, dim=-1), F.normalize(other, dim=-1)
    distinct, inverse = torch.unique(first, return_inverse=True)
    if distinct.numel() == first.numel():
        return unit @ other.T
    return (unit[distinct] @ other.T)[inverse]


class OnEmbeddings(PreLLMMethod):
    """Shared behaviour of pre-LLM methods that choose from the LLM's input embeddings (a base for frozen
    dataclasses with a ``keep_ratio`` field): the runtime calls `keep_from_embeddings` before the first layer,
    so they need no vision-tower hooks and run on every family. Each sample keeps ``round(n * keep_ratio)``
    (at least one) of its n visual tokens, all its images and videos together; the subclass's ``order(image,
    text, k)`` says which: the indices of its k choices among the (n, d) image rows, given the (t, d) text rows
    after the sample's last visual token (the instruction)."""

    from_embeddings = True
    reads_instruction = True  # `order` reads the text after the image (False where it ignores it)

    def count(self, n: int) -> int:
        return max(1, min(n, round(n * self.keep_ratio)))

    def kept_of(self, units: list[int]) -> int:
        return self.count(sum(units))  # the item's tokens chosen together

    def llm_tokens(self, arch) -> int:
        return self.count(arch.image_tokens)

    def scaled(self, factor: float):
        import dataclasses

        return dataclasses.replace(self, keep_ratio=min(1.0, self.keep_ratio * factor))

    def keep_from_embeddings(self, embeds: torch.Tensor, valid: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the visual tokens each sample keeps (sample by sample: the same alone or in a batch)."""
        keep = torch.zeros_like(image_mask)
        position = torch.arange(image_mask.shape[1], device=image_mask.device)
        for b in range(image_mask.shape[0]):
            cols = (image_mask[b] & valid[b]).nonzero().squeeze(1)
            if not cols.numel():
                continue
            after = valid[b] & ~image_mask[b] & (position > cols[-1])
            chosen = self.order(embeds[b, cols].float(), embeds[b, after].float(), self.count(cols.numel()))
            keep[b, cols[chosen]] = True
        return keep
