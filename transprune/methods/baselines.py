"""Reference rankings with TransPrune's schedule (so they cost what it costs): random and spatially uniform."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import scoring
from .base import DEFAULT_COMPACT, InLLMMethod, StageView, register_method


@dataclass(frozen=True)
class _Baseline(InLLMMethod):
    # Defaults: TransPrune-High's schedule, so a baseline costs exactly what TransPrune costs.
    pruning_layers: tuple[int, ...] = (7, 9, 12)
    keep_ratios: tuple[float, ...] = (0.875, 0.625, 0.125)
    positions: str = DEFAULT_COMPACT
    reference_depth: int | None = None

    def __post_init__(self):
        self.check_schedule()


@dataclass(frozen=True)
class RandomConfig(_Baseline):
    """Keep a seeded random subset (the same for a sample alone or in a batch)."""

    seed: int = 0
    method = "random"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    def rank(self, view: StageView):
        # Seeded per stage, not per batch position: a sample gets the same draw alone or batched.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + view.stage)
        n = view.image_at.numel()
        return torch.rand(n, generator=gen).to(view.h.device).expand(view.h.shape[0], n), {}


@dataclass(frozen=True)
class UniformConfig(_Baseline):
    """Keep a spatially even subset of the image grid (farthest-point order from the centre)."""

    method = "uniform"

    def rank(self, view: StageView):
        return torch.stack([scoring.even_spread_priority(view.token_coords(r)) for r in range(view.image_rank.shape[0])]), {}


register_method("random", RandomConfig)
register_method("uniform", UniformConfig)
