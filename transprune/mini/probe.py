"""Decoder-only probe: stage 2 of `train-mini` on *perfect* image tokens, to tell decoder limits from vision ones.

    python -m transprune.mini.probe [--steps 1000] [--val-scenes 50] [train-mini's recipe options] [--json]

The vision tower is replaced by learned embeddings of the true per-patch labels of each scene
(`data.patch_labels`: colour, shape, size, digit, centre, row, column), summed per patch. Everything else is
stage 2 of `train-mini` under the same `TrainConfig` (losses, schedule, curriculum, attention supervision).
Every ``eval_every`` steps it logs greedy answer accuracy per question type on the first ``val_scenes`` scenes
of the validation split (5 questions each). Nothing is saved: it measures how fast the decoder learns when
perception is solved, not a model to ship.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import torch

from . import data
from .model import build_mini
from .options import add_train_args, train_config
from .train import (Batcher, TrainConfig, _adamw, check_config, forward_losses, init_decoder, loss_options, machine,
                    stage2_step)

PERFECT_LABELS = ("colour", "shape", "size", "digit", "centre", "row", "column")


class PerfectImageTokens(torch.nn.Module):
    """(B, 256, width) image tokens: the sum of one learned embedding per true per-patch label."""

    def __init__(self, width: int):
        super().__init__()
        self.tables = torch.nn.ModuleDict({k: torch.nn.Embedding(data.PATCH_LABELS[k], width) for k in PERFECT_LABELS})

    def forward(self, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.tables[k](labels[k]) for k in PERFECT_LABELS)


@torch.no_grad()
def _accuracy(model, tokens, batches: list[dict], cfg: TrainConfig) -> dict[str, float]:
    model.eval()
    hits: dict[str, list[bool]] = {}
    for batch in batches:
        predicted = []
        forward_losses(model, {}, batch, **{**loss_options(cfg), "questions_per_scene": 5},
                       image_tokens=tokens(batch["labels"]), predictions=predicted)
        rows = torch.arange(len(batch["qtypes"]))
        right = (predicted[0] == batch["suffix"][rows, batch["answer_at"]]).tolist()
        for qtype, hit in zip(batch["qtypes"], right):
            hits.setdefault(qtype, []).append(hit)
    model.train()
    acc = {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}
    acc["overall"] = round(sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values()), 3)
    return acc


def probe(cfg: TrainConfig, val_scenes: int = 50, progress: bool = True, log=print) -> dict:
    """Run the probe under ``cfg`` (its stage-2 fields; ``device`` must be cpu); return the log."""
    from tqdm import tqdm

    check_config(cfg)
    if cfg.device != "cpu":
        raise ValueError(f"device={cfg.device!r}: the probe runs on the cpu only")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        model = build_mini(seed=cfg.seed, attn_implementation="sdpa").train()
        if cfg.decoder_init_std is not None:
            init_decoder(model, cfg.decoder_init_std, cfg.seed)
        tokens = PerfectImageTokens(model.config.text_config.hidden_size)
        params = (list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
                  + list(tokens.parameters()))
        optim = _adamw(params, cfg.lr, cfg.weight_decay)
        batcher = Batcher()
        val = [batcher.batch(first, min(10, val_scenes - first), split="val") for first in range(0, val_scenes, 10)]
        history, started = [], time.perf_counter()
        for step in tqdm(range(cfg.steps), desc="probe", disable=not progress, mininterval=2):
            losses, _ = stage2_step(model, {}, batcher, optim, params, cfg, step, image_tokens=tokens)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                entry = {"step": step + 1, "minutes": round((time.perf_counter() - started) / 60, 2),
                         **{k: round(v.item(), 4) for k, v in losses.items()},
                         "val": _accuracy(model, tokens, val, cfg)}
                history.append(entry)
                log(json.dumps(entry), flush=True)
    finally:
        torch.set_num_threads(threads)
    return {"config": asdict(cfg), "val_scenes": val_scenes, "machine": machine(), "history": history}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transprune.mini.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--val-scenes", type=int, default=50, help="validation scenes (5 questions each)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print the whole log as JSON at the end")
    add_train_args(parser)  # the recipe options are train-mini's (same names, same checks)
    args = parser.parse_args(argv)
    if args.val_scenes < 1 or args.eval_every < 1:
        parser.error("--val-scenes and --eval-every must be >= 1")
    cfg = train_config(args)
    cfg.eval_every = args.eval_every
    try:
        record = probe(cfg, args.val_scenes, progress=not args.quiet,
                       log=(lambda *a, **k: None) if args.json else print)
    except ValueError as exc:
        print(f"probe: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
