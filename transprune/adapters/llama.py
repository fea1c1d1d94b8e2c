"""The decoder-layer pieces shared by Llama-style text models (Llama, Vicuna, Mistral, Qwen2).

A pre-norm layer is: h' = h + Attn(Norm_in(h)); h'' = h' + MLP(Norm_post(h')). TTV needs the module
inputs after their norms and the module outputs before the residual adds, so layers that accumulate
TTV run this body here, with the layer's own submodules; other layers run the layer's own forward.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from ..compat import cache_kwargs
from ..devices import execution_device, to_device


def run_layer(layer, h, *, mask, position_embeddings, position_ids, cache, use_cache, capture: bool):
    """One decoder layer. With ``capture`` also returns (attn_in, attn_out, mlp_in, mlp_out)."""
    if not capture:
        out = layer(
            h,
            attention_mask=mask,
            position_ids=position_ids,
            **cache_kwargs(cache),
            use_cache=use_cache,
            position_embeddings=position_embeddings,
        )
        return (out[0] if isinstance(out, tuple) else out), None
    # The layer's parts are called one by one: move the inputs to where the layer runs (accelerate device maps).
    device = execution_device(layer, h.device)
    h, mask, position_embeddings = to_device((h, mask, position_embeddings), device)
    attn_in = layer.input_layernorm(h)
    attn_out, _ = layer.self_attn(
        hidden_states=attn_in,
        attention_mask=mask,
        position_ids=position_ids,
        **cache_kwargs(cache),
        use_cache=use_cache,
        position_embeddings=position_embeddings,
    )
    h = h + attn_out
    mlp_in = layer.post_attention_layernorm(h)
    mlp_out = layer.mlp(mlp_in)
    return h + mlp_out, (attn_in, attn_out, mlp_in, mlp_out)


def scoring_qk(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query_idx: torch.Tensor,
               head_norms: bool = False):
    """Rotated queries of the rows ``query_idx`` and keys of all rows, with ``layer``'s weights.

    h: (S, d) hidden states of one sample's valid tokens, input to ``layer``; cos/sin: (S, head_dim).
    Returns q (H, T, hd), k (H, S, hd) with KV heads repeated for GQA, and the attention scaling.
    Only T query rows are projected: the instruction is short, the keys must cover every token because
    the softmax denominator does. With a batch dim (h (B, S, d), cos/sin (B, S, hd), the same rows
    ``query_idx`` in every sample) q and k are (B, H, T, hd) and (B, H, S, hd). ``head_norms``: the attention
    normalises q and k per head before RoPE (its ``q_norm`` / ``k_norm`` over head_dim: Qwen3, Qwen3-VL).
    """
    attn = layer.self_attn
    head_dim = attn.head_dim
    device = execution_device(layer, h.device)  # accelerate device maps: the layer's parts run where it runs
    h, cos, sin, query_idx = to_device((h, cos, sin, query_idx), device)
    x = layer.input_layernorm(h)
    lead = x.shape[:-2]
    k = attn.k_proj(x).view(*lead, x.shape[-2], -1, head_dim)
    k = (attn.k_norm(k) if head_norms else k).transpose(-3, -2)
    rows = x[..., query_idx, :]
    # Queries sample by sample: a GEMM over T rows accumulates like the one-sample call (over B*T rows, or
    # as a GEMV when T == 1, BLAS may order the sums differently), so batched scores equal the loop's bits.
    q = torch.stack([attn.q_proj(r) for r in rows]) if lead else attn.q_proj(rows)
    q = q.view(*lead, query_idx.shape[0], -1, head_dim)
    q = (attn.q_norm(q) if head_norms else q).transpose(-3, -2)
    cos_q, sin_q = cos[..., query_idx, :].unsqueeze(-3), sin[..., query_idx, :].unsqueeze(-3)
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # broadcast over heads
    k = k * cos + rotate_half(k) * sin
    q = q * cos_q + rotate_half(q) * sin_q
    n_rep = q.shape[-3] // k.shape[-3]
    k = repeat_kv(k[None], n_rep)[0] if k.dim() == 3 else repeat_kv(k, n_rep)
    return q, k, attn.scaling


def qwen2_text(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int):
    """The text config fields of a Qwen2-style decoder of these sizes (the public Qwen2 / Qwen2.5 facts: vocabulary,
    RoPE base, ids), for the named archs of the families built on it."""
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=152128,
                max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=151643,
                eos_token_id=151645, tie_word_embeddings=False)
