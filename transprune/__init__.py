"""transprune: training-free visual-token pruning inside Hugging Face vision-language models.

    handle = transprune.apply(model, transprune.TransPruneConfig.preset("high"))
    model.generate(...); handle.last_stats; handle.remove()

Peers share the API: FastVConfig, PDropConfig, DARTConfig, V2DropConfig, VisionZipConfig, DivPruneConfig,
CDPrunerConfig, RandomConfig, UniformConfig, and
compositions such as `[VisionZipConfig(...), TransPruneConfig(...)]` or `transprune.preset(name)`.
At equal cost: `transprune.budget(config, model, tflops=0.41)` scales any of them to 41% of the unpruned TFLOPs.
"""

from .budget import budget, plan_budget
from .config import TransPruneConfig
from .loading import load_processor
from .methods import (CDPrunerConfig, DARTConfig, DivPruneConfig, FastVConfig, PDropConfig, RandomConfig,
                      UniformConfig, V2DropConfig, VisionZipConfig, preset)
from .runtime import PruneHandle, SampleStats, apply, handle_of, pruned, remove

__all__ = [
    "TransPruneConfig", "FastVConfig", "PDropConfig", "VisionZipConfig", "RandomConfig", "UniformConfig",
    "DARTConfig", "V2DropConfig", "DivPruneConfig", "CDPrunerConfig",
    "PruneHandle", "SampleStats", "apply", "pruned", "handle_of", "remove", "preset", "budget", "plan_budget",
    "load_processor",
]
__version__ = "0.1.0"
