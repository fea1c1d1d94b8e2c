"""Issue 23's speed goal as a benchmark (not a unit test: it runs `transprune bench` for minutes and only with
``pytest --benchmark tests/test_speed_goal.py``). Per reduced arch and batch it records every method's FLOPs and
time ratios to ``$TRANSPRUNE_BENCHMARK_OUT`` (default: pytest's tmp folder; one `bench --json` report per
case, which ``python -m transprune.bench.efficiency DIR/*.json`` tabulates) and asserts the goal: never slower
than unpruned, time ratio <= 1.1 x the method's own FLOPs ratio, scoring under 5% of the pruned prefill.

A failure names what is short of the goal on the machine it ran on; the ratios are medians over interleaved
rounds, so on a shared 2-core machine a margin under ~0.1 is noise (docs/benchmarks.md)."""

import json
import os
from pathlib import Path

import pytest
import torch

from transprune.bench.archs import REDUCED
from transprune.bench.measure import run_bench
from transprune.methods import build

METHODS = ("transprune-high", "fastv", "visionzip", "uniform", "visionzip192+transprune")
SLACK = 1.1  # time ratio / FLOPs ratio
SCORING = 0.05  # of the pruned prefill


def _cases():
    for arch in REDUCED:
        for batch in (1, 8):
            yield pytest.param(arch, batch, id=f"{arch}-b{batch}", marks=pytest.mark.benchmark)


@pytest.mark.parametrize("arch,batch", list(_cases()))
def test_every_method_is_as_fast_as_its_flops(arch, batch, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # as `transprune bench` runs (the suite's conftest sets 1)
    try:
        report = run_bench(arch, [("none", None)] + [(name, build(name)) for name in METHODS], batch=batch,
                           random_weights=True, repeats=int(os.environ.get("TRANSPRUNE_BENCHMARK_REPEATS", 7)),
                           warmup=2, new_tokens=8)
    finally:
        torch.set_num_threads(threads)
    out = Path(os.environ.get("TRANSPRUNE_BENCHMARK_OUT", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{arch}-b{batch}.json").write_text(json.dumps(report, indent=1))
    short = []
    for method in report["methods"]:
        if method["name"] == "none":
            continue
        q = method["ratios"]
        if q["prefill"] > 1.0:
            short.append(f"{method['name']}: slower than unpruned ({q['prefill']:.2f}x)")
        if q["prefill_per_flops"] > SLACK:
            short.append(f"{method['name']}: time {q['prefill']:.2f}x for FLOPs {q['flops']:.2f}x "
                         f"({q['prefill_per_flops']:.2f} > {SLACK})")
        if (q["scoring_fraction_of_prefill"] or 0.0) > SCORING:
            short.append(f"{method['name']}: scoring {100 * q['scoring_fraction_of_prefill']:.1f}% of the prefill")
    assert not short, f"{arch} batch {batch} ({report['environment']['cpu']}): " + "; ".join(short)
