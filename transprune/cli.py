"""Command line: ``python -m transprune.cli SUBCOMMAND ...`` (or the ``transprune`` script).

One small function per subcommand, registered on argparse subparsers in `build_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS, TransPruneConfig
from .flops import ARCHS, compress_runs, estimate, resolve_arch


def _arch(value: str):
    # Resolved during parsing so a bad --arch is a usage error (exit 2) naming the allowed values.
    try:
        return resolve_arch(value)
    except (ValueError, OSError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return n


def cmd_flops(args) -> int:
    report = estimate(TransPruneConfig.preset(args.preset), args.arch, text_tokens=args.text_tokens)
    if args.json:
        d = report.to_dict()
        print(json.dumps({"tflops": d.pop("tflops"), "tflops_full": d.pop("tflops_full"), **d}))
        return 0
    a, r = args.arch, report
    schedule = "no pruning" if not r.pruning_layers else (
        f"prune at {', '.join(map(str, r.pruning_layers))} keeping {', '.join(f'{k:g}' for k in r.keep_ratios)} "
        f"of N; TTV over layers {', '.join(map(str, r.accumulation_layers))}"
    )
    rows = [
        ("arch", f"{a.name} ({a.num_layers} layers, d={a.hidden_size}, m={a.intermediate_size}, N={a.image_tokens})"),
        ("preset", f"{args.preset}: {schedule}"),
        ("visual tokens/layer", compress_runs(r.visual_tokens_per_layer)),
        ("TFLOPs, paper convention", f"{r.tflops:.3f} ({100 * r.ratio:.1f}% of {r.tflops_unpruned:.3f} unpruned)"),
        ("TFLOPs, full prefill (text + scoring included)",
         f"{r.tflops_full:.3f} ({100 * r.tflops_full / r.tflops_full_unpruned:.1f}% of "
         f"{r.tflops_full_unpruned:.3f} unpruned; {r.text_tokens} text tokens, scoring {r.tflops_scoring:.4f})"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transprune", description="TransPrune visual-token pruning tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("flops", help="TFLOPs of a pruning preset (paper convention and full prefill)",
                       description="Prefill TFLOPs of a preset: the paper's convention (visual tokens only) and, "
                                   "labelled separately, the full prefill with text tokens and scoring overhead.")
    p.add_argument("--arch", type=_arch, required=True, metavar="|".join([*ARCHS, "PATH"]),
                   help=f"one of {', '.join(ARCHS)}, or a checkpoint folder / config.json (llava, llava_next)")
    p.add_argument("--preset", choices=PRESETS, required=True)
    p.add_argument("--text-tokens", type=_count, default=64, help="non-image prompt tokens for the full count (default 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_flops)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
