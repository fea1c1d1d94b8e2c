"""The paper's FLOPs convention (../shared/method.md §10) and the decoder facts it needs, shared by the
runtime's stats, the family adapters and the flops tool. No transformers import."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    """The decoder dimensions FLOPs depend on, plus the nominal image-token count N."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    image_tokens: int
    crops: int = 1  # vision crops per image (LLaVA-NeXT: base + 2x2 grid = 5); VisionZip keeps D + C per crop
    model_type: str | None = None  # the HF model_type (its family's rules, e.g. positions, apply); None: unknown
    # Pixels per side of one visual token for a dynamic-resolution family (Qwen: patch x merge); None: the
    # count is fixed by the vision tower (LLaVA) and ``image_tokens`` is it.
    pixels_per_token: int | None = None
    nominal_image_size: tuple[int, int] | None = None  # the (h, w) that gives ``image_tokens``, when dynamic
    # How ``intermediate_size`` was counted where it is not the config's dense MLP width (mixture of experts: the
    # active width per token); None: a dense SwiGLU MLP of that width.
    ffn: str | None = None

    @classmethod
    def of_decoder(cls, text, name: str, image_tokens: int, **extra) -> "ArchSpec":
        """The ArchSpec of an HF text (decoder) config: its dimensions, with the family's nominal image count. A
        mixture-of-experts decoder's FFN width is the active one (`active_ffn_width`)."""
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        width, ffn = active_ffn_width(text)
        return cls(name, text.hidden_size, width, text.num_hidden_layers, heads, kv_heads, head_dim,
                   image_tokens, **({"ffn": ffn} if ffn else {}), **extra)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def active_ffn_width(text) -> tuple[int, str | None]:
    """The SwiGLU width one token's FFN computes, averaged over the layers, and how it was counted. Dense: the
    config's ``intermediate_size``. Mixture of experts (``num_experts`` > 0; Qwen3-MoE's ``decoder_sparse_step`` and
    ``mlp_only_layers`` say which layers are sparse): ``num_experts_per_tok x moe_intermediate_size`` (plus a shared
    expert's width, where the config has one) on a sparse layer, the dense width elsewhere; the router (d x experts
    per token, under 1% of the FFN at real sizes) is not counted. The cost is linear in the width, so the mean is exact."""
    experts = getattr(text, "num_experts", None) or 0
    if experts <= 0:
        return text.intermediate_size, None
    top_k, expert = text.num_experts_per_tok, text.moe_intermediate_size
    shared = getattr(text, "shared_expert_intermediate_size", None) or 0
    step = getattr(text, "decoder_sparse_step", None) or 1
    dense_layers = set(getattr(text, "mlp_only_layers", None) or ())
    sparse = [i not in dense_layers and (i + 1) % step == 0 for i in range(text.num_hidden_layers)]
    widths = [top_k * expert + shared if s else text.intermediate_size for s in sparse]
    note = (f"mixture of experts: {top_k} of {experts} experts x {expert}" + (f" + shared {shared}" if shared else "")
            + f" active per token on {sum(sparse)} of {len(sparse)} layers (router not counted)")
    return round(sum(widths) / len(widths)), note


def paper_layer_macs(n: int, d: int, m: int) -> int:
    """One decoder layer in the paper's convention: q/k/v/o projections, attention, SwiGLU FFN (MACs),
    n = visual tokens only."""
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def paper_tflops_of(tokens_per_layer, hidden_size: int, intermediate_size: int) -> float:
    """Paper-convention TFLOPs of a prefill whose layers process these visual-token counts."""
    return sum(paper_layer_macs(n, hidden_size, intermediate_size) for n in tokens_per_layer) / 1e12
