"""FastV (arXiv 2403.06764): after layer K, drop the image tokens the last token attends to least."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DEFAULT_ORIGINAL, POSITION_RULES, InLLMMethod, StageView, check_fraction, check_layers, check_reference_depth, choice, \
    register_method


@dataclass(frozen=True)
class FastVConfig(InLLMMethod):
    """FastV: after layer ``k`` (1-indexed), drop the fraction ``r`` of image tokens that the last token
    attends to least, using layer k's own attention (recomputed from its q and k)."""

    k: int = 2
    r: float = 0.5
    positions: str = DEFAULT_ORIGINAL  # the official FastV keeps the kept tokens' position ids
    reference_depth: int | None = None
    method = "fastv"
    layer_field = "k"
    keep_rounding = "round"  # the official code keeps round(N (1 - R)) tokens (R = 0.7: 173 of 576, not 172)

    def __post_init__(self):
        check_reference_depth(self.reference_depth)
        check_layers("k", (self.k,), self.reference_depth)
        choice("positions", self.positions, POSITION_RULES)
        check_fraction("r", self.r, low_open=False)

    @property
    def pruning_layers(self):
        return (self.k,)

    @property
    def keep_ratios(self):
        return (1.0 - self.r,)

    def scoring_query_rows(self, query_tokens: int) -> int:
        return 1

    def scaled(self, factor: float) -> "FastVConfig":
        """The kept share ``1 - r`` times ``factor``."""
        import dataclasses

        return dataclasses.replace(self, r=max(0.0, 1.0 - min(1.0, (1.0 - self.r) * factor)))

    def rank(self, view: StageView):
        last = torch.tensor([view.length - 1], device=view.h.device)
        return view.attention("this", view.h_in, last)[:, view.image_at], {}


register_method("fastv", FastVConfig)
