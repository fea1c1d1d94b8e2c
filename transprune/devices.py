"""Models spread over devices (accelerate's `device_map`): where a module runs, and moving inputs there.

accelerate's hooks move a module's inputs to its execution device when the module is called, and load offloaded
weights for the call. The runtime calls whole layers where it can, so their hooks do that work; where it calls a
layer's parts itself (TTV capture, scoring q/k) it moves the inputs to the layer's execution device first and
brings the results back to the device the prefill's bookkeeping lives on. On one device every move is a no-op.
"""

from __future__ import annotations

import torch


def execution_device(module: torch.nn.Module, default: torch.device) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else its first parameter that is not
    offloaded (on the meta device), else ``default``."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return device if isinstance(device, torch.device) else torch.device(device)
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return default


def to_device(value, device: torch.device):
    """``value`` (a tensor, or tuples / lists / dicts of them; anything else as it is) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
