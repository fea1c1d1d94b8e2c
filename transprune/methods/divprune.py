"""DivPrune (arXiv 2503.02175, CVPR 2025): before the LLM, keep a maximally diverse subset of the visual tokens:
a greedy max-min selection under the cosine distance. Re-implemented from the paper's rule (its code is CC
BY-NC: read for the rule only).

Our reading: the tokens are the LLM's input embeddings of the visual tokens (after the projector, as the code
takes them from ``inputs_embeds``), all of a sample's images together (the code prunes a LLaVA-NeXT image's
packed sequence, newlines included, jointly). Distance 1 - cos. The first token is the one whose nearest
neighbour is farthest; each next one maximises its distance to the nearest token already chosen. The default
keeps 0.098 of the tokens (56 of LLaVA-1.5's 576), the paper's setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import OnEmbeddings, check_fraction, cosine_with_ties, register_method


@dataclass(frozen=True)
class DivPruneConfig(OnEmbeddings):
    """DivPrune, before the LLM: keep ``keep_ratio`` of each sample's visual tokens, the greedy max-min diverse set."""

    keep_ratio: float = 0.098
    method = "divprune"
    reads_instruction = False

    def __post_init__(self):
        check_fraction("keep_ratio", self.keep_ratio)

    def selection_macs(self, n_image: int, hidden_size: int, text_tokens: int) -> int:
        return n_image * n_image * hidden_size  # the cosine matrix; the greedy is n per pick

    @staticmethod
    def order(image: torch.Tensor, text: torch.Tensor, k: int) -> torch.Tensor:
        n = image.shape[0]
        if k >= n:
            return torch.arange(n, device=image.device)
        distance = 1.0 - cosine_with_ties(image)[0]  # copies of a token tied exactly: the greedy is elementwise
        nearest = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=image.device), float("inf")).amin(0)
        first = nearest.argmax()
        chosen = [first]
        to_chosen = distance[first].clone()  # each token's distance to its nearest chosen token
        taken = torch.zeros(n, dtype=torch.bool, device=image.device)
        taken[first] = True
        for _ in range(k - 1):
            j = to_chosen.masked_fill(taken, float("-inf")).argmax()
            chosen.append(j)
            taken[j] = True
            to_chosen = torch.minimum(to_chosen, distance[j])
        return torch.stack(chosen)


register_method("divprune", DivPruneConfig)
