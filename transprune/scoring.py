"""TransPrune scoring math: pure functions over tensors (../shared/method.md §3-5).

Everything is computed in fp32 whatever the model dtype, and every softmax or normalisation runs
over the valid (non-padding) tokens of one sample only.
"""

from __future__ import annotations

import torch

EPS = 1e-8  # the official code's L1-normalisation epsilon


def module_transition(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token magnitude ratio ||y|| / ||x|| and cosine(x, y) of a module's input x and output y.

    x is the module input after its RMSNorm, y the module output before the residual add; both
    (..., d). Returns two fp32 tensors of shape (...).
    """
    x = x.float()
    y = y.float()
    nx = torch.linalg.vector_norm(x, dim=-1)
    ny = torch.linalg.vector_norm(y, dim=-1)
    cos = (x * y).sum(-1) / (nx * ny).clamp_min(1e-12)
    return ny / nx.clamp_min(1e-12), cos


def direction_term(cos: torch.Tensor, direction: str) -> torch.Tensor:
    """``1 - cos`` (official code) or ``1 - |cos|`` (paper Eq. 2)."""
    if direction == "1-cos":
        return 1.0 - cos
    if direction == "1-abs-cos":
        return 1.0 - cos.abs()
    raise ValueError(f"direction={direction!r}; choose '1-cos' or '1-abs-cos'")


def masked_softmax(u: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``valid`` positions (padding gets exactly 0)."""
    u = u.masked_fill(~valid, float("-inf"))
    out = torch.softmax(u, dim=-1)
    return out.masked_fill(~valid, 0.0)


def module_ttv(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, direction: str) -> torch.Tensor:
    """TTV of one module for every token: softmax_seq(direction(cos)) * magnitude. Shape (B, L)."""
    magnitude, cos = module_transition(x, y)
    return masked_softmax(direction_term(cos, direction), valid) * magnitude


def l1_normalize(v: torch.Tensor) -> torch.Tensor:
    return v / (v.sum(-1, keepdim=True) + EPS)


def instruction_attention(
    q: torch.Tensor, k: torch.Tensor, query_pos: torch.Tensor, scaling: float, window: int | None = None
) -> torch.Tensor:
    """Mean attention that the query rows pay to every key, for one sample (IGA before slicing).

    q: (H, T, hd) queries of the instruction rows, already rotated; k: (H, S, hd) keys of all S valid
    tokens (KV heads already repeated for GQA); query_pos: (T,) index of each query row among the S
    tokens, for the causal mask. The softmax runs over all keys each row may see, in fp32, then the
    result is averaged over heads and rows: shape (S,). Leading batch dims (q (B, H, T, hd), k (B, H, S,
    hd), the same query rows in every sample) give (B, S), each row computed as alone. ``window``: a
    sliding-window layer's, each row sees only its last ``window`` keys (itself included), as the layer does.
    """
    if q.shape[-2] == 0:
        return torch.zeros(*k.shape[:-3], k.shape[-2], dtype=torch.float32, device=k.device)
    if q.dim() == 4:  # sample by sample: one (H, T, S) product each, summed exactly as for a lone sample
        logits = torch.stack([torch.matmul(qb.float(), kb.float().transpose(-1, -2)) for qb, kb in zip(q, k)])
    else:
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2))
    logits = logits * scaling  # (..., H, T, S)
    key_idx = torch.arange(k.shape[-2], device=k.device)
    hidden = key_idx[None, :] > query_pos[:, None]  # (T, S): the future
    if window is not None:
        hidden = hidden | (key_idx[None, :] <= query_pos[:, None] - window)
    logits = logits.masked_fill(hidden, float("-inf"))
    return torch.softmax(logits, dim=-1).mean(-3).mean(-2)


def combine(ttv: torch.Tensor, iga: torch.Tensor, alpha: float, score: str) -> torch.Tensor:
    """Paper Eq. 6 on L1-normalised parts: alpha * TTV + (1 - alpha) * IGA (code: both at weight 1)."""
    if score == "ttv":
        return l1_normalize(ttv)
    if score == "iga":
        return l1_normalize(iga)
    return alpha * l1_normalize(ttv) + (1.0 - alpha) * l1_normalize(iga)


def select_top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, back in ascending (original) order. Ties go to the earlier token.
    A (B, n) score gives (B, k): each row on its own."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


def even_spread_priority(coords: torch.Tensor) -> torch.Tensor:
    """A score whose top-k is a spatially even subset for every k: farthest-point order on ``coords``
    (n, c), starting from the token nearest the centre (ties go to the earlier token). It depends on the grid
    only, so each grid's order is computed once (a sequential walk of n steps) and then reused."""
    key = (tuple(coords.shape), str(coords.dtype), coords.detach().cpu().numpy().tobytes())
    score = _SPREAD_CACHE.get(key)
    if score is None:
        score = _even_spread(coords.detach().cpu())
        _SPREAD_CACHE[key] = score
        while len(_SPREAD_CACHE) > 256:  # the oldest grids go first
            _SPREAD_CACHE.pop(next(iter(_SPREAD_CACHE)))
    return score.to(coords.device)


# grid -> its farthest-point score (CPU). Keyed by the coordinates' bytes: a pure function of them, so sharing it
# between models and threads is safe (a race computes the same value twice).
_SPREAD_CACHE: dict = {}


def _even_spread(coords: torch.Tensor) -> torch.Tensor:
    n = coords.shape[0]
    coords = coords.float()
    centre = coords.mean(0, keepdim=True)
    first = int(torch.argmin(((coords - centre) ** 2).sum(1)))
    order = torch.empty(n, dtype=torch.long)
    nearest = torch.full((n,), float("inf"))
    current = first
    for step in range(n):
        order[step] = current
        nearest = torch.minimum(nearest, ((coords - coords[current]) ** 2).sum(1))
        nearest[order[: step + 1]] = -1.0
        current = int(torch.argmax(nearest))
    score = torch.empty(n, dtype=torch.float32)
    score[order] = torch.arange(n, 0, -1, dtype=torch.float32)
    return score
