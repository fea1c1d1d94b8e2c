"""What VisionZip's hooks read in vision towers, shared by the families: the feature layer, and the two dominance
rules computed from an attention layer's q and k (so the tower keeps its attention backend): the attention the
CLS row pays (CLIP, InternViT), and the attention each token receives (CLS-free towers: SigLIP)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class VisionHooks:
    """What VisionZip reads from one family's vision tower: the contract each family's hooks keep (defaults here;
    a family writes what differs). ``adapter.vision_hooks()`` returns one, or None with the reason in
    ``adapter.vision_hooks_missing``."""

    # encoder method name per modality, on the multimodal model: the calls VisionZip wraps ({"image": ...})
    encoders: dict[str, str] = {}
    # whether the tower's CLS token is among the features the LLM gets (LLaVA: kept as the first dominant token)
    cls_reaches_llm = False

    def __init__(self, adapter):
        self.adapter = adapter
        self.mm = adapter.multimodal_model

    def check(self) -> None:
        """Raise, before the model changes, when this model's tower cannot be read (the default: find the layer)."""
        self.attention_layer()

    def patches_per_tile(self) -> int | None:
        """Tokens per unit VisionZip keeps a share of; None: it varies per image (dynamic resolution)."""
        raise NotImplementedError

    def attention_layer(self):
        """The attention module whose q and k score dominance."""
        raise NotImplementedError

    @staticmethod
    def capture(attn, args, kwargs):
        """(score, keys) from one call of ``attention_layer`` with these arguments (before it runs)."""
        raise NotImplementedError

    @staticmethod
    def forward_with_lse(attn, args, kwargs):
        """The layer's own output and the score's first pass in one call (`forward_with_lse`), or None: the layer
        runs as it is and `capture` makes the score (the default)."""
        return None

    def geometry(self, modality, args, kwargs):
        """What `units` and `merge` need of the encoder's arguments (grids, sizes); None when nothing."""
        return None

    def units(self, image_outputs, captured, geometry):
        """[(score (n,), unit-norm keys (n, d))] per unit, in token order."""
        raise NotImplementedError

    def merge(self, image_outputs, plans, geometry):
        """Write each unit's kept and merged tokens into ``image_outputs``; return (keep, source) as
        `VisionZipConfig.select` documents."""
        raise NotImplementedError


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
    return received_from_qk(q, k, scale, _allowed(mask)), similarity_keys(k)


def _allowed(mask) -> torch.Tensor | None:
    """(B, T, T) bool, True where a row may attend, of a layer's (B, 1, T, T) bool or additive mask; None for None."""
    if mask is None:
        return None
    return mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2


def layer_inputs(args, kwargs):
    """(hidden states, attention mask or None) of one attention-layer call, however they were passed."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return hidden, kwargs.get("attention_mask", args[1] if len(args) > 1 else None)


def capture_received(attn, args, kwargs, mask: bool = False):
    """`received_attention` of one call of a SigLIP-shaped layer (q/k projections, ``num_heads``, ``head_dim``,
    ``scale``), reading the call's mask where ``mask`` (a tower that pads its crops)."""
    hidden, given = layer_inputs(args, kwargs)
    return received_attention(hidden, attn.q_proj, attn.k_proj, attn.num_heads, attn.head_dim, attn.scale,
                              given if mask else None)


def shared_received(attn, args, kwargs, mask: bool = False):
    """`forward_with_lse` of one such call, the hooks' ``forward_with_lse``; without ``mask`` (the score reads none),
    a call that is given one runs as it is (None), so the layer and the score never see different masks."""
    hidden, given = layer_inputs(args, kwargs)
    if given is not None and not mask:
        return None
    return forward_with_lse(attn, hidden, given)


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

    1. ``lse_i = log sum_j exp(s q_i . k_j)``, row i's softmax normaliser (the pass the layer itself makes:
       `forward_with_lse` shares it);
    2. `received_from_lse`."""
    q, k = q.float().contiguous(), k.float().contiguous()
    _, lse = _FLASH(q, k, k, 0.0, False, attn_mask=_additive(allowed, q), scale=scale)  # (B, heads, T)
    return received_from_lse(q, k, lse, scale, allowed)


def _flash(*args, **kwargs):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args, **kwargs)


_FLASH = _flash


def _additive(allowed, like):
    """(B, 1, T, T) float mask (0 / -inf) of a bool ``allowed`` (B, T, T), or None."""
    if allowed is None:
        return None
    return torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=like.dtype, device=like.device).masked_fill(
        ~allowed[:, None], float("-inf"))


def received_from_lse(q, k, lse, scale, allowed=None):
    """(B, T) `received_from_qk` given each query row's log-sum-exp ``lse`` (B, heads, T) of its softmax over the keys:
    with the roles swapped, ``log sum_i exp(s k_j . q_i - lse_i) = log sum_i P_ij`` is column j's received
    attention. The ``- lse_i`` of each key i rides in one extra head dimension (``k_j`` gets 1, ``q_i`` gets
    ``-lse_i / s``), so no per-head (T, T) bias is built; a padding mask is one (B, 1, T, T) float mask."""
    b, heads, t, _ = q.shape
    q, k = q.float().contiguous(), k.float().contiguous()
    real = None
    paying = torch.isfinite(lse)
    if allowed is not None:  # a row that may attend to nothing pays nothing (the blockwise sum's nan_to_num), nor
        real = allowed.any(-2)  # one that is not real (B, T: rows some row may attend to; the kernel's lse is finite)
        paying = paying & (real & allowed.any(-1))[:, None, :]
    shift = torch.where(paying, -lse.float(), 0.0)[..., None] / scale
    rows = torch.cat([q, shift], -1)  # (B, heads, T, head_dim + 1): the keys of pass 2
    cols = torch.cat([k, torch.ones_like(k[..., :1])], -1)  # its queries
    hide = ~paying[:, :, None, :]  # (B, heads, 1, T): rows that do not pay, for every column
    if allowed is not None:  # and the rows that may not attend to this column
        hide = hide | ~allowed.transpose(-1, -2)[:, None]
    bias = torch.zeros(hide.shape, device=q.device).masked_fill(hide, float("-inf"))
    _, lse2 = _FLASH(cols, rows, rows, 0.0, False, attn_mask=bias, scale=scale)  # (B, heads, T) over columns
    seen = (~hide).any(-1)  # a column no paying row attends to receives nothing (the kernel would make it up)
    received = torch.where(seen, torch.exp(lse2), 0.0).sum(1)
    n_real = real.sum(1, keepdim=True) if real is not None else torch.full((b, 1), t, device=q.device)
    return received / (heads * n_real.clamp_min(1))


# False: the scored layer runs as it would and the score makes both passes (tests compare both ways).
_SHARE_LAYER_PASS = True


@dataclass(frozen=True)
class LayerPass:
    """What a SigLIP-shaped attention layer computed that the received-attention score needs again: its rotated
    q and k (B, heads, T, head_dim), each query's log-sum-exp (B, heads, T), the scale and the layer's mask."""

    q: torch.Tensor
    k: torch.Tensor
    lse: torch.Tensor
    scale: float
    allowed: torch.Tensor | None

    def received(self):
        """(received attention (B, T), keys (B, T, head_dim)): what `received_attention` returns."""
        return received_from_lse(self.q, self.k, self.lse, self.scale, self.allowed), similarity_keys(self.k)


def forward_with_lse(attn, hidden, mask) -> tuple[tuple, LayerPass] | None:
    """A SigLIP-shaped attention layer's own forward (q/k/v/out projections, no rotary, no dropout), run where its
    backend is sdpa on a CPU through the fused kernel sdpa itself calls there, so its output is the layer's; the
    kernel also returns each query's log-sum-exp, pass 1 of the received-attention score. None where the layer
    would run another kernel (eager, a GPU, training, an unknown layer): the caller runs it as it is."""
    if not (_FUSED and _SHARE_LAYER_PASS and hidden.device.type == "cpu" and not attn.training
            and hidden.dtype == torch.float32 and getattr(attn.config, "_attn_implementation", None) == "sdpa"
            and all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "out_proj", "scale", "head_dim"))
            and not getattr(attn, "is_causal", False)
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
            and torch.backends.cuda.flash_sdp_enabled()  # sdpa's flash switch (it governs the CPU kernel too)
            and not torch.is_autocast_enabled("cpu")  # the raw kernel is not autocast's
            and getattr(attn, "_hf_hook", None) is None):  # accelerate's hook moves / loads what the module gets
        return None
    if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1):
        return None
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(hidden).view(shape).transpose(1, 2)
    k = attn.k_proj(hidden).view(shape).transpose(1, 2)
    v = attn.v_proj(hidden).view(shape).transpose(1, 2)
    additive = _additive(mask[:, 0], q) if mask is not None and mask.dtype == torch.bool else mask  # as sdpa converts it
    out, lse = _FLASH(q, k, v, 0.0, False, attn_mask=additive, scale=attn.scale)
    out = attn.out_proj(out.transpose(1, 2).reshape(*hidden.shape[:-1], -1).contiguous())
    allowed = _allowed(mask)
    if allowed is not None and bool(allowed.all()):
        allowed = None
    return (out, None), LayerPass(q, k, lse, attn.scale, allowed)
