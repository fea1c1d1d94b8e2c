"""CDPruner (arXiv 2506.10967, NeurIPS 2025): before the LLM, keep the visual tokens that maximise a conditional
diversity: the MAP of a determinantal point process whose kernel weighs the tokens' similarity by their
relevance to the instruction, by fast greedy inference (Chen et al. 2018: incremental Cholesky).

Our reading, where the official LLaVA code has a CLIP text tower that HF checkpoints do not carry: as
OpenVINO's port does, the relevance is measured in the LLM's input space, between each visual token's embedding
(after the projector) and the embeddings of the instruction (the text after the sample's last visual token).
A token's relevance is minus its mean cosine with the instruction tokens (the sign both implementations use),
min-max normalised over the sample's visual tokens (``+1e-6`` on the numerator, as the code); ``theta`` < 1
sharpens it to ``exp(theta / (2 (1 - theta)) r)`` (OpenVINO's option; 1, the default, leaves it as the code
does). Similarity is the cosine of the visual embeddings; kernel ``L = diag(r) S diag(r)``. All of a sample's
visual tokens are chosen together; kept tokens go back in their order. Presets are the LLaVA-1.5 counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import OnEmbeddings, check_fraction, cosine_to, cosine_with_ties, register_method

_PRESETS = {"64": 64, "128": 128, "192": 192}  # tokens of LLaVA-1.5's 576


@dataclass(frozen=True)
class CDPrunerConfig(OnEmbeddings):
    """CDPruner, before the LLM: keep ``keep_ratio`` of each sample's visual tokens, the greedy MAP of the DPP with
    kernel diag(r) S diag(r) (S: cosine similarity, r: relevance to the instruction)."""

    keep_ratio: float = 128 / 576
    theta: float = 1.0
    method = "cdpruner"
    presets = {name: {"keep_ratio": tokens / 576} for name, tokens in _PRESETS.items()}  # "64": 64 of 576, ...

    def __post_init__(self):
        check_fraction("keep_ratio", self.keep_ratio)
        check_fraction("theta", self.theta)

    def selection_macs(self, n_image: int, hidden_size: int, text_tokens: int) -> int:
        k = self.count(n_image)  # similarity, relevance, and the greedy's k Cholesky rows of length n
        return n_image * n_image * hidden_size + n_image * text_tokens * hidden_size + n_image * k * k

    def relevance(self, image: torch.Tensor, text: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """(n,) the instruction relevance of each visual token, in [0, 1] (1 each when there is no instruction);
        ``first``: each token's first copy (`cosine_with_ties`), so copies get the same bits."""
        if text.shape[0] == 0:
            return torch.ones(image.shape[0], device=image.device)
        first = torch.arange(image.shape[0], device=image.device) if first is None else first
        r = -cosine_to(image, text, first).mean(-1)
        span = r.max() - r.min()
        r = (r - r.min() + 1e-6) / torch.where(span > 0, span, torch.ones_like(span))
        if self.theta != 1.0:
            r = torch.exp(self.theta / (2 * (1 - self.theta)) * r)
        return r

    def order(self, image: torch.Tensor, text: torch.Tensor, k: int) -> torch.Tensor:
        n = image.shape[0]
        if k >= n:
            return torch.arange(n, device=image.device)
        cosine, first = cosine_with_ties(image)  # copies of a token tied exactly
        r = self.relevance(image, text, first)
        kernel = r[:, None] * cosine * r[None, :]
        return greedy_dpp(kernel, k, first == torch.arange(n, device=image.device), rank=image.shape[1])


def greedy_dpp(kernel: torch.Tensor, k: int, originals: torch.Tensor | None = None,
               rank: int | None = None) -> torch.Tensor:
    """The k items of the greedy MAP of a DPP with PSD ``kernel`` (n, n), in choice order: each step takes the item
    with the largest marginal gain (its residual variance ``d2``), then updates every item's Cholesky row. Once the
    kernel's rank is exhausted (k above the embedding width: no item adds volume) the remaining items are taken
    by their own weight ``L_ii`` (their relevance), so exactly k distinct items come back. No host sync per step.
    ``originals``: (n,) bool, False for a copy of an earlier item; a copy adds no volume once its original is taken
    and ties with it before (exact arithmetic), so it is taken only by weight, once the rank is exhausted: rounding
    (which differs between CPUs) never decides between copies. ``rank``: the kernel's rank is at most this (the
    embedding width): once that many items are taken every residual is rounding, however large it looks."""
    n = kernel.shape[0]
    diag = kernel.diagonal().clone()
    floor = 1e-6 * diag.max()  # below this a residual is rounding, not volume
    d2 = diag.clone() if originals is None else diag.masked_fill(~originals, float("-inf"))
    rows = kernel.new_zeros(k, n)
    taken = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    chosen = []
    for i in range(k):
        exhausted = d2.max() <= floor
        if rank is not None and i >= rank:  # exact arithmetic leaves no volume: do not pick by rounding
            exhausted = torch.ones_like(exhausted)
        j = torch.where(exhausted, diag.masked_fill(taken, float("-inf")).argmax(), d2.argmax())
        chosen.append(j)
        taken[j] = True
        e = (kernel[j] - rows[:i, j] @ rows[:i]) / d2[j].clamp_min(floor).sqrt()
        rows[i] = torch.where(exhausted, torch.zeros_like(e), e)
        d2 = (d2 - rows[i] * rows[i]).masked_fill(taken, float("-inf"))
    return torch.stack(chosen)


register_method("cdpruner", CDPrunerConfig)
