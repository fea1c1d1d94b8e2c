"""DART (arXiv 2502.11494, EMNLP 2025): duplication matters more than importance. After a shallow layer, pick a
few pivot tokens by the norm of their keys, then keep the image tokens least similar to the pivots.

Our reading of the official code (`get_retained_image_token`), on the seam's terms:

* The signals come from the pruning layer (1-indexed ``layer``, 2 by default: the code's ``pruned_layer=2`` cuts
  before 0-based layer 2): its keys, recomputed from its input (the layer's own projection, RoPE and GQA
  repeat, heads concatenated), and its output through the decoder's final norm.
* Pivots: the ``image_pivots`` image tokens and the ``text_pivots`` tokens after the last image whose keys have
  the largest L1 norm (the code's ``torch.norm(p=1)``, where the paper says K-norm). Image pivots are kept,
  text pivots only guide.
* The pivots are visited in the code's order, that of ``list(set(image_indices + query_indices))``: a set of ints
  iterates in an order CPython fixes from their values and insertion order, so building the same set from the
  same positions (each list in key-norm order) reproduces it exactly (``pivot_order="position"``: left to right,
  our variant). Each takes, from the image tokens not yet taken, its share of the budget with the lowest cosine
  similarity to it (in the final-norm space). The code's share is
  ``max_num_trunction // 8`` per pivot (192 -> 24: 4 + 8 x 24 = 196 kept); here the share is
  ``ceil((keep - image_pivots) / pivots)`` and the last pivot takes what is left, so a stage keeps exactly its
  keep ratio of the image tokens, like every method here.
* Kept tokens keep their positions (the code gathers ``position_ids``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import DEFAULT_ORIGINAL, InLLMMethod, StageView, choice, register_method

# The order the pivots take their shares in: the official code's (a Python set's), or by position.
PIVOT_ORDERS = ("official", "position")

# The code's operating points on LLaVA-1.5 (576 tokens): 4 image pivots + 8 x (max_num_trunction // 8) kept.
_PRESETS = {"192": 196, "128": 132, "64": 68}


@dataclass(frozen=True)
class DARTConfig(InLLMMethod):
    """DART: after ``pruning_layers`` (one by default: layer 2) keep ``keep_ratios`` of the image tokens, the key-norm
    pivots and the tokens least similar to them."""

    pruning_layers: tuple[int, ...] = (2,)
    keep_ratios: tuple[float, ...] = ((_PRESETS["128"] + 0.5) / 576,)  # 132 of LLaVA-1.5's 576 (the "128" point)
    image_pivots: int = 4
    text_pivots: int = 4
    pivot_order: str = "official"
    positions: str = DEFAULT_ORIGINAL
    reference_depth: int | None = None
    method = "dart"
    # the code's LLaVA-1.5 points by their nominal count: "192", "128", "64" (196, 132, 68 of 576 kept)
    presets = {name: {"keep_ratios": ((kept + 0.5) / 576,)} for name, kept in _PRESETS.items()}

    def __post_init__(self):
        self.check_schedule()
        choice("pivot_order", self.pivot_order, PIVOT_ORDERS)
        for name in ("image_pivots", "text_pivots"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.image_pivots + self.text_pivots == 0:
            raise ValueError("image_pivots + text_pivots must be >= 1 (DART needs a pivot)")

    def scoring_query_rows(self, query_tokens: int) -> int:
        return 0  # no attention rows; the keys of the pruning layer are recomputed (counted by the FLOPs tool)

    def selection_macs(self, n_image: int, hidden_size: int, text_tokens: int) -> int:
        n = n_image + text_tokens  # key norms, the final norm of every token, pivot cosines with the image tokens
        return 2 * n * hidden_size + (self.image_pivots + self.text_pivots) * n_image * hidden_size

    def rank(self, view: StageView):
        keys = view.keys("this", view.h_in).float()
        normed = view.final_norm(view.h).float()
        rows = [self._priority(keys[r], normed[r], view.image_at, view.last_image, view.keep)
                for r in range(view.h.shape[0])]
        return torch.stack(rows), {}

    def _priority(self, keys, normed, image_at, last_image: int, keep: int) -> torch.Tensor:
        """(n,) score whose top ``keep`` are DART's choice: pivots first, then each pivot's picks in order."""
        n = image_at.numel()
        norms = keys.abs().sum(-1)  # L1
        image_pivots = image_at[torch.topk(norms[image_at], min(self.image_pivots, n)).indices]
        after = torch.arange(last_image + 1, keys.shape[0], device=keys.device)
        text_pivots = after[torch.topk(norms[after], min(self.text_pivots, after.numel())).indices]
        order = []  # positions among image_at, in choice order
        local = {int(c): i for i, c in enumerate(image_at.tolist())}
        pivot_set = [local[int(c)] for c in image_pivots.tolist()]
        if keep <= len(pivot_set):  # the budget is the pivots (by key norm)
            order = pivot_set
        else:
            order = list(pivot_set)
            pool = torch.ones(n, dtype=torch.bool, device=keys.device)
            pool[pivot_set] = False
            pivots = image_pivots.tolist() + text_pivots.tolist()  # token positions, each list in key-norm order
            # The code visits `list(set(image_indices + query_indices))`: CPython's order for a set of ints, fixed by
            # their values and insertion order (so by the positions), which this reproduces exactly; "position"
            # visits them left to right.
            pivots = list(set(pivots)) if self.pivot_order == "official" else sorted(pivots)
            if not pivots:  # no image pivots asked and no text after the image: rank by key norm alone
                return norms[image_at]
            share = math.ceil((keep - len(pivot_set)) / len(pivots))
            candidates = normed[image_at]
            for pivot in pivots:
                need = min(share, keep - len(order), int(pool.sum()))
                if need <= 0:
                    break
                similarity = F.cosine_similarity(normed[pivot][None], candidates, dim=-1)
                similarity = similarity.masked_fill(~pool, float("inf"))
                picks = torch.sort(similarity, stable=True).indices[:need]  # least similar; ties: the earlier token
                order += picks.tolist()
                pool[picks] = False
        score = torch.zeros(n, dtype=torch.float32, device=keys.device)
        score[torch.tensor(order, dtype=torch.long, device=keys.device)] = torch.arange(
            len(order), 0, -1, dtype=torch.float32, device=keys.device)
        return score


register_method("dart", DARTConfig)
