"""transprune: training-free visual-token pruning inside Hugging Face vision-language models.

    handle = transprune.apply(model, transprune.TransPruneConfig.preset("high"))
    model.generate(...); handle.last_stats; handle.remove()

Peers share the API: FastVConfig, PDropConfig, VisionZipConfig, RandomConfig, UniformConfig, and
compositions such as `[VisionZipConfig(...), TransPruneConfig(...)]` or `transprune.preset(name)`.
"""

from .config import TransPruneConfig
from .methods import FastVConfig, PDropConfig, RandomConfig, UniformConfig, VisionZipConfig, preset
from .runtime import PruneHandle, SampleStats, apply, handle_of, pruned, remove

__all__ = [
    "TransPruneConfig", "FastVConfig", "PDropConfig", "VisionZipConfig", "RandomConfig", "UniformConfig",
    "PruneHandle", "SampleStats", "apply", "pruned", "handle_of", "remove", "preset",
]
__version__ = "0.1.0"
