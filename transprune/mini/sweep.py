"""Layer sweep of the mini testbed: how accuracy and relevant-token recall depend on WHERE image tokens are pruned.

    python -m transprune.mini.sweep --model DIR [--n 300] [--layers 1-11] [--keeps 0.5,0.125]
        [--rules ttv,iga,ttv+iga,fastv,random] [--batch-size 50] [--threads 2] [--json] [--plot PNG]

Each run prunes ONCE, after decoder layer L (1-indexed; the 12-layer mini decoder allows L = 1..11, because
IGA reads the following layer), keeping ``int(256 * keep)`` of the 256 image tokens, ranked by one rule.
The exact settings (layer numbers are absolute: ``reference_depth=None``):

- ``ttv``: ``TransPruneConfig(pruning_layers=(L,), keep_ratios=(keep,), accumulation_layers=(1, ..., L),
  score="ttv", reference_depth=None)``: TTV summed over every layer up to L; direction "1-cos" and
  positions "compact" (the config's defaults).
- ``iga``: the same with ``score="iga"`` (the post-image text rows' attention in layer L + 1).
- ``ttv+iga``: the same with ``score="transprune"``: 0.5 * TTV + 0.5 * IGA (``alpha=0.5``, the default).
- ``fastv``: ``FastVConfig(k=L, r=1 - keep, reference_depth=None)``: the last token's attention in layer L;
  positions "original" (FastV's default: kept tokens keep their position ids).
- ``random``: ``RandomConfig(pruning_layers=(L,), keep_ratios=(keep,), reference_depth=None)``: seed 0,
  positions "compact" (the default).

Every run sees the same held-out questions (``evaluate.questions(n)``: test split, question types in
rotation) and the same batches, through `evaluate.evaluate_configs`, so the figures are those of
`transprune eval --suite mini`: accuracy of the greedy first token (overall and per question type), the
recall of answer-relevant image tokens after the stage (per question, averaged over the questions that have
any) and the kept share (what a random pick recalls on average). The unpruned accuracy is measured once.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

RULES = ("ttv", "iga", "ttv+iga", "fastv", "random")
RULE_DESCRIPTIONS = {
    "ttv": "TTV accumulated over layers 1..L (TransPrune, score='ttv')",
    "iga": "IGA: post-image text rows' attention in layer L+1 (TransPrune, score='iga')",
    "ttv+iga": "0.5 TTV + 0.5 IGA (TransPrune, score='transprune')",
    "fastv": "FastV: last token's attention in layer L (original positions)",
    "random": "seeded random (RandomConfig, seed 0)",
}
# TransPrune's score field for the rules that are TransPrune configs.
_SCORE = {"ttv": "ttv", "iga": "iga", "ttv+iga": "transprune"}
DEFAULT_KEEPS = (0.5, 0.125)
DEFAULT_N = 300
PROG = "python -m transprune.mini.sweep"


def rule_config(rule: str, keep: float, layer: int):
    """The config that prunes once after ``layer`` keeping ``keep`` of the image tokens, ranked by ``rule``."""
    from .. import FastVConfig, RandomConfig, TransPruneConfig

    if rule in _SCORE:
        return TransPruneConfig(pruning_layers=(layer,), keep_ratios=(keep,),
                                accumulation_layers=tuple(range(1, layer + 1)), score=_SCORE[rule],
                                reference_depth=None, name=rule)
    if rule == "fastv":
        return FastVConfig(k=layer, r=1.0 - keep, reference_depth=None)
    if rule == "random":
        return RandomConfig(pruning_layers=(layer,), keep_ratios=(keep,), reference_depth=None)
    raise ValueError(f"--rules: unknown rule {rule!r}; choose from {', '.join(RULES)}")


def _run_name(rule: str, keep: float, layer: int) -> str:
    return f"{rule} keep={keep:g} L{layer}"


def run_sweep(model, processor, rules=RULES, keeps=DEFAULT_KEEPS, layers=None, n: int = DEFAULT_N,
              batch_size: int = 50, progress: bool = True, samples=None) -> dict:
    """Every (rule, keep, layer) run plus the unpruned model on the same questions and batches:
    ``{"n", "unpruned": {...}, "rows": [...]}``, rows in (rule, keep, layer) order."""
    from .evaluate import evaluate_configs

    depth = model.config.text_config.num_hidden_layers
    layers = tuple(layers) if layers is not None else tuple(range(1, depth))
    grid = [(rule, keep, layer) for rule in rules for keep in keeps for layer in layers]
    methods = {"none": ("no pruning", None)}
    for rule, keep, layer in grid:
        methods[_run_name(rule, keep, layer)] = (RULE_DESCRIPTIONS[rule], rule_config(rule, keep, layer))
    results = evaluate_configs(model, processor, methods, n=n, batch_size=batch_size, progress=progress,
                               samples=samples, desc="sweep mini")
    unpruned, runs = results[0], results[1:]
    rows = []
    for (rule, keep, layer), result in zip(grid, runs):
        (stage,) = result.stages  # one pruning stage per run
        rows.append({"rule": rule, "keep": keep, "layer": layer, "after_layer": stage["after_layer"],
                     "accuracy": result.accuracy, "accuracy_by_type": result.accuracy_by_type,
                     "recall": stage["recall"], "kept_share": stage["kept_share"], "tokens": stage["tokens"],
                     "tflops_ratio": result.tflops_ratio, "seconds": result.seconds,
                     "config": result.config.to_dict()})
    return {"n": unpruned.n,
            "unpruned": {"accuracy": unpruned.accuracy, "accuracy_by_type": unpruned.accuracy_by_type,
                         "seconds": unpruned.seconds},
            "rows": rows}


def _keep_label(keep: float) -> str:
    return f"{100 * keep:g}%"


def format_table(sweep: dict, model_name: str) -> str:
    """Markdown: one row per layer L, one column per rule x keep, cells "accuracy % / relevant recall"."""
    rows = sweep["rows"]
    columns = list(dict.fromkeys((r["rule"], r["keep"]) for r in rows))
    layers = sorted({r["layer"] for r in rows})
    cell = {(r["rule"], r["keep"], r["layer"]): f"{100 * r['accuracy']:.1f} / {r['recall']:.2f}" for r in rows}
    shares = {r["keep"]: r["kept_share"] for r in rows}
    seconds = sum(r["seconds"] for r in rows) / len(rows)
    lines = [f"Layer sweep of {model_name}: prune once after layer L; n={sweep['n']} held-out questions; "
             f"unpruned accuracy {100 * sweep['unpruned']['accuracy']:.1f}%. Cells: accuracy % / relevant-token "
             f"recall (kept share, a random pick's mean recall: "
             + ", ".join(f"{_keep_label(k)} -> {s:.3f}" for k, s in shares.items())
             + f"). {seconds:.1f} s per run.", "",
             "| L | " + " | ".join(f"{rule} {_keep_label(keep)}" for rule, keep in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for layer in layers:
        lines.append(f"| {layer} | " + " | ".join(cell.get((rule, keep, layer), "-") for rule, keep in columns) + " |")
    return "\n".join(lines)


def plot(sweep: dict, path: str | Path, model_name: str) -> None:
    """2 x len(keeps) panels: accuracy vs L (top) and relevant-token recall vs L (bottom), one column per keep."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = sweep["rows"]
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    keeps = list(dict.fromkeys(r["keep"] for r in rows))
    fig = Figure(figsize=(5.5 * len(keeps), 8.5), layout="constrained")
    axes = fig.subplots(2, len(keeps), squeeze=False, sharex=True)
    for col, keep in enumerate(keeps):
        acc_ax, recall_ax = axes[0, col], axes[1, col]
        for rule in rules:
            mine = sorted((r for r in rows if r["rule"] == rule and r["keep"] == keep), key=lambda r: r["layer"])
            layers = [r["layer"] for r in mine]
            acc_ax.plot(layers, [100 * r["accuracy"] for r in mine], marker="o", label=rule)
            recall_ax.plot(layers, [r["recall"] for r in mine], marker="o", label=rule)
        acc_ax.axhline(100 * sweep["unpruned"]["accuracy"], linestyle="--", color="black", label="unpruned")
        # The kept share is the same for every rule at a layer; plotting it per layer shows it is.
        layers = sorted({r["layer"] for r in rows if r["keep"] == keep})
        shares = [sum(r["kept_share"] for r in rows if r["keep"] == keep and r["layer"] == layer)
                  / sum(1 for r in rows if r["keep"] == keep and r["layer"] == layer) for layer in layers]
        recall_ax.plot(layers, shares, linestyle="--", color="grey", label="kept share (random's mean recall)")
        acc_ax.set(title=f"keep {_keep_label(keep)} of the image tokens", ylabel="accuracy (%)", ylim=(0, 100))
        recall_ax.set(title=f"keep {_keep_label(keep)}: answer-relevant tokens kept", xlabel="pruned after layer L",
                      ylabel="relevant-token recall", ylim=(0, 1.02))
        for ax in (acc_ax, recall_ax):
            ax.set_xticks(layers)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{model_name}: one pruning stage after layer L, n={sweep['n']} held-out questions")
    fig.savefig(path, dpi=110)


# --- command line -----------------------------------------------------------------------------------------


def _parse_rules(text: str) -> tuple[str, ...]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in RULES]
    if unknown or not items:
        raise ValueError(f"--rules: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                         f"choose from {', '.join(RULES)}")
    return tuple(dict.fromkeys(items))


def _parse_keeps(text: str) -> tuple[float, ...]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    keeps = []
    for item in items:
        try:
            keep = float(item)
        except ValueError:
            keep = float("nan")
        if not 0.0 < keep <= 1.0:  # also false for nan
            raise ValueError(f"--keeps: {item!r} is not allowed; each keep is a fraction of the image tokens in (0, 1]")
        keeps.append(keep)
    if not keeps:
        raise ValueError("--keeps: empty list; give fractions in (0, 1], e.g. 0.5,0.125")
    return tuple(dict.fromkeys(keeps))


def _parse_layers(text: str | None, depth: int) -> tuple[int, ...]:
    """'1-11', '2,5,8' or a mix; every layer must leave a following layer (IGA), so 1..depth-1."""
    allowed = f"1..{depth - 1} (1-indexed; the {depth}-layer decoder, IGA needs the following layer)"
    if text is None:
        return tuple(range(1, depth))
    layers = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        first, dash, last = item.partition("-")
        try:
            span = range(int(first), int(last) + 1) if dash else [int(item)]
        except ValueError:
            raise ValueError(f"--layers: {item!r} is not a layer number or range; allowed: {allowed}") from None
        layers += span
    bad = [layer for layer in layers if not 1 <= layer <= depth - 1]
    if bad or not layers:
        raise ValueError(f"--layers: {bad[0] if bad else 'empty list'} is not allowed; allowed: {allowed}")
    return tuple(dict.fromkeys(layers))


def _model_folder(model: str | None) -> Path:
    from .model import checkpoint_path

    return Path(model) if model is not None else checkpoint_path()


def _decoder_depth(folder: Path) -> int:
    """The decoder's layer count from the checkpoint's config.json (no weights loaded)."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no mini checkpoint at {folder} (train one with `transprune train-mini --out DIR`)")
    return AutoConfig.from_pretrained(folder, local_files_only=True).text_config.num_hidden_layers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Prune once after each decoder layer L of the mini testbed "
                                "and measure accuracy and relevant-token recall per ranking rule and keep ratio.")
    p.add_argument("--model", default=None, metavar="DIR", help="a mini checkpoint folder (default: the shipped one)")
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"held-out questions (default {DEFAULT_N})")
    p.add_argument("--layers", default=None, help="layers to prune after, e.g. 1-11 or 2,5,8 (default: 1..depth-1)")
    p.add_argument("--keeps", default=",".join(map(str, DEFAULT_KEEPS)),
                   help="kept fractions of the image tokens, in (0, 1] (default 0.5,0.125)")
    p.add_argument("--rules", default=",".join(RULES), help=f"ranking rules, from {', '.join(RULES)} (default all)")
    p.add_argument("--batch-size", type=int, default=50, help="questions per forward pass (default 50)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the Markdown table")
    p.add_argument("--plot", default=None, metavar="PNG", help="also write a figure of accuracy and recall vs L")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # Every argument is checked before the model is loaded; a bad one is one line on stderr and exit 2.
    try:
        rules = _parse_rules(args.rules)
        keeps = _parse_keeps(args.keeps)
        for name in ("n", "batch_size", "threads"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be an integer >= 1, got {getattr(args, name)}")
        if args.plot is not None:
            try:
                import matplotlib  # noqa: F401  (only checked here; imported for real when plotting)
            except ImportError:
                raise ValueError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
        folder = _model_folder(args.model)
        layers = _parse_layers(args.layers, _decoder_depth(folder))
    except (ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    import torch

    from .model import load_mini
    from .train import machine

    torch.set_num_threads(args.threads)
    model, processor = load_mini(folder)
    sweep = run_sweep(model, processor, rules, keeps, layers, n=args.n, batch_size=args.batch_size,
                      progress=True)
    if args.plot is not None:
        plot(sweep, args.plot, folder.name)
    if args.json:
        print(json.dumps({"sweep": "mini layer sweep", "model": str(folder), "n": sweep["n"], "machine": machine(),
                          "threads": args.threads, "torch": torch.__version__, "command": f"{PROG} {shlex.join(argv)}",
                          "rules": {rule: RULE_DESCRIPTIONS[rule] for rule in rules}, "keeps": list(keeps),
                          "layers": list(layers), "unpruned": sweep["unpruned"], "rows": sweep["rows"]}))
    else:
        print(format_table(sweep, folder.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
