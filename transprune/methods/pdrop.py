"""PyramidDrop (arXiv 2410.17247): at each stage keep a fixed share of the image tokens left, ranked by the
last instruction token's attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DEFAULT_COMPACT, POSITION_RULES, InLLMMethod, StageView, check_fraction, check_layers, check_reference_depth, choice, \
    register_method


@dataclass(frozen=True)
class PDropConfig(InLLMMethod):
    """PyramidDrop: after each of ``layers`` keep ``ratio`` of the tokens left, ranked by the last
    instruction token's attention with the next layer's weights (the official rule)."""

    layers: tuple[int, ...] = (8, 16, 24)
    ratio: float = 0.5
    positions: str = DEFAULT_COMPACT  # PDrop renumbers positions after each drop
    reference_depth: int | None = None
    method = "pdrop"
    layer_field = "layers"

    def __post_init__(self):
        check_reference_depth(self.reference_depth)
        choice("positions", self.positions, POSITION_RULES)
        object.__setattr__(self, "layers", check_layers("layers", self.layers, self.reference_depth))
        check_fraction("ratio", self.ratio)

    @property
    def pruning_layers(self):
        return self.layers

    @property
    def keep_ratios(self):
        return tuple(self.ratio ** (i + 1) for i in range(len(self.layers)))

    def scoring_query_rows(self, query_tokens: int) -> int:
        return 1

    def scaled(self, factor: float) -> "PDropConfig":
        """The per-stage ratio times ``factor``: PDrop's keep ratios stay geometric (ratio, ratio^2, ...), as it
        defines them, so the first stage's ratio scales by ``factor`` and the later ones by its powers."""
        import dataclasses

        return dataclasses.replace(self, ratio=min(1.0, self.ratio * factor))

    def rank(self, view: StageView):
        last = torch.tensor([view.length - 1], device=view.h.device)
        return view.attention("next", view.h, last)[:, view.image_at], {}


register_method("pdrop", PDropConfig)
