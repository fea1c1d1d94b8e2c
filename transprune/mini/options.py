"""The recipe options of `transprune train-mini` (also taken by `python -m transprune.mini.probe`) and the
`TrainConfig` they describe. The mini modules are imported only when an option needs them."""

from __future__ import annotations

import argparse

from ..argtypes import count


def _patch_labels() -> list[str]:
    from .data import PATCH_LABELS

    return list(PATCH_LABELS)


def _aux_labels(text: str) -> tuple:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in names if x not in _patch_labels()]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(_patch_labels())}")
    return names


def _train_device(name: str) -> str:
    from .train import _device

    try:
        _device(name, check_available=False)  # the form here; whether it exists: check_config before training
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The TrainConfig options (every default None: TrainConfig's) and --quiet."""
    p.add_argument("--steps", type=count, default=None, help="optimiser steps (default: TrainConfig's)")
    p.add_argument("--cycles", type=count, default=None,
                   help="stage-2 cycles over the same scenes, each a fresh optimiser and cosine (default: TrainConfig's)")
    p.add_argument("--seed", type=int, default=None, help="(default 0)")
    p.add_argument("--threads", type=count, default=None, help="torch CPU threads (default: TrainConfig's)")
    p.add_argument("--scenes-per-step", type=count, default=None, help="scenes per batch (default: TrainConfig's)")
    p.add_argument("--questions-per-type", type=count, default=None,
                   help="questions of each of the 5 types asked per scene (default: TrainConfig's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: TrainConfig's)")
    p.add_argument("--decoder-init-std", type=float, default=None,
                   help="redraw the decoder's matrices from N(0, STD) before training (default: TrainConfig's)")
    p.add_argument("--attn-heads", type=int, default=None,
                   help="supervise the attention of this many heads to the relevant patches (0: off)")
    p.add_argument("--attn-layer", type=count, default=None, help="1-indexed layer of --attn-heads")
    p.add_argument("--attn-targets", choices=("relevant", "focus"), default=None,
                   help="relevant: every relevant patch, at --attn-layer; focus: the named objects at --find-layer, "
                        "the objects the answer is read from at --attn-layer, plus <s> for counts and 'is there'")
    p.add_argument("--find-layer", type=int, default=None,
                   help="with --attn-targets focus: 1-indexed layer whose heads find the named objects (0: none)")
    p.add_argument("--gather-layer", type=int, default=None,
                   help="also supervise the --attn-heads heads of this layer to look at the question's object words (0: off)")
    p.add_argument("--deep-layer", type=int, default=None, help="also read the answer out after this layer (0: off)")
    p.add_argument("--aux-weight", type=float, default=None, help="weight of the per-patch auxiliary loss (0: off)")
    p.add_argument("--aux-labels", type=_aux_labels, default=None, metavar="A,B,...",
                   help="per-patch labels of the auxiliary loss, from: " + ", ".join(_patch_labels()))
    p.add_argument("--vision-steps", type=int, default=None,
                   help="stage 1: steps training only the vision tower + projector on the per-patch labels (0: off)")
    p.add_argument("--vision-scenes", type=count, default=None, help="scenes per stage-1 step")
    p.add_argument("--vision-lr", type=float, default=None, help="stage-1 peak learning rate")
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the vision tower + projector fixed after stage 1")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start from this checkpoint folder (e.g. a stage-1-only run: --steps 0) instead of a fresh model")
    p.add_argument("--device", type=_train_device, default=None,
                   help="cpu (default) or a CUDA device, e.g. cuda:0 (not bitwise reproducible there)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def train_config(args):
    """The TrainConfig of parsed `train-mini` options (TrainConfig's defaults where an option is not given)."""
    from .card import OPTIONS
    from .train import TrainConfig

    fields = ("steps", "seed", "threads") + OPTIONS
    return TrainConfig(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})
