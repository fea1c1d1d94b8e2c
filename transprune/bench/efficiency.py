"""Speed against work, one markdown table from `transprune bench --json` reports (the table in docs/benchmarks.md):

    python -m transprune.bench.efficiency AFTER.json ... [--before BEFORE.json ...]

Per arch, batch and method: the FLOPs ratio, the prefill time ratio with the per-round min-max, the time ratio
of the matching ``--before`` report (same arch and batch, e.g. the tree before a change), ``prefill x / FLOPs x``
(1.0: time falls as the work does), scoring as a share of the prefill, and the median prefill.
"""

from __future__ import annotations

import argparse
import json
import sys


def rows(reports: list[dict], before: list[dict] = ()) -> list[list[str]]:
    earlier = {(r["arch"], r["batch"]): {m["name"]: m for m in r["methods"]} for r in before}
    out = []
    for report in reports:
        previous = earlier.get((report["arch"], report["batch"]), {})
        for m in report["methods"]:
            q, spread = m["ratios"], m.get("round_ratios", {}).get("prefill_s") or {}
            then = previous.get(m["name"])
            share = q.get("scoring_fraction_of_prefill")
            out.append([report["arch"], str(report["batch"]), m["name"], _num(q.get("flops"), 3),
                        f"{_num(q.get('prefill'), 3)} [{_num(spread.get('min'), 2)}-{_num(spread.get('max'), 2)}]",
                        "-" if then is None else _num(then["ratios"].get("prefill"), 3),
                        _num(q.get("prefill_per_flops"), 2), "-" if share is None else f"{100 * share:.1f}%",
                        f"{1e3 * m['prefill_s']['median']:.1f}"])
    return out


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


HEADER = ["arch", "batch", "method", "FLOPs x", "prefill x [per-round min-max]", "prefill x before",
          "prefill x / FLOPs x", "scoring % of prefill", "prefill ms"]


def table(reports: list[dict], before: list[dict] = ()) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows(reports, before)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transprune.bench.efficiency", description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", metavar="REPORT.json", help="`transprune bench --json` outputs")
    parser.add_argument("--before", nargs="*", default=[], metavar="REPORT.json",
                        help="reports of the same archs and batches from before a change")
    args = parser.parse_args(argv)
    try:
        loaded = [[json.loads(open(path).read()) for path in paths] for paths in (args.reports, args.before)]
    except (OSError, ValueError) as exc:
        print(f"efficiency: error: {exc}", file=sys.stderr)
        return 2
    print(table(*loaded))
    return 0


if __name__ == "__main__":
    sys.exit(main())
