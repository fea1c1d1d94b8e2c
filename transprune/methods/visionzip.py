"""VisionZip (arXiv 2412.04467), before the LLM: per image (per vision tile, per video frame) keep the
tokens the vision tower attends to most and merge the rest into a few contextual tokens.

The method owns its rule (`VisionZipConfig.plan`) and its wiring; the family's vision hooks supply what
differs between towers: which encoders to wrap, which attention layer to read and the dominance score
from its q and k (CLS attention on CLIP; on Qwen's CLS-free towers, the attention each token receives),
how the encoded images split into units, and how merged tokens are written into the features."""

from __future__ import annotations

import functools
import warnings
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from ..patching import patch
from ..scoring import select_top
from .base import OnVisionTower, register_method

# What the hook captures at the scored attention layer (dominance scores, keys) while this context encodes.
_CAPTURE: ContextVar["_Encoding | None"] = ContextVar("transprune_visionzip_capture", default=None)


# The paper's 64-token setting on LLaVA-1.5 (54 dominant + 10 contextual of 576 patches): the share a field left at
# None keeps of every unit (tile, crop, image, frame), so the defaults prune on any family's unit size.
PAPER_SETTING = (54, 10)
PAPER_UNIT = 576


@dataclass(frozen=True)
class VisionZipConfig(OnVisionTower):
    """VisionZip, before the LLM: per image (tile, video frame) keep the ``dominant`` tokens the vision
    tower attends to most (CLS attention on CLIP towers, the CLS token itself counted among them where it reaches
    the LLM, as the official code; on CLS-free towers, the attention each token receives) and merge the rest into
    ``contextual`` tokens (by key similarity).

    A count left at None is the paper's 64-token share (54 + 10 of LLaVA-1.5's 576) of each unit; with
    ``reference_tokens`` the counts are given for a unit of that many tokens and scale to the model's unit (the
    named compositions, written for LLaVA-1.5)."""

    dominant: int | None = None
    contextual: int | None = None
    reference_tokens: int | None = None
    # Where the tower's CLS token can reach the LLM (LLaVA), the official code keeps it as the first dominant token;
    # False: the dominant tokens are patches only (with contextual=0 and dominant = every patch, the unpruned model).
    keep_cls: bool = True
    method = "visionzip"

    def __post_init__(self):
        for name in ("dominant", "contextual", "reference_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be an int >= 0 or None, got {v!r}")
        if not isinstance(self.keep_cls, bool):
            raise ValueError(f"keep_cls must be True or False, got {self.keep_cls!r}")
        if self.reference_tokens == 0:
            raise ValueError("reference_tokens must be >= 1 (or None: the counts are absolute)")
        if self.dominant == 0 and self.contextual == 0:
            raise ValueError("dominant + contextual must be >= 1 (tokens kept per image)")

    @property
    def absolute(self) -> bool:
        """Whether the counts are the same on every unit size (both given, no reference_tokens)."""
        return self.dominant is not None and self.contextual is not None and self.reference_tokens is None

    def counts(self, n: int) -> tuple[int, int]:
        """(dominant, contextual) for a unit of ``n`` tokens: given counts as they are (scaled from
        ``reference_tokens`` when set), None fields as their share of the paper's setting; at least one kept."""
        out = []
        for value, paper in zip((self.dominant, self.contextual), PAPER_SETTING):
            if value is None:
                out.append(round(paper * n / PAPER_UNIT))
            elif self.reference_tokens is not None:
                out.append(round(value * n / self.reference_tokens))
            else:
                out.append(value)
        dominant, contextual = out
        return (dominant if dominant + contextual else 1), contextual

    def tokens_for(self, n: int) -> int:
        """Tokens a unit of ``n`` keeps (at most ``n``)."""
        return min(sum(self.counts(n)), n)

    def kept_of(self, units: list[int]) -> int:
        return sum(self.tokens_for(n) for n in units)  # each unit keeps its own share

    def scaled(self, factor: float) -> "VisionZipConfig":
        """Dominant and contextual tokens per image times ``factor`` (rounded; at least one token kept); None
        fields become the paper's setting on ``reference_tokens`` (576 when unset), so they scale the same way."""
        unset = (self.dominant, self.contextual).count(None)
        if unset and (unset == 1 and self.reference_tokens is None or self.reference_tokens not in (None, PAPER_UNIT)):
            raise ValueError("VisionZip scales to a budget with both dominant and contextual given, or neither (a "
                             f"count and a share of the paper's unit have no common unit): got {self!r}")
        reference = self.reference_tokens if self.reference_tokens is not None else (
            None if self.absolute else PAPER_UNIT)
        dominant, contextual = (v if v is not None else p for v, p in zip((self.dominant, self.contextual), PAPER_SETTING))
        dominant, contextual = round(dominant * factor), round(contextual * factor)
        if dominant + contextual == 0:
            dominant = 1
        return VisionZipConfig(dominant, contextual, reference, self.keep_cls)

    def llm_tokens(self, arch) -> int:
        """Image tokens that reach the LLM on ``arch`` (an `ArchSpec`): ``tokens_for`` each vision crop (FLOPs tool)."""
        crops = max(arch.crops, 1)
        return min(self.tokens_for(arch.image_tokens // crops) * crops, arch.image_tokens)

    def check_arch(self, arch) -> None:
        """Raise, as `check` does on a model, when ``arch``'s fixed-resolution tower has fewer tokens per crop."""
        per_crop = arch.image_tokens // max(arch.crops, 1)
        if arch.pixels_per_token is None and sum(self.counts(per_crop)) > per_crop:
            raise ValueError(f"VisionZipConfig keeps dominant + contextual = {sum(self.counts(per_crop))} tokens "
                             f"per image (per tile), more than {arch.name}'s {per_crop} tokens per tile")

    def check(self, adapter) -> None:
        """Raise before the model changes if this family or setting cannot run VisionZip; warn when the setting
        keeps every token of the model's tiles (it would prune nothing)."""
        hooks = adapter.vision_hooks()  # `apply` has checked the family (`check_family`); this model may still lack them
        if hooks is None:  # a family whose hooks depend on the model (its config) and this one has none
            raise ValueError(f"VisionZip needs vision-tower hooks that this {adapter.family} model does not have"
                             + (f": {adapter.vision_hooks_missing}" if adapter.vision_hooks_missing else ""))
        hooks.check()
        n = hooks.patches_per_tile()  # None: the count varies per image (dynamic resolution)
        if n is None:
            return
        if sum(self.counts(n)) > n:
            raise ValueError(f"VisionZipConfig keeps dominant + contextual = {sum(self.counts(n))} tokens "
                             f"per image (per anyres tile), more than the model's {n} patches per tile")
        if self.tokens_for(n) >= n:
            warnings.warn(f"{self!r} keeps all {n} tokens of every {adapter.family} tile (dominant + contextual = "
                          f"{sum(self.counts(n))}): it prunes nothing on this model; lower dominant or contextual, or "
                          "leave them unset for the paper's share", stacklevel=3)

    def install(self, adapter, hand_over) -> tuple[list, list]:
        """Wrap this model instance's encoders (images; videos too where the family has them) and its scored
        attention layer; ``hand_over(modality, outputs, run, profiler)`` times ``run()`` (the selection: `select`'s
        (keep, source) over every token of that modality in the call) and passes the result to the prefill;
        ``hand_over.profiler(device)`` is an encoding's profiler (a no-op unless the handle profiles), which times
        the capture too. Returns what
        `PruneHandle.remove` undoes: ([(module, attribute, previous instance value)], [hooks])."""
        hooks = adapter.vision_hooks()
        mm = adapter.multimodal_model
        layer = hooks.attention_layer()

        forward = layer.forward  # bound: the class's, or an instance override already there (accelerate's)

        def capture_then_forward(*args, **kwargs):
            """The dominance rule's inputs from the scored layer's q and k, for an encoding in flight in this
            context (none: the tower runs unpruned), then the layer itself."""
            found = _CAPTURE.get()
            if found is None:
                return forward(*args, **kwargs)
            shared = hooks.forward_with_lse(layer, args, kwargs)
            if shared is not None:  # the layer ran, and made the score's first pass
                output, layer_pass = shared
                with found.profiler.span("pre_llm_s"):
                    found.append(layer_pass.received())
                return output
            with found.profiler.span("pre_llm_s"):  # the capture is part of deciding what to drop
                found.append(hooks.capture(layer, args, kwargs))
            return forward(*args, **kwargs)

        # An instance override for as long as the pruning is applied, not a hook registered per call: registering
        # and removing hooks raced with other threads' forwards (a hook seen without its keyword-arguments flag),
        # and a deep copy of the model gets the layer's own forward back (patching.py).
        saved = [patch(layer, "forward", functools.wraps(forward)(capture_then_forward))]
        saved += [patch(mm, name, self._wrap(getattr(mm, name), modality, hooks, hand_over))
                  for modality, name in hooks.encoders.items()]
        return saved, []

    def _wrap(self, encoder, modality, hooks, hand_over):
        @functools.wraps(encoder)
        def encode(*args, **kwargs):
            if _CAPTURE.get() is not None:  # an encoder called by another (Qwen3-VL's videos go through images)
                return encoder(*args, **kwargs)
            kwargs["return_dict"] = True
            found = _Encoding(hand_over.profiler(_device_of(args, kwargs)))
            token = _CAPTURE.set(found)
            try:
                out = encoder(*args, **kwargs)
            finally:
                _CAPTURE.reset(token)
            geometry = hooks.geometry(modality, args, kwargs)
            hand_over(modality, out, lambda: self.select(hooks, out, found[-1], geometry), found.profiler)
            return out

        return encode

    def plan(self, score: torch.Tensor, keys: torch.Tensor, cls: bool = False) -> "ZipPlan":
        """One unit's choice (a vision tile, an image or a video frame; n tokens), the official code's rule: the
        dominant tokens with the highest ``score`` stay (with ``cls``, the unit's CLS token reaches the LLM and is
        one of them, so one patch fewer); of the rest (M tokens, in order), ``contextual`` targets spaced
        ``M // contextual`` apart from the first absorb the others, each joining the target its key (unit-normalised
        ``keys``) is most similar to. A unit of fewer tokens than it keeps keeps them all."""
        n = score.numel()
        dominant, contextual = self.counts(n)
        with_cls = cls and dominant > 0
        keep = torch.zeros(n, dtype=torch.bool, device=score.device)
        keep[select_top(score, min(dominant - with_cls, n))] = True
        rest = (~keep).nonzero().squeeze(1)
        c = min(contextual, rest.numel())
        if not c:
            empty = rest[:0]
            return ZipPlan(keep, empty, empty, empty, with_cls)
        targets = rest[torch.arange(c, device=rest.device) * (rest.numel() // c)]
        members = rest[~torch.isin(rest, targets)]
        group = (keys[members] @ keys[targets].T).argmax(1)
        keep[targets] = True
        return ZipPlan(keep, targets, members, group, with_cls)

    def select(self, hooks, image_outputs, captured, geometry) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Plan every unit the family's hooks cut the encoded images into and let the hooks write the kept and
        merged tokens into the features. Returns (keep, source): which tokens stay (a bool over all tokens of the
        call, in order; the family may drop rows that are no patch, as NeXT's newline tokens), and, where the
        family writes the kept tokens in another order (LLaVA: as the official code), the row each row now holds
        (-1: a token the unpruned model has none of, the CLS); None: every row holds its own token."""
        cls = hooks.cls_reaches_llm and self.keep_cls
        plans = [self.plan(score, keys, cls) for score, keys in hooks.units(image_outputs, captured, geometry)]
        return hooks.merge(image_outputs, plans, geometry)


class _Encoding(list):
    """What one encoding captured at the scored layer (one entry per call of it), and the profiler timing it."""

    def __init__(self, profiler):
        super().__init__()
        self.profiler = profiler


def _device_of(args, kwargs) -> torch.device:
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")


@dataclass(frozen=True)
class ZipPlan:
    """VisionZip's choice in one unit of n tokens (indices local to the unit)."""

    keep: torch.Tensor  # (n,) bool: dominant tokens and contextual targets
    targets: torch.Tensor  # (c,) the contextual targets; each absorbs its group
    members: torch.Tensor  # (m,) the tokens merged into a target (and dropped)
    group: torch.Tensor  # (m,) which target (0..c-1) each member joins
    cls: bool = False  # the unit's CLS token reaches the LLM, first (LLaVA, as the official code)

    @property
    def dominant(self) -> torch.Tensor:
        """(k,) the dominant tokens, in order."""
        dominant = self.keep.clone()
        dominant[self.targets] = False
        return dominant.nonzero().squeeze(1)

    def merged(self, rows: torch.Tensor) -> torch.Tensor:
        """(c, d) fp32, the official merge: each target's row of ``rows`` (n, d) plus the mean of its members'
        (a target no member joined stays as it is)."""
        total = torch.zeros(self.targets.numel(), rows.shape[-1], device=rows.device).index_add(
            0, self.group, rows[self.members].float())
        sizes = torch.zeros(self.targets.numel(), device=rows.device).index_add(
            0, self.group, torch.ones_like(self.group, dtype=torch.float))
        return rows[self.targets].float() + total / sizes.clamp_min(1)[:, None]


register_method("visionzip", VisionZipConfig)
