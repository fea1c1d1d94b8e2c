"""What VisionZip's hooks read in vision towers, shared by the families: the feature layer, and the two dominance
rules computed from an attention layer's q and k (so the tower keeps its attention backend): the attention the
CLS row pays (CLIP, InternViT), and the attention each token receives (CLS-free towers: SigLIP)."""

from __future__ import annotations

import torch


def feature_layer(layers, feature: int):
    """The encoder layer whose output is ``hidden_states[feature]`` (index 0 = the embeddings), as the towers'
    ``vision_feature_layer`` counts."""
    index = feature if feature >= 0 else len(layers) + 1 + feature
    if not 1 <= index <= len(layers):
        raise ValueError(f"vision_feature_layer={feature} selects no encoder layer")
    return layers[index - 1]


def cls_row_attention(hidden, queries, keys, heads: int, head_dim: int, scale: float):
    """CLS-row attention (mean over heads) and keys (mean over heads, `similarity_keys`) of one attention layer,
    from its q and k: ``queries`` and ``keys`` project (B, T, d) inputs to (B, T, heads * head_dim), norms
    included."""
    b, t, _ = hidden.shape
    q = queries(hidden[:, :1]).view(b, 1, heads, head_dim).transpose(1, 2).float()
    k = keys(hidden).view(b, t, heads, head_dim).transpose(1, 2).float()
    cls = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)[:, :, 0]  # (B, H, T)
    return cls.mean(1), similarity_keys(k)


def similarity_keys(k: torch.Tensor) -> torch.Tensor:
    """(..., T, head_dim) fp32 from keys (..., heads, T, head_dim): their mean over heads, the ``metric`` by which
    the official VisionZip assigns each merged token to a contextual target (``raw_key_states.mean(1)``)."""
    return k.float().mean(-3)


_QUERY_CHUNK = 1024


def received_attention(hidden, queries, keys, heads: int, head_dim: int, scale: float, mask=None):
    """The attention each row receives, (B, T): the mean over the rows of its own sample (and over heads) of their
    attention to it; and the keys (B, T, head_dim), their mean over heads (`similarity_keys`). ``queries`` / ``keys`` project (B, T, d) inputs;
    ``mask``: the layer's attention mask, additive (B, 1, T, T) floats or bool (True = may attend), or None."""
    b, t, _ = hidden.shape
    q = queries(hidden).view(b, t, heads, head_dim).transpose(1, 2)
    k = keys(hidden).view(b, t, heads, head_dim).transpose(1, 2)
    allowed = None
    if mask is not None:
        allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    return received_from_qk(q, k, scale, allowed), similarity_keys(k)


def received_from_qk(q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) the attention each row receives from rotated ``q``, ``k`` (B, heads, T, head_dim): the mean over the
    sample's real rows and over heads, in fp32. ``allowed``: (B, T, T) bool, True where a row may attend (None:
    everywhere); the real rows are those some row may attend to (a padding mask hides padded patches as keys), and
    only they pay. On a CPU two fused attention passes give it without a (T, T) map (`_received_fused`); elsewhere
    one (B, 1024, T) block of one head at a time keeps big towers within memory."""
    if allowed is not None and bool(allowed.all()):
        allowed = None
    if _FUSED and q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return _received_fused(q, k, scale, allowed)
    b, heads, t, _ = q.shape
    real = allowed.any(-2) if allowed is not None else torch.ones(b, t, dtype=torch.bool, device=q.device)
    received = torch.zeros(b, t, dtype=torch.float32, device=q.device)
    for head in range(heads):
        keys = k[:, head].float().transpose(-1, -2)
        for start in range(0, t, _QUERY_CHUNK):
            rows = slice(start, start + _QUERY_CHUNK)
            logits = q[:, head, rows].float() @ keys * scale
            if allowed is not None:
                logits = logits.masked_fill(~allowed[:, rows], float("-inf"))
            received += (torch.nan_to_num(torch.softmax(logits, dim=-1)) * real[:, rows, None]).sum(1)
    return received / (heads * real.sum(1, keepdim=True).clamp_min(1))


# False: always the blockwise sum (tests compare both ways with the eager reference).
_FUSED = True


def _received_fused(q, k, scale, allowed):
    """`received_from_qk` from two passes of the CPU's fused attention, which return each query row's log-sum-exp:

    1. ``lse_i = log sum_j exp(s q_i . k_j)``, row i's softmax normaliser;
    2. with the roles swapped, ``log sum_i exp(s k_j . q_i - lse_i) = log sum_i P_ij``, column j's received
       attention. The ``- lse_i`` of each key i rides in one extra head dimension (``k_j`` gets 1, ``q_i`` gets
       ``-lse_i / s``), so no per-head (T, T) bias is built; a padding mask is one (B, 1, T, T) float mask."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, heads, t, _ = q.shape
    q, k = q.float().contiguous(), k.float().contiguous()
    mask = real = None
    if allowed is not None:
        real = allowed.any(-2)  # (B, T): rows some row may attend to
        mask = torch.zeros(b, 1, t, t, device=q.device).masked_fill(~allowed[:, None], float("-inf"))
    _, lse = flash(q, k, k, 0.0, False, attn_mask=mask, scale=scale)  # (B, heads, T)
    paying = torch.isfinite(lse)
    if real is not None:  # a row that may attend to nothing pays nothing (the blockwise sum's nan_to_num), nor one
        paying = paying & (real & allowed.any(-1))[:, None, :]  # that is not real (the fused kernel's lse is finite)
    shift = torch.where(paying, -lse, 0.0)[..., None] / scale
    rows = torch.cat([q, shift], -1)  # (B, heads, T, head_dim + 1): the keys of pass 2
    cols = torch.cat([k, torch.ones_like(k[..., :1])], -1)  # its queries
    hide = ~paying[:, :, None, :]  # (B, heads, 1, T): rows that do not pay, for every column
    if allowed is not None:  # and the rows that may not attend to this column
        hide = hide | ~allowed.transpose(-1, -2)[:, None]
    bias = torch.zeros(hide.shape, device=q.device).masked_fill(hide, float("-inf"))
    _, lse2 = flash(cols, rows, rows, 0.0, False, attn_mask=bias, scale=scale)  # (B, heads, T) over columns
    seen = (~hide).any(-1)  # a column no paying row attends to receives nothing (the kernel would make it up)
    received = torch.where(seen, torch.exp(lse2), 0.0).sum(1)
    n_real = real.sum(1, keepdim=True) if real is not None else torch.full((b, 1), t, device=q.device)
    return received / (heads * n_real.clamp_min(1))
