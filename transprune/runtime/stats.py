"""What a prefill reports: per-sample `SampleStats` (kept tokens, per-layer counts, paper TFLOPs) and the
optional timing of its scoring steps."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from ..accounting import paper_tflops_of
from ..schedule import Schedule


@dataclass
class SampleStats:
    """What one prefill did to one sample."""

    n_image_tokens: int
    # per pruning stage, in sequence order: the image token (0..N-1 in input order) each kept token holds; -1 for one
    # the unpruned model has none of (VisionZip's CLS token on LLaVA)
    kept_indices: list[list[int]]
    kept_after_layer: list[int]  # the 1-indexed layer each stage pruned after (0: before the LLM)
    visual_tokens_per_layer: list[int]
    tflops: float  # paper convention (visual tokens only, 4nd^2 + 2n^2d + 3ndm per layer, prefill)
    tflops_unpruned: float
    pruning_layers: tuple[int, ...]  # 1-indexed layers actually used for this model's depth
    accumulation_layers: tuple[int, ...]
    # The position rule the kept tokens ran with on this model: "compact" (closed up after each drop) or
    # "original" (each keeps its own position); a method left at its default gets its family's rule.
    positions: str
    # With apply(..., record_scores=True): per stage, the scored image tokens (`image_index`, numbered
    # like kept_indices) and their L1-normalised `ttv`, `iga` and combined `score`, as fp32 CPU tensors.
    scores: list[dict] | None = None

    @property
    def pruned_nothing(self) -> bool:
        """Whether this sample had image tokens and every layer still saw all of them (a setting that keeps
        everything on this model: the handle warns once, `transprune run` says so)."""
        return self.n_image_tokens > 0 and all(n == self.n_image_tokens for n in self.visual_tokens_per_layer)

    @property
    def tflops_ratio(self) -> float:
        """Paper-convention TFLOPs relative to unpruned: what a budget (`transprune.budget`) aims at."""
        return self.tflops / self.tflops_unpruned if self.tflops_unpruned else 1.0

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        if self.scores is not None:
            out["scores"] = [{k: v.tolist() for k, v in stage.items()} for stage in self.scores]
        return out


def sample_stats(schedule: Schedule, decoder_config, n_original, n_llm, kept_ranks, scores=None,
                 pre_llm: bool = False, positions: str = "original") -> list[SampleStats]:
    """One `SampleStats` per sample from what the prefill kept (``kept_ranks``: per sample, per stage, the
    kept image tokens' indices; a pre-LLM stage first when ``pre_llm``)."""
    d, m = decoder_config.hidden_size, decoder_config.intermediate_size
    stage_layers = ([0] if pre_llm else []) + list(schedule.pruning_layers)
    stats = []
    for b, (n, n_start, ranks) in enumerate(zip(n_original, n_llm, kept_ranks)):
        if n == 0:  # no visual token: nothing was pruned, alone or in a batch with images
            ranks = []
        counts = [int(r.numel()) for r in (ranks[1:] if pre_llm else ranks)]
        per_layer = schedule.tokens_per_layer(n_start, counts)
        stats.append(SampleStats(
            n_image_tokens=n,
            kept_indices=[r.tolist() for r in ranks],
            kept_after_layer=stage_layers[: len(ranks)],
            visual_tokens_per_layer=per_layer,
            tflops=paper_tflops_of(per_layer, d, m),
            tflops_unpruned=paper_tflops_of([n] * schedule.depth, d, m),
            pruning_layers=schedule.pruning_layers,
            accumulation_layers=schedule.accumulation_layers,
            positions=positions,
            scores=scores[b] if scores is not None else None,
        ))
    return stats


class Profiler:
    """Wall time of the scoring pieces of one prefill, only while `handle.profile` is on.

    On CUDA every span is a pair of events: recording them never blocks the host, and the one
    synchronisation happens in `result()`, at the end of the prefill. On CPU spans are perf_counter
    intervals (CPU ops run synchronously). With profiling off the runtime uses `NO_PROFILE`, whose
    spans are no-ops, so a normal run adds no events and no host syncs.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, int, object, object]] = []  # (kind, stage, start, end)

    @contextlib.contextmanager
    def span(self, kind: str, stage: int = -1):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.spans.append((kind, stage, start, end))

    def result(self, n_stages: int) -> dict:
        """Seconds per kind: `ttv_s` (TTV accumulation), `pre_llm_s` (VisionZip's selection), and per
        pruning stage `select_s` (scoring + top-k) and `drop_s` (removing the tokens); `scoring_s` =
        ttv + pre-LLM + select, the cost of deciding what to drop; `pre_llm_drop_s` removes the
        tokens VisionZip dropped."""
        if self.cuda and self.spans:
            self.spans[-1][3].synchronize()
        out = {"ttv_s": 0.0, "pre_llm_s": 0.0, "pre_llm_drop_s": 0.0,
               "select_s": [0.0] * n_stages, "drop_s": [0.0] * n_stages}
        for kind, stage, start, end in self.spans:
            seconds = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            if stage >= 0:
                out[kind][stage] += seconds
            else:
                out[kind] += seconds
        out["scoring_s"] = out["ttv_s"] + out["pre_llm_s"] + sum(out["select_s"])
        return out


class _NoProfile:
    def span(self, kind: str, stage: int = -1):
        return contextlib.nullcontext()


NO_PROFILE = _NoProfile()
