"""``python -m transprune.integrations.lmms_eval``: print the folder to pass to lmms-eval's ``--include_path``."""

from . import TASKS_DIR

print(TASKS_DIR)
