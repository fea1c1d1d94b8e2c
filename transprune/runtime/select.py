"""One selection routine for every in-LLM method: build the `StageView` of rows that line up, ask the
method's scorer, keep the top-k image tokens of each row."""

from __future__ import annotations

import torch

from .. import scoring
from ..devices import execution_device
from ..methods import StageView


def select(method, adapter, state, layer_index: int, stage: int, keep_counts: list[int], aligned: bool = True):
    """Score the image tokens of every sample at pruning stage ``stage`` (after 0-based layer ``layer_index``);
    returns the (B, L) mask of tokens to keep and, when every row keeps the same number of tokens with no padding, that number (else None).

    Rows that line up (no padding, image tokens in the same columns: the usual benchmark / serving batch of
    same-length prompts, and any single sample) are scored in one batched view; otherwise one view per
    sample over its valid tokens. Both give the same bits (``aligned=False`` forces the per-sample views).
    """
    layout = state.layout
    keep = layout.valid & ~layout.image
    if aligned and state.all_valid and (layout.image.shape[0] == 1 or bool((layout.image == layout.image[:1]).all())):
        image_cols = layout.image[0].cpu().nonzero().squeeze(1)  # on the host: one copy, no more syncs
        batch, length = layout.valid.shape
        if image_cols.numel() == 0:
            for b in range(batch):
                state.kept_ranks[b].append(layout.image_rank.new_zeros(0))
            return keep, length
        last_image = int(image_cols[-1])  # a host tensor: no sync
        image_cols = image_cols.to(layout.valid.device)
        view = _view(adapter, state, layer_index, stage, slice(None), slice(None), image_cols, state.rope,
                     last_image, keep_counts[0])
        score = _scored(method, view, state, range(batch))
        if last_image == length - 1:  # the prompt ends with an image token: it predicts the next token, so it stays
            score = _last_stays(score)
        chosen = image_cols[scoring.select_top(score, keep_counts[0])]
        keep.scatter_(1, chosen, True)
        ranks = layout.image_rank.gather(1, chosen)
        for b in range(batch):
            state.kept_ranks[b].append(ranks[b])
        return keep, length - image_cols.numel() + keep_counts[0]
    for b, k in enumerate(keep_counts):
        cols = layout.valid[b].nonzero().squeeze(1)
        image_at = layout.image[b, cols].nonzero().squeeze(1)  # image tokens, as indices into cols
        if image_at.numel() == 0:
            state.kept_ranks[b].append(image_at)
            continue
        rope = adapter.rope_rows(state.rope, b, cols)
        view = _view(adapter, state, layer_index, stage, slice(b, b + 1), cols, image_at, rope,
                     int(image_at[-1]), k)
        score = _scored(method, view, state, [b])[0]
        if int(image_at[-1]) == cols.numel() - 1:  # the sample's last token is an image token: it stays
            score = _last_stays(score)
        chosen = image_at[scoring.select_top(score, k)]
        keep[b, cols[chosen]] = True
        state.kept_ranks[b].append(layout.image_rank[b, cols[chosen]])
    return keep, None


def _last_stays(score: torch.Tensor) -> torch.Tensor:
    """``score`` with each row's last image token ranked first (a copy: the recorded scores stay the method's)."""
    score = score.clone()
    score[..., -1] = float("inf")
    return score


def _view(adapter, state, layer_index, stage, rows, cols, image_at, rope, last_image, keep) -> StageView:
    """The StageView of batch rows ``rows`` restricted to token columns ``cols``."""
    layout = state.layout
    h, h_in = state.h[rows][:, cols], state.h_in[rows][:, cols]
    index = {"this": layer_index, "next": layer_index + 1}

    def attention(which, source, query_idx):
        i = index[which]  # the layer whose weights, rotary embedding and window the rows are computed with
        cos, sin = adapter.rope_for(rope, i)
        q, k, scale = adapter.scoring_qk(adapter.layers[i], source, cos, sin, query_idx)
        return scoring.instruction_attention(q, k, query_idx.to(q.device), scale,
                                             window=adapter.attention_window(i)).to(source.device)

    def keys(which, source):
        i = index[which]
        cos, sin = adapter.rope_for(rope, i)
        _, k, _ = adapter.scoring_qk(adapter.layers[i], source, cos, sin, image_at[:1])  # one query row, unused
        return k.transpose(-3, -2).flatten(-2).to(source.device)  # (R, S, heads * head_dim)

    def final_norm(x):
        return adapter.final_norm(x.to(execution_device(adapter.decoder.norm, x.device))).to(x.device)

    image_rank = layout.image_rank[rows][:, cols][:, image_at]
    positions = layout.positions[..., rows, :][..., cols][..., image_at]  # any layout, token axis last

    def token_coords(r):
        return adapter.token_coords(image_rank[r], positions[..., r, :])

    return StageView(h=h, h_in=h_in, image_at=image_at, image_rank=image_rank,
                     ttv=state.ttv[rows][:, cols][:, image_at], stage=stage, last_image=last_image,
                     attention=attention, token_coords=token_coords, keys=keys, final_norm=final_norm, keep=keep)


def _scored(method, view: StageView, state, samples) -> torch.Tensor:
    """The method's (R, n) score; records the scores of each row when asked."""
    score, parts = method.rank(view)
    if state.scores is not None:
        for r, b in enumerate(samples):
            state.scores[b].append({"image_index": view.image_rank[r].cpu(), **{n: v[r].cpu() for n, v in parts.items()},
                                    "score": score[r].float().cpu()})
    return score
