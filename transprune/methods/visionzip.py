"""VisionZip (arXiv 2412.04467), before the LLM: per image (per vision tile, per video frame) keep the
tokens the vision tower attends to most and merge the rest into a few contextual tokens.

The method owns its rule (`VisionZipConfig.plan`) and its wiring; the family's vision hooks supply what
differs between towers: which encoders to wrap, which attention layer to read and the dominance score
from its q and k (CLS attention on CLIP; on Qwen's CLS-free towers, the attention each token receives),
how the encoded images split into units, and how merged tokens are written into the features."""

from __future__ import annotations

import functools
from contextvars import ContextVar
from dataclasses import asdict, dataclass

import torch

from ..patching import patch
from ..scoring import select_top
from .base import register_method

# What the hook captures at the scored attention layer (dominance scores, keys) while this context encodes.
_CAPTURE: ContextVar["_Encoding | None"] = ContextVar("transprune_visionzip_capture", default=None)


@dataclass(frozen=True)
class VisionZipConfig:
    """VisionZip, before the LLM: per image (tile, video frame) keep the ``dominant`` tokens the vision
    tower attends to most (CLS attention on CLIP towers; on Qwen's, the attention each token receives) and
    merge the rest into ``contextual`` tokens (by key similarity)."""

    dominant: int = 54
    contextual: int = 10
    method = "visionzip"
    stage = "pre"

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

    def scaled(self, factor: float) -> "VisionZipConfig":
        """Dominant and contextual tokens per image times ``factor`` (rounded; at least one token kept)."""
        dominant, contextual = round(self.dominant * factor), round(self.contextual * factor)
        if dominant + contextual == 0:
            dominant = 1
        return VisionZipConfig(dominant, contextual)

    def llm_tokens(self, arch) -> int:
        """Image tokens that reach the LLM on ``arch`` (an `ArchSpec`): ``tokens`` per vision crop (FLOPs tool)."""
        return min(self.tokens * arch.crops, arch.image_tokens)

    def check_arch(self, arch) -> None:
        """Raise, as `check` does on a model, when ``arch``'s fixed-resolution tower has fewer tokens per crop."""
        per_crop = arch.image_tokens // max(arch.crops, 1)
        if arch.pixels_per_token is None and self.tokens > per_crop:
            raise ValueError(f"VisionZipConfig keeps dominant + contextual = {self.tokens} tokens per image (per tile), "
                             f"more than {arch.name}'s {per_crop} tokens per tile")

    def check(self, adapter) -> None:
        """Raise before the model changes if this family or setting cannot run VisionZip."""
        hooks = adapter.vision_hooks()
        if hooks is None:
            why = getattr(adapter, "vision_hooks_missing", None)
            raise ValueError(f"VisionZip needs vision-tower hooks that the {adapter.family} adapter does not have"
                             + (f": {why}" if why else ""))
        hooks.check()
        n = hooks.patches_per_tile()  # None: the count varies per image (dynamic resolution)
        if n is not None and self.tokens > n:
            raise ValueError(f"VisionZipConfig keeps dominant + contextual = {self.tokens} tokens per image (per anyres "
                             f"tile), more than the model's {n} patches per tile")

    def install(self, adapter, hand_over) -> tuple[list, list]:
        """Wrap this model instance's encoders (images; videos too where the family has them) and its scored
        attention layer; ``hand_over(modality, outputs, run, profiler)`` times ``run()`` (the selection, a bool
        over every token of that modality in the call) and passes the result to the prefill;
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
            if found is not None:
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

    def plan(self, score: torch.Tensor, keys: torch.Tensor) -> "ZipPlan":
        """One unit's choice (a vision tile, an image or a video frame; n tokens): the ``dominant`` tokens with
        the highest ``score`` stay; of the rest, ``contextual`` evenly spaced targets absorb every other
        remaining token, each joining the target its key is most similar to (``keys`` are unit-normalised).
        A unit of fewer than ``dominant + contextual`` tokens keeps them all."""
        n = score.numel()
        keep = torch.zeros(n, dtype=torch.bool, device=score.device)
        keep[select_top(score, min(self.dominant, n))] = True
        rest = (~keep).nonzero().squeeze(1)
        c = min(self.contextual, rest.numel())
        if not c:
            empty = rest[:0]
            return ZipPlan(keep, empty, empty, empty)
        targets = rest[torch.arange(c, device=rest.device) * rest.numel() // c]
        members = rest[~torch.isin(rest, targets)]
        group = (keys[members] @ keys[targets].T).argmax(1)
        keep[targets] = True
        return ZipPlan(keep, targets, members, group)

    def select(self, hooks, image_outputs, captured, geometry) -> torch.Tensor:
        """Plan every unit the family's hooks cut the encoded images into, let the hooks write the merged
        contextual tokens into the features, and return which tokens stay (a bool over all tokens of the
        call, in order; the family may drop rows that are no patch, as NeXT's newline tokens)."""
        plans = [self.plan(score, keys) for score, keys in hooks.units(image_outputs, captured, geometry)]
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
    targets: torch.Tensor  # (c,) the contextual targets; each becomes the mean of its group
    members: torch.Tensor  # (m,) the tokens merged into a target (and dropped)
    group: torch.Tensor  # (m,) which target (0..c-1) each member joins

    def mean_into_targets(self, rows: torch.Tensor) -> torch.Tensor:
        """(c, d) fp32: each target's group mean of ``rows`` (n, d), the target itself included."""
        total = rows[self.targets].float().index_add(0, self.group, rows[self.members].float())
        sizes = torch.ones(self.targets.numel(), device=total.device).index_add(
            0, self.group, torch.ones_like(self.group, dtype=torch.float))
        return total / sizes[:, None]


register_method("visionzip", VisionZipConfig)
