"""transprune as an lmms-eval model, through lmms-eval's plugin entry point (no fork, no patch).

`pip install` registers the entry point ``transprune = transprune.integrations.lmms_eval:manifest`` in the
``lmms_eval.models`` group, so ``python -m lmms_eval --model transprune --model_args pretrained=DIR,...``
finds the model. `TASKS_DIR` holds our own task (``transprune_mini``), for ``--include_path``;
``python -m transprune.integrations.lmms_eval`` prints it.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"


def manifest():
    """The lmms-eval `ModelManifest` of the ``transprune`` model (lmms-eval is imported only here)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="transprune", simple_class_path="transprune.integrations.lmms_eval.model.TransPrune")
