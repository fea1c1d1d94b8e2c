"""`transprune eval --suite mini`: accuracy, relevant-token recall and TFLOPs of every method on held-out
questions of the mini testbed.

Every method sees the same questions (``data.sample("test", i)`` for i < n), the same batches and the same
model. The answer is the greedy first token after the prompt (all answers are one word), which is what
``generate`` would emit first. Relevant-token recall at a stage is, per question, the share of the
answer-relevant image tokens (patches that overlap the answer's objects) still kept after that stage,
averaged over the questions that have any (a count of zero has none).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..config import TransPruneConfig
from ..methods import (CDPrunerConfig, DARTConfig, DivPruneConfig, FastVConfig, PDropConfig, RandomConfig,
                       UniformConfig, V2DropConfig, VisionZipConfig, build, spelling)
from . import data
from .model import IMAGE_TOKENS, PATCH_SIZE, prompt


def _visionzip(total_of_576: int, dominant_of_576: int) -> VisionZipConfig:
    """VisionZip's LLaVA-1.5 setting scaled to this model's image tokens (same share of tokens kept)."""
    total = round(total_of_576 * IMAGE_TOKENS / 576)
    dominant = round(dominant_of_576 * IMAGE_TOKENS / 576)
    return VisionZipConfig(dominant=dominant, contextual=total - dominant)


# The papers' LLaVA-1.5 settings are written for 32 layers: reference_depth=32 maps them to this 12-layer model.
_MAPPED = dict(reference_depth=32)


def mapped_to_mini(config):
    """``config`` (one or a composition) with every in-LLM method's layer numbers mapped from 32 layers, as the
    suite maps the papers' settings (what `demo` applies unless the user sets reference_depth)."""
    from ..methods import as_list

    items = [replace(c, **_MAPPED) if c.stage == "in" else c for c in as_list(config)]
    return items[0] if len(items) == 1 else items
_HIGH = TransPruneConfig.preset("high", **_MAPPED)
# name -> (what it is, factory). In-LLM schedules are the papers' LLaVA-1.5 (32-layer) settings, mapped to
# this model's depth by the configs themselves (`layers_for_depth`); nothing here is tuned on the testbed.
SUITE = {
    "none": ("no pruning", lambda: None),
    "transprune-high": ("TransPrune, paper's high-budget preset", lambda: _HIGH),
    "transprune-low": ("TransPrune, paper's low-budget preset", lambda: TransPruneConfig.preset("low", **_MAPPED)),
    "ttv-only": ("TransPrune high, TTV score only", lambda: replace(_HIGH, score="ttv", name="ttv-only")),
    "iga-only": ("TransPrune high, IGA score only", lambda: replace(_HIGH, score="iga", name="iga-only")),
    "direction-1-abs-cos": ("TransPrune high, direction term 1-|cos| (the other variant)",
                            lambda: replace(_HIGH, direction="1-abs-cos", name="direction-1-abs-cos")),
    "positions-original": ("TransPrune high, kept tokens keep original positions",
                           lambda: replace(_HIGH, positions="original", name="positions-original")),
    "fastv": ("FastV K=2, R=50% (32-layer setting)", lambda: FastVConfig(**_MAPPED)),
    "pdrop": ("PDrop, layers 8/16/24 of 32, ratio 0.5", lambda: PDropConfig(**_MAPPED)),
    "visionzip": ("VisionZip, 192-of-576 share (85 of 256 tokens)", lambda: _visionzip(192, 162)),
    "visionzip+transprune": ("VisionZip 192-of-576 share, then TransPrune ratios 0.5/0.25/0.125",
                             lambda: [_visionzip(192, 162),
                                      TransPruneConfig(keep_ratios=(0.5, 0.25, 0.125), name="visionzip+transprune",
                                                       **_MAPPED)]),
    "dart": ("DART after layer 2 of 32, the code's 128 point (132-of-576 share: 58 of 256)",
             lambda: DARTConfig.preset("128", **_MAPPED)),
    "v2drop": ("V2Drop's LLaVA-1.5 schedule: after layers 3/17/22 of 32, 1/2, 1/4, then 1 token",
               lambda: V2DropConfig(keep_ratios=(0.5, 0.25, 1.5 / IMAGE_TOKENS), **_MAPPED)),
    "v2drop-high-schedule": ("V2Drop's score on TransPrune-High's schedule (against ttv-only: the rival of TTV)",
                             lambda: V2DropConfig(pruning_layers=_HIGH.pruning_layers, keep_ratios=_HIGH.keep_ratios,
                                                  **_MAPPED)),
    "divprune": ("DivPrune before the LLM, 0.098 of the tokens (25 of 256)", lambda: DivPruneConfig()),
    "cdpruner": ("CDPruner before the LLM, the 128-of-576 share (57 of 256)", lambda: CDPrunerConfig.preset("128")),
    "cdpruner+transprune": ("CDPruner 192-of-576 share, then TransPrune ratios 0.5/0.25/0.125",
                            lambda: [CDPrunerConfig.preset("192"),
                                     TransPruneConfig(keep_ratios=(0.5, 0.25, 0.125), name="cdpruner+transprune",
                                                      **_MAPPED)]),
    "random": ("random tokens, TransPrune-high schedule", lambda: RandomConfig(**_MAPPED)),
    "uniform": ("spatially uniform tokens, TransPrune-high schedule", lambda: UniformConfig(**_MAPPED)),
}


def resolve(names: str | list[str] | None) -> list[str]:
    """Entries from a comma-separated string (None: the whole suite): suite names, or any method in the
    grammar of run/flops/bench (`methods.parse_spec`, e.g. ``fastv``, ``visionzip+fastv``), whose papers'
    32-layer settings are then mapped to this model as the suite's are. Unknown entries raise."""
    if names is None:
        return list(SUITE)
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = []
    for name in items:
        if name not in SUITE:
            try:
                build(name)
            except ValueError:
                unknown.append(name)
    if unknown or not items:
        raise ValueError(f"--methods: unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose suite entries "
                         f"({', '.join(SUITE)}) or methods ({spelling()})")
    return items


def suite_entry(name: str) -> tuple[str, object]:
    """(description, config) of a suite name or a method spec (mapped to this model's depth)."""
    if name in SUITE:
        description, make = SUITE[name]
        return description, make()
    return f"{name} (defaults, mapped from 32 layers)", mapped_to_mini(build(name))


@dataclass
class MethodResult:
    name: str
    description: str
    n: int
    accuracy: float
    accuracy_by_type: dict[str, float]
    stages: list[dict]  # per pruning stage: after_layer, mean tokens kept, kept share, relevant recall
    tflops_ratio: float  # paper convention, relative to the same model unpruned
    seconds: float
    config: object = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        cfg = d.pop("config")
        d["config"] = None if cfg is None else ([c.to_dict() for c in cfg] if isinstance(cfg, list) else cfg.to_dict())
        return d


def questions(n: int, first: int = 0) -> list[data.Sample]:
    """The held-out questions: test split, question types in rotation."""
    return [data.sample("test", i) for i in range(first, first + n)]


def _batches(processor, samples, batch_size):
    processor.tokenizer.padding_side = "left"
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        yield chunk, processor(images=[s.image for s in chunk], text=[prompt(s.question) for s in chunk],
                               padding=True, return_tensors="pt")


def at_budget(methods: dict[str, tuple[str, object]], model, budget: float) -> dict[str, tuple[str, object]]:
    """Every entry's config scaled to the same paper-convention TFLOPs (relative to unpruned) on ``model`` with
    the mini model's `IMAGE_TOKENS` visual tokens (`transprune.budget`); entries without pruning stay as they are."""
    from ..budget import budget as scale
    from ..methods import as_list

    out = {}
    for name, (description, config) in methods.items():
        if config is not None and any(c.enabled for c in as_list(config)):
            try:
                config = scale(config, model, budget, image_tokens=IMAGE_TOKENS)
            except ValueError as exc:
                raise ValueError(f"suite entry {name!r}: {exc}; leave it out with --methods") from None
            description = f"{description}; scaled to the {budget:g} budget"
        out[name] = (description, config)
    return out


def evaluate(model, processor, names=None, n: int = 500, batch_size: int = 50, progress: bool = True,
             samples: list[data.Sample] | None = None, budget: float | None = None) -> list[MethodResult]:
    """Run each named method of `SUITE` on the same ``n`` held-out questions (all at one ``budget`` when given)."""
    methods = {name: suite_entry(name) for name in resolve(names)}
    if budget is not None:
        methods = at_budget(methods, model, budget)
    return evaluate_configs(model, processor, methods, n=n, batch_size=batch_size, progress=progress, samples=samples)


def evaluate_configs(model, processor, methods: dict[str, tuple[str, object]], n: int = 500, batch_size: int = 50,
                     progress: bool = True, samples: list[data.Sample] | None = None,
                     desc: str = "eval mini") -> list[MethodResult]:
    """Run each ``name: (description, config)`` of ``methods`` (config None: no pruning) on the same ``n``
    held-out questions and batches; one `MethodResult` per entry, in order."""
    from tqdm import tqdm

    from ..runtime import pruned

    samples = samples if samples is not None else questions(n)
    relevant = [np.flatnonzero(s.relevant_patches(PATCH_SIZE).reshape(-1)) for s in samples]
    batches = list(_batches(processor, samples, batch_size))
    answer_ids = [processor.tokenizer.convert_tokens_to_ids(s.answer) for s in samples]
    bar = tqdm(total=len(methods) * len(samples), desc=desc, unit="q", disable=not progress)
    results = []
    for name, (description, config) in methods.items():
        started = time.perf_counter()
        predictions, stats = [], []
        handle_ctx = pruned(model, config if config is not None else TransPruneConfig.preset("off"))
        with handle_ctx as handle, torch.inference_mode():
            for chunk, inputs in batches:
                logits = model(**inputs).logits[:, -1]
                predictions += logits.argmax(-1).tolist()
                stats += handle.last_stats
                bar.update(len(chunk))
        seconds = time.perf_counter() - started
        hits = np.array([p == a for p, a in zip(predictions, answer_ids)])
        by_type = {t: float(hits[[s.qtype == t for s in samples]].mean())
                   for t in data.QUESTION_TYPES if any(s.qtype == t for s in samples)}
        stages = []
        for k, layer in enumerate(stats[0].kept_after_layer):
            kept = [set(st.kept_indices[k]) for st in stats]
            recalls = [np.mean([i in kept_b for i in rel]) for kept_b, rel in zip(kept, relevant) if len(rel)]
            stages.append({"after_layer": layer,
                           "tokens": float(np.mean([len(s) for s in kept])),
                           "kept_share": float(np.mean([len(s) / st.n_image_tokens for s, st in zip(kept, stats)])),
                           "recall": float(np.mean(recalls))})
        ratio = float(sum(s.tflops for s in stats) / sum(s.tflops_unpruned for s in stats))
        results.append(MethodResult(name, description, len(samples), float(hits.mean()), by_type, stages, ratio,
                                    round(seconds, 2), config))
    bar.close()
    return results


def format_table(results: list[MethodResult]) -> str:
    """A Markdown table: accuracy (overall and per type), recall per stage, relative TFLOPs."""
    types = list(results[0].accuracy_by_type)
    head = ["method", "acc", *types, "recall by stage (layer: recall / kept share)", "TFLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        stages = ", ".join(f"L{s['after_layer']}: {s['recall']:.2f} / {s['kept_share']:.2f}" for s in r.stages) or "-"
        cells = [r.name, f"{100 * r.accuracy:.1f}", *(f"{100 * r.accuracy_by_type[t]:.1f}" for t in types), stages,
                 f"{100 * r.tflops_ratio:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[MethodResult], path, title: str) -> None:
    """One horizontal bar per method, accuracy (%), best at the top, each labelled with its paper-convention TFLOPs
    share; dashed lines at the unpruned and the random method's accuracy where the run has them."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    def kind(r):
        stages = [s["after_layer"] for s in r.stages]
        return "none" if not stages else "before the LLM" if stages[0] == 0 and len(stages) == 1 else \
            "before + in the LLM" if stages[0] == 0 else "in the LLM"

    colours = {"none": "0.55", "in the LLM": "tab:blue", "before the LLM": "tab:orange", "before + in the LLM": "tab:green"}
    ordered = sorted(results, key=lambda r: r.accuracy)
    fig = Figure(figsize=(8.5, 0.36 * len(ordered) + 1.6), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh([r.name for r in ordered], [100 * r.accuracy for r in ordered],
                   color=[colours[kind(r)] for r in ordered])
    for bar, r in zip(bars, ordered):
        ax.text(bar.get_width() + 0.6, bar.get_y() + bar.get_height() / 2,
                f"{100 * r.accuracy:.1f}%  at {100 * r.tflops_ratio:.1f}% TFLOPs", va="center", fontsize=8)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=colour, label=f"pruned {label}" if label != "none" else "no pruning")
               for label, colour in colours.items() if any(kind(r) == label for r in results)]
    for name, style in (("none", "--"), ("random", ":")):
        ref = next((r for r in results if r.name == name), None)
        if ref is not None:
            ax.axvline(100 * ref.accuracy, color="black", linestyle=style, linewidth=1, zorder=0)
            handles.append(Line2D([], [], color="black", linestyle=style, linewidth=1,
                                  label=f"{name}: {100 * ref.accuracy:.1f}%"))
    ax.set(xlim=(0, 118), xlabel="accuracy (%)", title=title)
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.tick_params(axis="y", labelsize=8)
    fig.savefig(path, dpi=110)
