"""Sequence surgery: drop tokens from a padded batch and keep positions, masks and bookkeeping consistent.

A batch is held left-padded: every row ends with its newest token, so a decode step appends one column
for all rows. Each sample keeps its own count, so after a drop the rows are re-padded to the longest.
Positions are opaque here: any tensor whose last two axes are (B, L) ((B, L) for 1-D RoPE, (3, B, L) for
mRoPE); what "closing up" positions after a drop means belongs to the model family's position rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Layout:
    """Per-token bookkeeping of the current (possibly pruned) prefill sequence: (B, L), positions (..., B, L)."""

    valid: torch.Tensor  # bool: a real token, not padding
    image: torch.Tensor  # bool: a (valid) image token
    image_rank: torch.Tensor  # long: index of an image token among its sample's image tokens, else -1
    orig_index: torch.Tensor  # long: column of this token in the caller's input
    positions: torch.Tensor  # long: RoPE position ids, (..., B, L)

    @classmethod
    def initial(cls, valid: torch.Tensor, image: torch.Tensor, positions: torch.Tensor) -> "Layout":
        image = image & valid
        rank = torch.where(image, image.long().cumsum(1) - 1, -1)
        cols = torch.arange(valid.shape[1], device=valid.device).expand(valid.shape)
        return cls(valid, image, rank, cols, positions)

    @property
    def length(self) -> int:
        return self.valid.shape[1]


def last_tokens(valid: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: each row's last real token (the one whose output predicts the next token)."""
    cols = torch.arange(valid.shape[1], device=valid.device)
    last = torch.where(valid, cols, -1).amax(1, keepdim=True)
    return cols[None, :] == last


def keep_index(keep: torch.Tensor, new_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index (B, L_new) that packs the ``keep`` columns of each row to the right (left padding).

    Returns (index, new_valid). Padding slots point at column 0 and are marked invalid. ``new_length``:
    the caller knows every row keeps exactly that many columns; the same index then comes from a stable
    sort, with no host synchronisation (nothing is padded).
    """
    if new_length is not None:
        index = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :new_length]
        return index, torch.ones(keep.shape[0], new_length, dtype=torch.bool, device=keep.device)
    counts = keep.sum(1)
    new_len = int(counts.max()) if keep.shape[0] else 0
    dest = keep.long().cumsum(1) - 1 + (new_len - counts)[:, None]
    rows, cols = keep.nonzero(as_tuple=True)
    index = torch.zeros(keep.shape[0], new_len, dtype=torch.long, device=keep.device)
    new_valid = torch.zeros(keep.shape[0], new_len, dtype=torch.bool, device=keep.device)
    index[rows, dest[rows, cols]] = cols
    new_valid[rows, dest[rows, cols]] = True
    return index, new_valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the token axis (dim 1) of a (B, L) or (B, L, d) tensor."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def gather_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather (..., B, L) positions along the token axis (last) with a (B, L_new) index."""
    return positions.gather(-1, index.expand(*positions.shape[:-2], *index.shape))


def drop_tokens(layout: Layout, keep: torch.Tensor, close_up: Callable | None = None,
                new_length: int | None = None) -> tuple[Layout, torch.Tensor]:
    """The layout after keeping the ``keep`` tokens (a (B, L) bool mask over the current sequence).

    ``close_up(positions, valid, dropped)``, when given, renumbers the positions before the gather (the
    family's "compact" rule); without it kept tokens keep their positions. Returns the new layout and the
    gather index to apply to hidden states and per-token scores. ``new_length``: see `keep_index` (every
    row keeps exactly that many tokens).
    """
    keep = keep & layout.valid
    index, new_valid = keep_index(keep, new_length)
    positions = layout.positions
    if close_up is not None:
        positions = close_up(positions, layout.valid, layout.valid & ~keep)
    zero = torch.zeros((), dtype=torch.long, device=index.device)
    new = Layout(
        valid=new_valid,
        image=gather_tokens(layout.image, index) & new_valid,
        image_rank=torch.where(new_valid, gather_tokens(layout.image_rank, index), zero - 1),
        orig_index=gather_tokens(layout.orig_index, index),
        positions=torch.where(new_valid, gather_positions(positions, index), zero),
    )
    return new, index


def scatter_to_input(h: torch.Tensor, layout: Layout, input_length: int) -> torch.Tensor:
    """Place the rows of a pruned sequence back at their input columns; dropped tokens' rows are zero."""
    out = h.new_zeros(h.shape[0], input_length, h.shape[-1])
    rows, cols = layout.valid.nonzero(as_tuple=True)
    out[rows, layout.orig_index[rows, cols]] = h[rows, cols]
    return out
