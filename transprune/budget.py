"""Pruning by budget: scale a method's keep ratios (its layers unchanged) until its paper-convention TFLOPs,
relative to the unpruned model, meet a target for the model's real visual-token count. Methods are compared
this way at equal cost.

Each method owns its knob (`scaled(factor)`): TransPrune and the baselines multiply every keep ratio, FastV its
kept share ``1 - r``, PDrop its per-stage ratio (its ratios stay geometric), VisionZip its dominant and
contextual counts; a composition scales each of its methods by the same factor. The cost is a step function of
the factor (token counts are integers), non-decreasing, so a bisection finds the two steps around the target
and the closer one wins (the cheaper one on a tie).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from .flops import ArchSpec, arch_from_hf_config, estimate, resolve_arch
from .methods import Plan, as_list

_STEPS = 60  # bisection steps: the factor to ~1e-18 of its range, far below one token's step


@dataclass(frozen=True)
class Budgeted:
    """What `budget` chose: the scaled config, the factor, and the cost it achieves."""

    config: object
    factor: float
    target: float  # paper-convention TFLOPs / unpruned, asked for
    achieved: float  # the same ratio, as the integer token counts give it
    image_tokens: int  # the visual-token count it was computed for
    visual_tokens_per_layer: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"target": self.target, "achieved": self.achieved, "factor": self.factor,
                "image_tokens": self.image_tokens, "visual_tokens_per_layer": list(self.visual_tokens_per_layer),
                "method": [c.to_dict() for c in as_list(self.config)]}


def scaled(config, factor: float):
    """``config`` (one method or a composition) with every method's keep knob times ``factor``."""
    items = []
    for c in as_list(config):
        c = c.scaled(factor)
        if any(f.name == "name" for f in dataclasses.fields(c)):  # a preset's name no longer describes it
            c = dataclasses.replace(c, name="custom")
        items.append(c)
    return items if isinstance(config, (list, tuple)) else items[0]


def check_target(tflops) -> float:
    if hasattr(tflops, "dim") and hasattr(tflops, "item") and tflops.dim() == 0:  # a 0-d tensor
        tflops = tflops.item()
    if isinstance(tflops, bool) or not isinstance(tflops, numbers.Real) or not 0 < tflops <= 1:  # numpy scalars too
        raise ValueError(f"budget must be a number in (0, 1] (paper-convention TFLOPs relative to the unpruned "
                         f"model, e.g. 0.41), got {tflops!r}")
    return float(tflops)


def arch_of(model_or_arch, image_tokens: int | None = None) -> ArchSpec:
    """The `ArchSpec` the cost is computed on: an arch name, spec or checkpoint path as the FLOPs tool takes it, or a
    loaded model (its config); ``image_tokens`` replaces its nominal visual-token count."""
    if hasattr(model_or_arch, "config") and hasattr(model_or_arch, "forward"):
        arch = arch_from_hf_config(model_or_arch.config, type(model_or_arch).__name__)
    else:
        arch = resolve_arch(model_or_arch)
    if image_tokens is not None:
        if isinstance(image_tokens, bool) or not isinstance(image_tokens, int) or image_tokens < 1:
            raise ValueError(f"image_tokens must be an int >= 1, got {image_tokens!r}")
        arch = dataclasses.replace(arch, image_tokens=image_tokens)
    return arch


def budget(config, model_or_arch, tflops: float, image_tokens: int | None = None):
    """``config`` (one method or a composition) scaled to cost ``tflops`` of the unpruned model's paper-convention
    TFLOPs on ``model_or_arch``: what `apply` takes. `plan_budget` says what was chosen and what it achieves;
    ``handle.last_stats[i].tflops_ratio`` reports what each sample achieved."""
    return plan_budget(config, model_or_arch, tflops, image_tokens).config


def plan_budget(config, model_or_arch, tflops: float, image_tokens: int | None = None,
                text_tokens: int = 64) -> Budgeted:
    """``config`` scaled so that its paper-convention TFLOPs relative to unpruned equal ``tflops`` as closely as the
    integer token counts allow, on ``model_or_arch`` with ``image_tokens`` visual tokens (default: the model's or
    arch's nominal count; pass the real count of your images). Raises ValueError, naming the range, when the
    target is below what the method can reach while keeping at least one token at every stage."""
    target = check_target(tflops)
    arch = arch_of(model_or_arch, image_tokens)
    # `apply` also refuses a stage keeping no token of the model's nominal image: stay valid for both counts
    archs = [arch] if image_tokens is None else [arch, arch_of(model_or_arch)]
    plan = Plan.of(config)
    pre, llm = plan.pre, plan.llm
    if llm is not None and not llm.enabled and pre is None:
        raise ValueError(f"{llm.method} with no pruning layers has no keep ratios to scale")

    seen: dict[float, tuple] = {}

    def cost(factor):
        """(ratio, report) at ``factor``; ratio None when some stage would keep no token (not a valid setting)."""
        if factor not in seen:
            seen[factor] = _cost(factor)
        return seen[factor]

    def _cost(factor):
        try:
            candidate = scaled(config, factor)
            reports = [estimate(candidate, a, text_tokens=text_tokens) for a in archs]
        except ValueError:
            return None, None
        if any(min(r.visual_tokens_per_layer) < 1 for r in reports):
            return None, None
        return reports[0].ratio, (candidate, reports[0])

    low, high = 0.0, 1.0
    while (cost(high)[0] is None or cost(high)[0] < 1.0) and high < 2.0 ** 30:  # up to the factor that keeps all
        high *= 2
    if cost(high)[0] is None:
        raise ValueError(f"{'+'.join(c.method for c in as_list(config))} keeps no token at some stage on {arch.name} "
                         "at any scale")
    for _ in range(_STEPS):  # the smallest valid factor
        mid = (low + high) / 2
        low, high = (low, mid) if cost(mid)[0] is not None else (mid, high)
    floor = high
    floor_ratio, floor_pick = cost(floor)
    if target < floor_ratio:
        raise ValueError(f"budget {target:g} is below what {'+'.join(c.method for c in as_list(config))} can reach on "
                         f"{arch.name} with N={arch.image_tokens} while keeping a token at every stage "
                         f"({floor_ratio:.4f}); its layers stay fixed, so give a budget in [{floor_ratio:.4f}, 1]")
    low, high = floor, high
    while cost(high)[0] < 1.0 and high < 2.0 ** 30:
        high *= 2
    if target <= floor_ratio:
        pick, factor = floor_pick, floor
    else:
        for _ in range(_STEPS):  # cost(low) < target <= cost(high)
            mid = (low + high) / 2
            low, high = (mid, high) if cost(mid)[0] < target else (low, mid)
        (below, below_pick), (above, above_pick) = cost(low), cost(high)
        if target - below <= above - target:
            pick, factor = below_pick, low
        else:
            pick, factor = above_pick, high
    candidate, report = pick
    return Budgeted(candidate, factor, target, report.ratio, arch.image_tokens, report.visual_tokens_per_layer)
