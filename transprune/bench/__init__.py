"""``transprune bench``: prefill latency, time to first token, decode speed, peak memory, KV-cache size,
scoring time and paper-convention TFLOPs of several pruning methods, measured in ONE run on the same
model, the same inputs and the same attention backend, with ratios to the unpruned model (``none``).

    transprune bench --arch llava-1.5-7b --random-weights --methods none,transprune-high,transprune-low \\
        --batch 8 --dtype bf16 [--json]
    transprune bench --arch llava-1.5-reduced --methods none,transprune-high --batch 2   # CPU, seconds
    transprune bench --arch DIR --random-weights ...   # DIR (or DIR/config.json): the config.json of any supported family

``archs``: the random-weight models; ``inputs``: what every method sees; ``measure``: what is measured and
how (see its docstring); ``report``: the text table. This module: the method names and the subcommand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..adapters import supported_model_types
from ..argtypes import budget_fraction, count, image_size, positive
from ..methods import COMPOSITIONS, METHODS, build, spelling
from .archs import CONFIGS, arch_config, arch_spec, build_random_model, fill_random
from .inputs import BenchInputs, checkpoint_inputs, inputs_sha256, synthetic_inputs
from .measure import MethodResult, add_ratios, kv_cache_bytes, measure_method, measure_methods, run_bench, summarize
from .report import format_report

__all__ = ["BenchInputs", "MethodResult", "add_ratios", "arch_config", "arch_spec", "build_random_model",
           "checkpoint_inputs", "cmd_bench", "fill_random", "format_report", "inputs_sha256", "kv_cache_bytes",
           "measure_method", "measure_methods", "method_config", "method_names", "parse_methods", "register", "run_bench",
           "summarize", "synthetic_inputs"]

def _named() -> dict:
    """Bench names -> (method list for methods.build, preset); "none" is the model with nothing attached. Read
    from the registry at each call, so methods registered later are known too."""
    named = {"none": None}
    for name, cls in METHODS.items():
        presets = [p for p in cls.presets if p != "off"]
        named.update({f"{name}-{p}": (name, p) for p in presets} if presets else {name: (name, None)})
    return {**named, **{name: (None, name) for name in COMPOSITIONS}}


def method_names() -> list[str]:
    return list(_named())


def method_config(name: str):
    """The config (or composition list) a bench method spec stands for (the grammar of `methods.parse_spec`,
    as ``--method`` of run/flops: ``transprune-high``, ``fastv``, ``visionzip+fastv``...); None for ``none``."""
    if name == "none":
        return None
    return build(name)


def parse_methods(text: str) -> list[tuple[str, object]]:
    """``"none,transprune-high"`` -> [(name, config), ...]; raises ValueError naming the allowed values."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--methods is empty; give none and/or {spelling()}")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods names a method twice: {names}")
    parsed = []
    for name in names:
        try:
            parsed.append((name, method_config(name)))
        except ValueError as exc:
            raise ValueError(f"--methods: {exc}; or none (the unpruned model)") from None
    return parsed


def _methods_arg(value: str):
    try:
        return parse_methods(value)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _arch_arg(value: str) -> str:
    path = Path(value)
    if value in CONFIGS or path.is_dir() or (path.name == "config.json" and path.is_file()):
        return value
    raise argparse.ArgumentTypeError(f"unknown arch {value!r}: use one of {', '.join(CONFIGS)} or a local "
                                     f"checkpoint folder (or its config.json)")


def _check_backend(device: str | None, attn: str) -> None:
    """Raise ValueError for a device or attention backend this torch cannot use (before any model is built)."""
    import importlib.util

    try:
        kind = torch.device(device).type if device is not None else None
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no CUDA device (torch.cuda.is_available() is False)")
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("--attn flash_attention_2 needs the flash-attn package, which is not installed; "
                         "use sdpa or eager")


def cmd_bench(args) -> int:
    try:
        _check_backend(args.device, args.attn)
        report = run_bench(args.arch, args.methods, batch=args.batch, dtype=args.dtype, device=args.device,
                           attn_implementation=args.attn, random_weights=args.random_weights,
                           repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
                           text_tokens=args.text_tokens, image_size=args.image_size, seed=args.seed,
                           progress=True, budget=args.budget)
    except (ValueError, OSError) as exc:
        print(f"transprune bench: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def register(subparsers) -> None:
    """Add the ``bench`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench", help="measure latency, memory, KV cache and TFLOPs of pruning methods against the unpruned model",
        description="Measure prefill latency, time to first token, decode tokens/s, peak memory, KV-cache bytes, "
                    "scoring time and paper TFLOPs of each method in one run, on the same inputs and attention "
                    "backend, with ratios to 'none' (no pruning).")
    p.add_argument("--arch", type=_arch_arg, required=True, metavar="|".join([*CONFIGS, "PATH"]),
                   help=f"{', '.join(CONFIGS)} (random weights built in code) or a local checkpoint folder "
                        "(or its config.json)")
    p.add_argument("--methods", type=_methods_arg, default=parse_methods("none,transprune-high"),
                   metavar="M1,M2,...", help=f"comma-separated entries, each none or a method as run/flops take it: {spelling()}; "
                        "default none,transprune-high")
    p.add_argument("--batch", type=positive, default=1)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,  # loading.DTYPES
                   help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa",
                   help="attention backend, the same for every method (default sdpa)")
    p.add_argument("--random-weights", action="store_true",
                   help="build the named arch with random weights (needed for the full-size archs), or a "
                        f"folder's config.json ({', '.join(supported_model_types())}; its weights, if any, are not read)")
    p.add_argument("--repeats", type=positive, default=5, help="timed repeats (default 5)")
    p.add_argument("--warmup", type=count, default=2, help="untimed warm-up runs (default 2)")
    p.add_argument("--new-tokens", type=positive, default=64, help="greedy tokens to decode (default 64)")
    p.add_argument("--text-tokens", type=positive, default=64,
                   help="non-image tokens per sample (default 64; a checkpoint's template may need more)")
    p.add_argument("--image-size", type=image_size, default=None, metavar="HxW",
                   help="synthetic image size (default: the vision tower's; 2x that for LLaVA-NeXT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=budget_fraction, default=None, metavar="FRACTION",
                   help="scale every method to this share of the unpruned paper-convention TFLOPs (e.g. 0.41) for the "
                        "inputs' visual-token count, so they are compared at equal cost (transprune.budget)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_with_default_dtype)


def _with_default_dtype(args) -> int:
    if args.dtype is None:
        cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        args.dtype = "bf16" if cuda else "fp32"
    return cmd_bench(args)
