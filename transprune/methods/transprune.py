"""TransPrune (arXiv 2507.20630): Token Transition Variation + Instruction-Guided Attention, in the LLM.

Layer numbers are 1-indexed, as in the paper: "prune at layer 7" means run ``layers[6]`` on the full
sequence, then drop image tokens from its output. Keep ratios are fractions of the ORIGINAL image-token
count of each sample (../shared/method.md §6.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import scoring
from ..schedule import PAPER_DEPTH
from .base import DEFAULT_COMPACT, InLLMMethod, StageView, check_layers, choice, register_method

DIRECTIONS = ("1-cos", "1-abs-cos")
SCORES = ("transprune", "ttv", "iga")

# The paper's own (LLaVA-1.5-7B, 32-layer) depth: what `reference_depth=REFERENCE_DEPTH` maps from.
REFERENCE_DEPTH = PAPER_DEPTH
# The named settings: "high" (paper defaults), "low" (ratios .625/.1875/.0625), "off" (no pruning); the paper's
# layer numbers as written (pass reference_depth=32 to map them to another depth).
_PRESET_FIELDS = {
    "high": dict(keep_ratios=(0.875, 0.625, 0.125), name="high"),
    # Inferred in method.md §6.1: the only 1/16-grid schedule that reproduces 1.19 and 6.41 TFLOPs.
    "low": dict(keep_ratios=(0.625, 0.1875, 0.0625), name="low"),
    "off": dict(pruning_layers=(), keep_ratios=(), name="off"),
}
PRESETS = tuple(_PRESET_FIELDS)


@dataclass(frozen=True)
class TransPruneConfig(InLLMMethod):
    """Token Transition Variation + Instruction-Guided Attention pruning inside the LLM.

    Defaults are the paper's TransPrune-High schedule (= ``preset("high")``) with the official code's
    choices for the points where paper and code differ (``direction``, ``positions``). Layer numbers are
    used as written; ``reference_depth=N`` maps them from an N-layer decoder to the model's depth.
    """

    accumulation_layers: tuple[int, ...] = (7, 8, 9, 10, 11, 12)
    pruning_layers: tuple[int, ...] = (7, 9, 12)
    keep_ratios: tuple[float, ...] = (0.875, 0.625, 0.125)
    alpha: float = 0.5
    direction: str = "1-cos"
    positions: str = DEFAULT_COMPACT
    score: str = "transprune"
    reference_depth: int | None = None
    name: str = field(default="custom", compare=False)
    method = "transprune"
    presets = _PRESET_FIELDS  # a bare "transprune" means the first

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a str (a preset's name, or 'custom'), got {self.name!r}")
        self.check_schedule()
        object.__setattr__(self, "accumulation_layers",
                           check_layers("accumulation_layers", self.accumulation_layers, self.reference_depth,
                                        strict_top=False))
        prune = self.pruning_layers
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        choice("direction", self.direction, DIRECTIONS)
        choice("score", self.score, SCORES)
        acc = self.accumulation_layers
        if prune and self.score != "iga" and (not acc or acc[0] > prune[0]):
            raise ValueError(f"accumulation_layers={acc} has no layer at or before the first pruning layer {prune[0]}, so "
                             f"TTV (score={self.score!r}) would be zero there: start it at or before {prune[0]}, or use "
                             "score='iga'")

    @property
    def needs_ttv(self) -> bool:
        return self.score != "iga"

    def scoring_query_rows(self, query_tokens: int) -> int:
        return query_tokens  # IGA's rows: the text after the image

    def rank(self, view: StageView):
        ttv = view.ttv
        iga = torch.zeros_like(ttv)
        if self.score != "ttv":
            # Instruction rows: the text after the last image token (D3 in method.md), next layer's weights.
            after = torch.arange(view.last_image + 1, view.length, device=view.h.device)
            if after.numel() == 0:  # no text after the image: the last token's row, as PDrop reads it
                after = torch.tensor([view.length - 1], device=view.h.device)
            iga = view.attention("next", view.h, after)[:, view.image_at]
        parts = {"ttv": scoring.l1_normalize(ttv), "iga": scoring.l1_normalize(iga)}
        return scoring.combine(ttv, iga, self.alpha, self.score), parts


register_method("transprune", TransPruneConfig)
