"""The text table of a bench report (``--json`` prints the report itself)."""

from __future__ import annotations

from ..flops import compress_runs


def _ms(d):
    return "-" if not d or d["median"] is None else f"{1e3 * d['median']:.1f} [{1e3 * d['min']:.1f}-{1e3 * d['max']:.1f}]"


def _x(v, spread=None):
    """A ratio, with the min-max of the per-round ratios when there are several rounds."""
    if v is None:
        return "-"
    if spread and spread.get("n", 0) > 1:
        return f"{v:.2f}x [{spread['min']:.2f}-{spread['max']:.2f}]"
    return f"{v:.2f}x"


def format_report(report: dict) -> str:
    head = [
        f"arch {report['arch']}  weights: {report['weights']}",
        f"device {report['environment']['device']}" + (f" ({report['environment']['gpu']})" if "gpu" in report["environment"] else
                                                      f" ({report['environment']['cpu_count']} cpus, {report['environment']['torch_threads']} torch threads)")
        + f"  dtype {report['dtype']}  attention {report['attn_implementation']}  batch {report['batch']}",
        f"per sample: {report['image_tokens'][0]} image tokens + {report['text_tokens'][0]} text tokens; "
        f"{report['new_tokens']} new tokens; {report['repeats']} timed repeats after {report['warmup']} warm-up; "
        f"inputs sha256 {report['inputs_sha256'][:12]}",
        f"timer: {report['timer']}; memory: {report['memory_measure']}",
        *([f"budget: every method scaled to {report['budget']:g} of the unpruned paper-convention TFLOPs"]
          if report.get("budget") is not None else []),
        "times: median [min-max] ms; ratios: method / none of the medians [min-max of the per-round ratios] "
        "(decode: tokens/s ratio, > 1 is faster); methods interleaved, the order rotating every round",
        "TFLOPs: paper convention (decoder, visual tokens); FLOPs: one whole prefill counted by torch's FlopCounterMode "
        "(vision tower, decoder, scoring); prefill x / FLOPs x: 1.0 = time falls as the work does",
    ]
    cols = ["method", "prefill ms", "x", "scoring ms (% prefill)", "TTFT ms", "x", "decode tok/s", "x",
            "peak MiB", "KV MiB", "x", "TFLOPs", "x", "FLOPs x", "prefill x / FLOPs x"]
    rows = []
    for r in report["methods"]:
        q, spread = r["ratios"], r.get("round_ratios") or {}
        scoring = "-" if not r["scoring_s"] or r["scoring_s"]["median"] is None else (
            f"{1e3 * r['scoring_s']['median']:.1f} ({100 * q['scoring_fraction_of_prefill']:.1f}%)")
        dec = r["decode_tokens_per_s"]
        rows.append([
            r["name"], _ms(r["prefill_s"]), _x(q.get("prefill"), spread.get("prefill_s")), scoring, _ms(r["ttft_s"]),
            _x(q.get("ttft"), spread.get("ttft_s")), "-" if not dec else f"{dec['median']:.1f}",
            _x(q.get("decode_tokens_per_s"), spread.get("decode_tokens_per_s")),
            f"{r['peak_memory_growth_bytes'] / 2**20:.1f}", f"{r['kv_cache_bytes'] / 2**20:.2f}", _x(q.get("kv_cache")),
            f"{r['tflops']:.4g}", _x(q.get("tflops")), _x(q.get("flops")),
            "-" if q.get("prefill_per_flops") is None else f"{q['prefill_per_flops']:.2f}",
        ])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = head + ["", "  ".join(c.ljust(w) for c, w in zip(cols, widths)),
                    "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    lines.append("")
    for r in report["methods"]:
        tokens = compress_runs(r["visual_tokens_per_layer"][0]) if r["visual_tokens_per_layer"] else "-"
        lines.append(f"{r['name']}: visual tokens/layer (sample 0) {tokens}; new tokens per run {sorted(set(r['new_tokens']))}")
    if report["random_weights"]:
        lines.append("NOTE: random weights were used (cost does not depend on weight values; outputs are meaningless).")
    return "\n".join(lines)
