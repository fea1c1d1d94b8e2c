"""The figures that bound what pruning can save in a serving engine (docs/serving.md): per method, the prefill
FLOPs (paper convention and full prefill) and the KV cache a prefill leaves, for a batch of B prompts.

    python -m transprune.bench.serving [--arch llava-1.5-7b qwen2.5-vl-7b] [--batch 1 32] [--text-tokens 64]

Both scale linearly with the batch (every prompt carries its own image); the KV cache is bf16.
"""

from __future__ import annotations

import argparse

from ..argtypes import count, positive
from ..flops import ARCHS, estimate
from ..methods import build

METHODS = ["none", "transprune-high", "transprune-low", "fastv", "pdrop", "visionzip", "visionzip192+transprune"]


def table(archs: list[str], batches: list[int], text_tokens: int = 64) -> str:
    lines = ["| arch | method | TFLOPs paper (x) | TFLOPs full prefill (x) | "
             + " | ".join(f"KV MiB, batch {b}" for b in batches) + " | KV (x) |",
             "|---|---|---|---|" + "---|" * len(batches) + "---|"]
    for arch in archs:
        for name in METHODS:
            config = build("transprune-off") if name == "none" else build(name)
            try:
                r = estimate(config, arch, text_tokens=text_tokens)
            except ValueError:  # a method the family cannot run (VisionZip without vision hooks)
                lines.append(f"| {arch} | {name} | not supported on this family | | " + " | " * len(batches) + " |")
                continue
            kv = [b * r.kv_cache_bytes / 2 ** 20 for b in batches]
            lines.append(f"| {arch} | {name} | {r.tflops:.3f} ({r.ratio:.2f}) | "
                         f"{r.tflops_full:.3f} ({r.tflops_full / r.tflops_full_unpruned:.2f}) | "
                         + " | ".join(f"{v:,.0f}" for v in kv)
                         + f" | {r.kv_cache_bytes / r.kv_cache_bytes_unpruned:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m transprune.bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["llava-1.5-7b", "qwen2.5-vl-7b"], choices=list(ARCHS))
    p.add_argument("--batch", nargs="+", type=positive, default=[1, 32])
    p.add_argument("--text-tokens", type=count, default=64)
    args = p.parse_args(argv)
    print(table(args.arch, args.batch, args.text_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
