"""Command line: ``python -m transprune.cli SUBCOMMAND ...`` (or the ``transprune`` script).

Each subcommand is a ``cmd_<name>(args)`` and a ``register_<name>(subparsers)`` (bench's: `bench.register`),
listed in `SUBCOMMANDS` (`build_parser` registers them in that order). The work lives below: checkpoints and prompts in `loading`, the train-mini options in `mini.options`, `transprune bench` in
`bench` (which registers its own subcommand); no module of the package imports this one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .adapters import supported_model_types
from .argtypes import budget_fraction, count, image_size, positive
from .bench import register as register_bench
from .budget import budget, plan_budget
from .flops import ARCHS, compress_runs, estimate, plan_for_arch, resolve_arch, with_image_size
from .loading import DTYPES, build_prompt, load_checkpoint
from .methods import COMPOSITIONS, all_presets, build, spelling
from .mini.options import add_train_args, train_config


def _arch(value: str):
    # Resolved during parsing so a bad --arch is a usage error (exit 2) naming the allowed values.
    try:
        return resolve_arch(value)
    except (ValueError, OSError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_method_args(p, default_preset=None):
    p.add_argument("--method", default=None, metavar="METHOD",
                   help=f"the pruning method (the grammar of bench's and eval's --methods entries): {spelling()}")
    p.add_argument("--preset", choices=all_presets(), default=default_preset,
                   help="a named setting of the method that has it (TransPrune's high/low/off, default high; V2Drop's "
                        "llava/qwen; DART's and CDPruner's token counts), or a named composition")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="params",
                   help="a method parameter, e.g. --set k=3 --set r=0.75, --set layers=8,16,24 (repeatable)")
    add_budget_arg(p)


def add_budget_arg(p):
    p.add_argument("--budget", type=budget_fraction, default=None, metavar="FRACTION",
                   help="scale the method's keep ratios (layers unchanged) to this share of the unpruned paper-convention "
                        "TFLOPs, e.g. 0.41, for the model's visual-token count (transprune.budget)")


def _add_mini_args(p):
    p.add_argument("--model", default=None, metavar="DIR", help="a mini checkpoint folder (default: the shipped one)")
    p.add_argument("--threads", type=positive, default=2, help="torch CPU threads (default 2)")


def _method(args):
    params = {}
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes FIELD=VALUE, got {item!r}")
        params[key.strip()] = value.strip()
    return build(args.method, args.preset, params)


def _mapped_for_mini(config, args):
    """The mini model has 12 layers and the methods' defaults are the papers' 32-layer settings: map them
    (reference_depth=32, as `eval --suite mini` does) unless ``--set reference_depth=...`` says otherwise."""
    from .mini.evaluate import mapped_to_mini

    if any(item.partition("=")[0].strip() == "reference_depth" for item in args.params):
        return config
    return mapped_to_mini(config)


def _describe(config) -> str:
    items = config if isinstance(config, list) else [config]
    return " + ".join(f"{c.method}({', '.join(f'{k}={v}' for k, v in c.to_dict().items() if k not in ('method', 'name'))})"
                      for c in items)


def cmd_flops(args) -> int:
    try:
        config = _method(args)
    except (ValueError, TypeError) as exc:
        print(f"transprune flops: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.image_size is not None:
            args.arch = with_image_size(args.arch, args.image_size)
        planned = None
        if args.budget is not None:
            planned = plan_budget(config, args.arch, args.budget, text_tokens=args.text_tokens)
            config = planned.config
        plan = plan_for_arch(config, args.arch)  # as described: positions as the family runs them
        if plan.pre is not None:  # what `apply` refuses on a model of this arch
            plan.pre.check_arch(args.arch)
        report = estimate(plan, args.arch, text_tokens=args.text_tokens)
        config = plan.config
    except (ValueError, TypeError, OSError) as exc:  # a schedule that does not fit the arch, an unreadable config
        print(f"transprune flops: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        d = report.to_dict()
        extra = {"budget": planned.to_dict()} if planned is not None else {}
        print(json.dumps({"tflops": d.pop("tflops"), "tflops_full": d.pop("tflops_full"), **d, **extra}))
        return 0
    a, r = args.arch, report
    schedule = "no in-LLM pruning" if not r.pruning_layers else (
        f"prune after layers {', '.join(map(str, r.pruning_layers))} keeping {', '.join(f'{k:g}' for k in r.keep_ratios)} "
        f"of the tokens entering the LLM" + (f"; TTV over layers {', '.join(map(str, r.accumulation_layers))}"
                                            if r.accumulation_layers else "")
    )
    rows = [
        ("arch", f"{a.name} ({a.num_layers} layers, d={a.hidden_size}, m={a.intermediate_size}, N={a.image_tokens}"
                 + (f" for a {a.nominal_image_size[0]}x{a.nominal_image_size[1]} image" if a.nominal_image_size else "")
                 + ")" + (f"; m: {a.ffn}" if a.ffn else "")),
        ("method", _describe(config)),
        *([("budget", f"{planned.target:g} of the unpruned TFLOPs asked, {planned.achieved:.4f} achieved "
                      f"(keep knob x{planned.factor:.4g})")] if planned is not None else []),
        ("schedule", schedule),
        ("visual tokens/layer", compress_runs(r.visual_tokens_per_layer)),
        ("TFLOPs, paper convention", f"{r.tflops:.3f} ({100 * r.ratio:.1f}% of {r.tflops_unpruned:.3f} unpruned)"),
        ("ratio, token-linear cost", f"{100 * r.ratio_token_linear:.1f}% (visual tokens summed over the layers; "
                                     "the paper's Qwen2.5-VL convention)"),
        ("TFLOPs, full prefill (text + scoring included)",
         f"{r.tflops_full:.3f} ({100 * r.tflops_full / r.tflops_full_unpruned:.1f}% of "
         f"{r.tflops_full_unpruned:.3f} unpruned; {r.text_tokens} text tokens, scoring {r.tflops_scoring:.4f})"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_run(args) -> int:
    import torch
    from PIL import Image

    from .runtime import apply

    from .adapters import adapter_for

    try:
        config = _method(args)
        model, processor = load_checkpoint(args.model, args.dtype)
        image = Image.open(args.image).convert("RGB")
        adapter = adapter_for(model)
        inputs = processor(images=[image] if adapter.images_per_prompt else image,
                           text=build_prompt(processor, args.prompt), return_tensors="pt")
        inputs = {k: (v.to(model.dtype) if k == "pixel_values" else v) for k, v in inputs.items()}
        if args.budget is not None:  # for this image's real visual-token count
            n_visual = int(adapter.image_token_mask(inputs["input_ids"], None).sum())
            config = budget(config, model, args.budget, image_tokens=n_visual)
        handle = apply(model, config)  # validates the config against this model before anything runs
    except (ValueError, TypeError, OSError) as exc:
        print(f"transprune run: error: {exc}", file=sys.stderr)
        return 2
    with handle, torch.no_grad():
        try:
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        except (ValueError, TypeError, RuntimeError, IndexError) as exc:
            print(f"transprune run: error: {type(model).__name__} failed on the inputs {type(processor).__name__} made "
                  f"from {args.model} ({exc}); do the folder's config.json (model_type {model.config.model_type!r}) and "
                  "its processor files belong to the same model?", file=sys.stderr)
            return 1
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    stats = handle.last_stats[0]
    if args.json:
        method = [c.to_dict() for c in config] if isinstance(config, list) else config.to_dict()
        print(json.dumps({"answer": answer, "preset": args.preset or _default_preset(args.method),
                          "method": method, **stats.to_dict(), "tflops_ratio": stats.tflops_ratio,
                          "pruned_nothing": stats.pruned_nothing,
                          "budget": args.budget}))
        return 0
    rows = [
        ("answer", answer),
        ("image tokens", str(stats.n_image_tokens)),
        ("visual tokens/layer", compress_runs(stats.visual_tokens_per_layer)),
        ("method", _describe(config)),
        ("pruned after layers", ", ".join(map(str, stats.kept_after_layer)) or "none"),
        ("TFLOPs, paper convention", f"{stats.tflops:.4g} ({100 * stats.tflops_ratio:.1f}% of "
                                     f"{stats.tflops_unpruned:.4g} unpruned"
                                     + (f"; budget {100 * args.budget:g}%" if args.budget is not None else "") + ")"),
    ]
    if stats.pruned_nothing:
        rows.append(("note", f"pruned nothing: every layer kept all {stats.n_image_tokens} image tokens; this setting "
                             "keeps everything on this model"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_train_mini(args) -> int:
    from .mini.train import check_config, train

    cfg = train_config(args)
    try:
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out}: an existing file; the checkpoint is a folder")
        check_config(cfg)
    except ValueError as exc:
        print(f"transprune train-mini: error: {exc}", file=sys.stderr)
        return 2
    record = train(args.out, cfg, progress=not args.quiet)
    last = next((e["val"] for e in reversed(record["history"]) if "val" in e), {})
    print(f"saved {args.out} after {record['minutes']} min; validation accuracy {json.dumps(last)}")
    return 0


def _check_fits(model, names) -> None:
    """Raise for the first suite method that cannot be applied to ``model`` (before any question runs)."""
    from .mini.evaluate import suite_entry
    from .runtime import apply

    for name in names:
        config = suite_entry(name)[1]
        if config is not None:
            try:
                apply(model, config).remove()
            except (ValueError, TypeError) as exc:
                raise ValueError(f"method {name!r} does not fit this model: {exc}") from None


def _load_mini(path):
    from .mini.model import load_mini

    return load_mini(path)  # raises ValueError for a checkpoint that is not a mini model


def cmd_eval(args) -> int:
    import torch

    from .mini.evaluate import evaluate, format_table, resolve

    try:
        names = resolve(args.methods)
        if args.n < 1 or args.batch_size < 1:
            raise ValueError(f"--n and --batch-size must be >= 1, got {args.n} and {args.batch_size}")
        model, processor = _load_mini(args.model)
        _check_fits(model, names)
    except (ValueError, TypeError, OSError) as exc:
        print(f"transprune eval: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401  (checked before the run; imported for real when plotting)
        except ImportError:
            print("transprune eval: error: --plot needs matplotlib, which is not installed: pip install matplotlib",
                  file=sys.stderr)
            return 2
    try:
        results = evaluate(model, processor, names, n=args.n, batch_size=args.batch_size, progress=not args.json,
                           budget=args.budget)
    except ValueError as exc:  # a budget below what some method can reach
        print(f"transprune eval: error: {exc}", file=sys.stderr)
        return 2
    if args.plot is not None:
        from .mini.evaluate import plot

        at = f", every method at {args.budget:g} of the unpruned TFLOPs" if args.budget is not None else ""
        plot(results, args.plot, f"mini testbed, {args.n} held-out questions{at}")
    if args.json:
        from .mini.train import machine

        print(json.dumps({"suite": "mini", "n": args.n, "budget": args.budget, "model": str(args.model or "shipped"),
                          "machine": machine(), "threads": args.threads, "torch": torch.__version__,
                          "results": [r.to_dict() for r in results]}))
    else:
        print(format_table(results))
    return 0


def _default_preset(methods: str | None) -> str | None:
    """The preset a method spec implies (its first method with presets: its own, else the default), as
    `methods.build` applies it; None for a named composition or methods without presets."""
    from .methods import default_preset, parse_spec

    if methods in COMPOSITIONS:
        return None
    items = parse_spec(methods or "transprune")
    return next((own or default_preset(n) for n, own in items if default_preset(n) is not None), None)


def _label(args) -> str:
    """A short name for the method chosen on the command line."""
    preset = args.preset or _default_preset(args.method)
    extra = " " + " ".join(args.params) if args.params else ""
    return f"{args.method or 'transprune'}{' ' + preset if preset else ''}{extra}"


def _check_writable(path: str) -> None:
    """Raise OSError naming ``path`` when a file cannot be written there (before any model runs)."""
    import os

    target = Path(path)
    if target.is_dir():
        raise OSError(f"--out {path}: a folder; give a file name such as {target / 'demo.png'}")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OSError(f"--out {path}: cannot write there ({parent} is a file, not a folder)")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise OSError(f"--out {path}: cannot write there ({parent} is not writable)")


def cmd_demo(args) -> int:
    import torch
    from PIL import Image

    from .mini import data
    from .mini.demo import run_demo

    if (args.image is None) != (args.prompt is None):
        print("transprune demo: error: give both --image and --prompt, or neither", file=sys.stderr)
        return 2
    try:
        config = _mapped_for_mini(_method(args), args)
        model, processor = _load_mini(args.model)
        if args.out is not None:
            _check_writable(args.out)
        if args.image is not None:
            image, question, expected = Image.open(args.image), args.prompt, None
        else:
            s = data.sample("test", args.index)
            image, question, expected = s.image, s.question, s.answer
    except (ValueError, TypeError, OSError) as exc:
        print(f"transprune demo: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    result = run_demo(model, processor, image, question, args.out, config=config, expected=expected)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    rows = [("question", result.question)]
    if expected is not None:
        rows.append(("expected", expected))
    rows += [("answer, unpruned", result.answer_unpruned),
             (f"answer, pruned ({_label(args)})", result.answer_pruned),
             ("image tokens", str(result.n_image_tokens)),
             ("kept per stage", ", ".join(f"after layer {layer}: {k}" for layer, k in result.kept_per_stage)),
             ("TFLOPs, paper convention", f"{result.tflops:.4g} of {result.tflops_unpruned:.4g} unpruned "
                                          f"({100 * (1 - result.tflops / result.tflops_unpruned):.1f}% saved)"),
             ("picture", result.png or "none (--out FILE.png draws which tokens each stage kept, and why)")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def register_flops(sub) -> None:
    """Add the ``flops`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("flops", help="TFLOPs of a pruning preset (paper convention and full prefill)",
                       description="Prefill TFLOPs of a preset: the paper's convention (visual tokens only) and, "
                                   "labelled separately, the full prefill with text tokens and scoring overhead.")
    p.add_argument("--arch", type=_arch, required=True, metavar="|".join([*ARCHS, "PATH"]),
                   help=f"one of {', '.join(ARCHS)}, or a checkpoint folder / config.json "
                        f"({', '.join(supported_model_types())})")
    _add_method_args(p)
    p.add_argument("--text-tokens", type=count, default=64, help="non-image prompt tokens for the full count (default 64)")
    p.add_argument("--image-size", type=image_size, default=None, metavar="HxW",
                   help="dynamic-resolution archs (Qwen): the image whose visual tokens N counts (default 448x448 on "
                        "Qwen2/2.5-VL, 512x512 on Qwen3-VL: 256 tokens; the paper states no size, and its ratios "
                        "do not depend on N)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_flops)


def register_run(sub) -> None:
    """Add the ``run`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("run", help="answer one image + prompt with a local checkpoint, with pruning",
                       description=f"Load a local checkpoint folder ({', '.join(supported_model_types())}) and its processor, generate "
                                   "greedily with pruning, and print the answer, visual tokens per layer and TFLOPs.")
    p.add_argument("--model", required=True, metavar="DIR", help="local checkpoint folder (model + processor)")
    p.add_argument("--image", required=True, metavar="IMG", help="image file")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the question (wrapped in the chat template)")
    _add_method_args(p)
    p.add_argument("--max-new-tokens", type=positive, default=64)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_run)


def register_eval(sub) -> None:
    """Add the ``eval`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("eval", help="accuracy, relevant-token recall and TFLOPs of every method on a test suite",
                       description="Run held-out questions of the mini testbed through each method on the same "
                                   "model and inputs; report accuracy (overall and per question type), the recall "
                                   "of answer-relevant image tokens after each pruning stage, and TFLOPs relative "
                                   "to unpruned.")
    p.add_argument("--suite", choices=["mini"], required=True, help="the test suite (mini: the shipped mini LLaVA)")
    p.add_argument("--methods", default=None, metavar="A,B,...", help="comma-separated suite methods (default: all)")
    p.add_argument("--n", type=count, default=500, help="questions (default 500)")
    p.add_argument("--batch-size", type=count, default=50)
    add_budget_arg(p)
    _add_mini_args(p)
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw each method's accuracy and TFLOPs share")
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    p.set_defaults(func=cmd_eval)


def register_demo(sub) -> None:
    """Add the ``demo`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("demo", help="answer a generated (or your) question with and without pruning; draw a PNG",
                       description="With no arguments: generate a scene and a question, answer with and without "
                                   "pruning on the shipped mini model, and write a PNG with the image, the kept "
                                   "tokens per stage and the TTV / IGA / combined score heatmaps.")
    p.add_argument("--image", default=None, metavar="IMG", help="your image (resized to 96x96)")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="your question, in the testbed's words")
    p.add_argument("--index", type=count, default=3, help="which generated test question (default 3)")
    _add_method_args(p)
    _add_mini_args(p)
    p.add_argument("--out", default=None, metavar="PNG",
                   help="draw which image tokens each stage kept, and their scores, into this PNG (default: no picture)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_demo)


def register_train_mini(sub) -> None:
    """Add the ``train-mini`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("train-mini", help="train the mini LLaVA from scratch (deterministic; ~75 min on 2 CPU cores)",
                       description="Train the mini testbed model on generated questions and save a folder that "
                                   "from_pretrained / AutoProcessor load. The defaults are the best recipe measured so "
                                   "far (docs/mini-benchmark.md).")
    p.add_argument("--out", required=True, metavar="DIR")
    add_train_args(p)
    p.set_defaults(func=cmd_train_mini)


# Every subcommand, in the order `transprune --help` lists them: each a ``register(subparsers)`` function beside its
# command function (bench's lives with the bench, `bench.register`). A new subcommand is one more entry here.
SUBCOMMANDS = (register_flops, register_run, register_eval, register_demo, register_train_mini, register_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transprune", description="TransPrune visual-token pruning tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
