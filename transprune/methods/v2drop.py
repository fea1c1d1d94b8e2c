"""V2Drop (CVPR 2026, arXiv 2509.01552): drop, progressively, the image tokens whose representation varies least
between adjacent layers. No attention is read.

Our reading of the official code (`V2Drop.py`): at a pruning layer (1-indexed p: the code's targets are the
0-based layers it cuts before), a token's variation is the L2 norm of what layer p changed in it, ``||h_out -
h_in||`` on the residual stream (the code's ``||x_l - x_{l-1}||`` over layer inputs; an earlier release used
the cosine); the tokens with the largest variation stay. The code's ratios apply to the tokens left; here, as
for every method, keep ratios are fractions of the original count, and a stage keeps at least one token (the
code's ``max(1, ...)``): LLaVA-1.5's 576 -> 288 -> 144 -> 1 after layers 3, 17 and 22 is (0.5, 0.25, 0), the
last stage keeping one token on any model. Kept tokens keep their positions (the code gathers ``position_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import DEFAULT_ORIGINAL, InLLMMethod, StageView, register_method

# The code's schedules: LLaVA-1.5 (32 layers; 576 -> 288 -> 144 -> 1) and Qwen2-VL (28 layers: 0.25, then 0.05 of
# the rest, then 1 token: 256 nominal tokens -> 64 -> 3 -> 1).
_PRESETS = {
    "llava": dict(pruning_layers=(3, 17, 22), keep_ratios=(0.5, 0.25, 0.0)),
    "qwen": dict(pruning_layers=(3, 16, 22), keep_ratios=(0.25, 0.0125, 0.0)),  # 256 -> 64 -> 3 -> 1
}


@dataclass(frozen=True)
class V2DropConfig(InLLMMethod):
    """V2Drop: after each of ``pruning_layers`` keep ``keep_ratios`` (of the original count) of the image tokens,
    those the layer changed most (L2 norm of its update)."""

    pruning_layers: tuple[int, ...] = _PRESETS["llava"]["pruning_layers"]
    keep_ratios: tuple[float, ...] = _PRESETS["llava"]["keep_ratios"]
    positions: str = DEFAULT_ORIGINAL
    reference_depth: int | None = None
    method = "v2drop"
    presets = _PRESETS
    min_keep = 1  # every stage keeps at least one token, as the code's max(1, ...): a ratio of 0 keeps one

    def __post_init__(self):
        self.check_schedule(allow_zero=True)

    def selection_macs(self, n_image: int, hidden_size: int, text_tokens: int) -> int:
        return n_image * hidden_size  # one difference norm per image token

    def rank(self, view: StageView):
        change = (view.h[:, view.image_at].float() - view.h_in[:, view.image_at].float()).norm(dim=-1)
        return change, {"variation": change}


register_method("v2drop", V2DropConfig)
