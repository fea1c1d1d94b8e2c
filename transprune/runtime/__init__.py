"""Attach pruning to one model instance (`apply`, `pruned`), run the pruned decoder loop, detach again.

`handle.py` holds the handle and its two instance-level forwards, `prefill.py` the pruned prefill,
`select.py` the one selection routine every method's scorer plugs into, `decode.py` the decode steps over
per-stage caches, `stats.py` what a call reports.
"""

from __future__ import annotations

import contextlib

from ..adapters import adapter_for
from ..methods import Plan
from ..schedule import Schedule
from .handle import APPLIED, PruneHandle
from .stats import SampleStats

__all__ = ["apply", "pruned", "handle_of", "remove", "PruneHandle", "SampleStats"]


def handle_of(model) -> PruneHandle | None:
    """The active handle of pruning attached to ``model`` (for a user who lost it), or None."""
    ref = APPLIED.get(model)
    handle = ref() if ref is not None else None
    return handle if handle is not None and handle.active else None


def remove(model) -> bool:
    """Detach whatever pruning is attached to ``model``; returns whether there was any."""
    handle = handle_of(model)
    if handle is not None:
        handle.remove()
    return handle is not None


def apply(model, config, *, record_scores: bool = False, profile: bool = False) -> PruneHandle:
    """Attach pruning to this one model instance; returns the handle that undoes it.

    `config` is one method config (TransPruneConfig, FastVConfig, PDropConfig, VisionZipConfig,
    RandomConfig, UniformConfig) or a list with at most one pre-LLM and one in-LLM config, e.g.
    `[VisionZipConfig(...), TransPruneConfig(...)]`. `record_scores=True` keeps every stage's scores
    in `handle.last_stats`; `profile=True` (or setting `handle.profile` later) times the scoring of
    every pruned prefill into `handle.last_profile` (CUDA events, read once at the end of the prefill;
    off by default, so normal runs add no host syncs). Everything is validated before the model is
    touched.
    """
    plan = Plan.of(config)
    adapter = adapter_for(model)
    if handle_of(model) is not None:
        raise ValueError("transprune is already applied to this model; call handle.remove() (or "
                         "transprune.remove(model); transprune.handle_of(model) returns the handle) before applying again")
    adapter.check_decoder()
    schedule = plan.llm.layers_for_depth(adapter.depth) if plan.llm is not None else Schedule.none(adapter.depth)
    plan = plan.resolved_for(adapter)  # the family's rule for a defaulted one; raises for one it lacks
    if plan.pre is not None:
        plan.pre.check_family(adapter)
        plan.pre.check(adapter)
    if plan.llm is not None:
        _check_every_stage_keeps_a_token(plan.llm, plan.pre, schedule, adapter)
    handle = PruneHandle(model, plan, adapter, schedule, record_scores, profile)
    handle._install()
    return handle


def _check_every_stage_keeps_a_token(llm, pre, schedule, adapter) -> None:
    """Raise when a keep ratio would keep no image token of this model's (nominal) image: almost surely a
    mistake (a ratio meant as a percentage, or one ratio too many zeros). Dynamic-resolution families count
    their nominal image (`arch_spec`); smaller images there may still keep 0 at run time."""
    arch = adapter.arch_spec(adapter.model.config, "model")
    n = arch.image_tokens if pre is None else pre.llm_tokens(arch)
    for stage, (layer, ratio) in enumerate(zip(schedule.pruning_layers, schedule.keep_ratios)):
        if schedule.keep_count(n, stage) == 0:
            raise ValueError(f"{type(llm).__name__} keeps {ratio:g} of the image tokens after layer {layer}: 0 of this "
                             f"model's {n} image tokens{' (its nominal image)' if arch.nominal_image_size else ''}"
                             f"{' after ' + type(pre).__name__ if pre is not None else ''}; keep ratios are fractions "
                             f"of the {'tokens that reach the LLM' if pre is not None else 'original count'} "
                             f"(>= {1 / n:.4g} keeps one token)")


@contextlib.contextmanager
def pruned(model, config, *, record_scores: bool = False, profile: bool = False):
    """`with pruned(model, config) as handle:` apply for the block, then restore the model."""
    handle = apply(model, config, record_scores=record_scores, profile=profile)
    try:
        yield handle
    finally:
        handle.remove()
