"""transprune: training-free visual-token pruning inside Hugging Face vision-language models.

    handle = transprune.apply(model, transprune.TransPruneConfig.preset("high"))
    model.generate(...); handle.last_stats; handle.remove()
"""

from .config import TransPruneConfig
from .runtime import PruneHandle, SampleStats, apply, pruned

__all__ = ["TransPruneConfig", "PruneHandle", "SampleStats", "apply", "pruned"]
__version__ = "0.1.0"
