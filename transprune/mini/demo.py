"""`transprune demo`: one question answered with and without TransPrune on the shipped mini model, and a
PNG of what the pruner kept and why (per-stage kept tokens, TTV / IGA / combined score heatmaps).

Drawn with PIL only (no plotting dependency).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..config import TransPruneConfig
from ..loading import build_prompt
from ..runtime import pruned

CELL = 192  # pixels per panel
# A perceptually ordered colour ramp (dark blue -> teal -> yellow), interpolated linearly.
_RAMP = np.array([[48, 18, 59], [40, 98, 190], [31, 160, 160], [120, 205, 90], [250, 230, 60]], dtype=np.float32)


@dataclass
class DemoResult:
    question: str
    answer_unpruned: str
    answer_pruned: str
    expected: str | None
    n_image_tokens: int
    kept_per_stage: list[tuple[int, int]]  # (after layer, tokens kept)
    tflops: float
    tflops_unpruned: float
    png: str | None  # the picture, when one was asked for

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def colourise(values: np.ndarray, missing: np.ndarray | None = None) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8 on the ramp (min..max of the present values); missing cells grey."""
    v = values.astype(np.float64)
    present = ~missing if missing is not None else np.ones(v.shape, bool)
    lo, hi = (v[present].min(), v[present].max()) if present.any() else (0.0, 1.0)
    t = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(t.astype(int), len(_RAMP) - 2)
    rgb = _RAMP[i] + (t - i)[..., None] * (_RAMP[i + 1] - _RAMP[i])
    rgb[~present] = 200
    return rgb.astype(np.uint8)


def _grid(values: np.ndarray, index: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the tokens ``index`` placed on the side x side patch grid; other cells are missing."""
    grid = np.zeros(side * side)
    missing = np.ones(side * side, bool)
    on_grid = np.asarray(index) >= 0  # -1: a token that is no patch (VisionZip's CLS token)
    grid[np.asarray(index)[on_grid]] = np.asarray(values)[on_grid]
    missing[np.asarray(index)[on_grid]] = False
    return grid.reshape(side, side), missing.reshape(side, side)


def _panel(array_or_image, title: str, font) -> Image.Image:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    panel = Image.new("RGB", (CELL, CELL + 18), "white")
    panel.paste(image.convert("RGB").resize((CELL, CELL), Image.NEAREST), (0, 18))
    ImageDraw.Draw(panel).text((2, 2), title, fill="black", font=font)
    return panel


def kept_overlay(image: Image.Image, kept: list[int], side: int) -> Image.Image:
    """The image with dropped patches washed out."""
    pixels = np.asarray(image.convert("RGB").resize((CELL, CELL)), dtype=np.float32)
    keep = np.zeros(side * side, bool)
    keep[[i for i in kept if i >= 0]] = True  # -1: a token that is no patch (VisionZip's CLS token)
    mask = np.kron(keep.reshape(side, side), np.ones((CELL // side + 1, CELL // side + 1)))[:CELL, :CELL] > 0
    pixels[~mask] = pixels[~mask] * 0.25 + 255 * 0.75
    return Image.fromarray(pixels.astype(np.uint8))


def render_png(image, question, answers, stats, side: int, path: str | Path) -> Path:
    """Rows: the input and answers, then one row per pruning stage: kept tokens, TTV, IGA, combined score."""
    font = ImageFont.load_default(size=12)
    stages = stats.scores or []
    columns = 4
    header_h = CELL + 18
    canvas = Image.new("RGB", (columns * CELL, header_h + len(stats.kept_indices) * (CELL + 18) + 4), "white")
    canvas.paste(_panel(image, "input", font), (0, 0))
    lines = [f"Q: {question}", *(f"{k}: {v}" for k, v in answers.items()),
             f"image tokens: {stats.n_image_tokens}",
             "kept per stage: " + ", ".join(f"L{layer}: {len(k)}" for layer, k in
                                             zip(stats.kept_after_layer, stats.kept_indices)),
             f"TFLOPs (paper convention): {100 * stats.tflops / stats.tflops_unpruned:.1f}% of unpruned",
             "heatmaps: scores of the tokens entering each stage,", "grey = already dropped; yellow = high"]
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((CELL + 10, 10 + 18 * i), line, fill="black", font=font)
    offset = len(stats.kept_indices) - len(stages)  # a pre-LLM stage (VisionZip) has no token scores
    for row, (layer, kept) in enumerate(zip(stats.kept_after_layer, stats.kept_indices)):
        y = header_h + row * (CELL + 18)
        canvas.paste(_panel(kept_overlay(image, kept, side), f"kept after layer {layer}: {len(kept)}", font), (0, y))
        stage = stages[row - offset] if row >= offset else {}
        for col, key in enumerate(("ttv", "iga", "score"), start=1):
            if key not in stage:  # methods other than TransPrune record only their own score
                continue
            grid, missing = _grid(stage[key].float().numpy(), stage["image_index"].numpy(), side)
            title = {"ttv": "TTV", "iga": "IGA", "score": "combined"}[key] + f" at layer {layer}"
            canvas.paste(_panel(colourise(grid, missing), title, font), (col * CELL, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def run_demo(model, processor, image: Image.Image, question: str, out: str | Path | None = None,
             config: TransPruneConfig | None = None, expected: str | None = None,
             max_new_tokens: int = 4) -> DemoResult:
    """Answer ``question`` about ``image`` unpruned and with ``config`` (default TransPrune high); with ``out``,
    draw the PNG there."""
    config = config or TransPruneConfig.preset("high", reference_depth=32)  # the paper's layers, mapped to 12
    image = image.convert("RGB")
    inputs = processor(images=image, text=build_prompt(processor, question), return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]

    def answer():
        out_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.decode(out_ids[0, prompt_len:], skip_special_tokens=True).strip()

    with torch.inference_mode():
        unpruned = answer()
        with pruned(model, config, record_scores=True) as handle:
            pruned_answer = answer()
            stats = handle.last_stats[0]
    side = int(round(stats.n_image_tokens ** 0.5))
    answers = {"unpruned": unpruned, "pruned": pruned_answer}
    if expected is not None:
        answers["expected"] = expected
    png = None if out is None else render_png(image.resize((side * 6, side * 6)), question, answers, stats, side, out)
    return DemoResult(question, unpruned, pruned_answer, expected, stats.n_image_tokens,
                      [(layer, len(k)) for layer, k in zip(stats.kept_after_layer, stats.kept_indices)],
                      stats.tflops, stats.tflops_unpruned, None if png is None else str(png))
