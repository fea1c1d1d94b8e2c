"""The models `transprune bench` builds with random weights: the named archs (each family's, declared on its
adapter: configs written in code, no download) and any supported config.json. No default init: every matrix is
filled with seeded N(0, 1/fan_in) noise (norms 1, biases 0), so attention is not degenerate; their cost does not
depend on the weight values."""

from __future__ import annotations

import math

import torch

from ..flops import ArchSpec, arch_from_hf_config
from ..loading import model_class


def _tables():
    from ..adapters import ArchTable

    return ArchTable(lambda family, build, name: build), ArchTable(lambda family, build, name: build, "reduced")


# name -> config builder of each family's `archs` and `reduced_archs` (live views of `adapters.named_archs`), and
# the reduced ones; REDUCED iterates as names
CONFIGS, REDUCED = _tables()


def arch_config(name: str):
    """The Hugging Face config of a named bench arch, built in code by its family (`CONFIGS`)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown arch {name!r}; choose one of {', '.join(CONFIGS)} or a checkpoint folder")
    return CONFIGS[name]()


def arch_spec(name: str) -> ArchSpec:
    """The ArchSpec (FLOPs dimensions, nominal image tokens) of a named bench arch."""
    return arch_from_hf_config(arch_config(name), name)


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Seeded weights: norms 1, biases 0, other vectors N(0, 0.02), matrices N(0, 1/fan_in) (unit-scale
    activations, so attention logits are O(1): neither uniform nor one-hot)."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1 and "norm" in name:
            param.fill_(1.0)
        else:
            gen = generators.get(param.device)
            if gen is None:
                gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            std = 0.02 if param.dim() == 1 else 1.0 / math.sqrt(param[0].numel())
            param.normal_(0.0, std, generator=gen)


def build_random_model(config, dtype: torch.dtype, device, attn_implementation: str = "sdpa", seed: int = 0):
    """A random-weight model of a supported Hugging Face config (e.g. ``arch_config(name)``), created directly
    on ``device`` in ``dtype`` (no meta device, no default init, no download), in eval mode."""
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device):
        model = model_class(config)._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    fill_random(model, seed)
    return model.eval()
