"""Where `TransPruneConfig` and `Schedule` have always been importable from (they live in `methods.transprune`
and `schedule`)."""

from .methods.base import POSITION_RULES
from .methods.transprune import DIRECTIONS, PRESETS, REFERENCE_DEPTH, SCORES, TransPruneConfig
from .schedule import Schedule

__all__ = ["TransPruneConfig", "Schedule", "DIRECTIONS", "POSITION_RULES", "PRESETS", "REFERENCE_DEPTH", "SCORES"]
