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

    @classmethod
    def of_decoder(cls, text, name: str, image_tokens: int, **extra) -> "ArchSpec":
        """The ArchSpec of an HF text (decoder) config: its dimensions, with the family's nominal image count."""
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(name, text.hidden_size, text.intermediate_size, text.num_hidden_layers, heads, kv_heads, head_dim,
                   image_tokens, **extra)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def paper_layer_macs(n: int, d: int, m: int) -> int:
    """One decoder layer in the paper's convention: q/k/v/o projections, attention, SwiGLU FFN (MACs),
    n = visual tokens only."""
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def paper_tflops_of(tokens_per_layer, hidden_size: int, intermediate_size: int) -> float:
    """Paper-convention TFLOPs of a prefill whose layers process these visual-token counts."""
    return sum(paper_layer_macs(n, hidden_size, intermediate_size) for n in tokens_per_layer) / 1e12
