"""The one change this plugin makes to vLLM itself, for its CPU backend.

vLLM recomputes the mRoPE positions of pruned multimodal items (the path its EVS video pruning uses) only where
the model runner's ``is_multimodal_pruning_enabled`` is set; `GPUModelRunner.load_model` sets it, the CPU runner's
own `load_model` (vllm 0.32, ``v1/worker/cpu_model_runner.py``) never does, so on a CPU the positions columns our
models append would reach the LLM as features. This sets the flag after the CPU runner loads one of *our* models,
exactly as the GPU runner does; every other model loads as before. Upstream, a hook that lets the model ask for
the path would make this unnecessary.
"""

from __future__ import annotations

import functools


def enable_pruning_path_on_cpu() -> None:
    """Wrap `CPUModelRunner.load_model` once per process (a no-op off the CPU platform)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    load_model = CPUModelRunner.load_model
    if getattr(load_model, "_transprune", False):
        return

    @functools.wraps(load_model)
    def load_then_enable(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        if getattr(self.get_model(), "transprune_served", False):
            self.is_multimodal_pruning_enabled = True

    load_then_enable._transprune = True
    CPUModelRunner.load_model = load_then_enable
