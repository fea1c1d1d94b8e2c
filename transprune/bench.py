"""``transprune bench``: prefill latency, time to first token, decode speed, peak memory, KV-cache size,
scoring time and paper-convention TFLOPs of several pruning methods, measured in ONE run on the same
model, the same inputs and the same attention backend, with ratios to the unpruned model (``none``).

    transprune bench --arch llava-1.5-7b --random-weights --methods none,transprune-high,transprune-low \\
        --batch 8 --dtype bf16 [--json]
    transprune bench --arch llava-1.5-reduced --methods none,transprune-high --batch 2   # CPU, seconds

What is measured, per method (``measure_method``):

* prefill: one forward of the multimodal model (vision tower, projector, decoder; ``logits_to_keep=1``)
  into an empty ``DynamicCache``; median and min/max/IQR over ``--repeats`` after ``--warmup``; CUDA
  events on GPU, ``time.perf_counter`` on CPU. The pruning handle runs with ``profile=True``, so the
  same prefills also report the time spent deciding what to drop (``scoring``: TTV accumulation,
  VisionZip's selection and each stage's scoring + top-k; see ``runtime._Profiler``).
* KV-cache bytes: the key and value tensors of that cache after the prefill (pruned layers hold fewer
  tokens), with the cached length of every layer.
* generate: greedy ``generate`` with ``min_new_tokens = max_new_tokens = --new-tokens`` (so every method
  decodes the same count) and a streamer that timestamps each step: time to first token (call start to
  the first new token) and decode tokens/s (``batch * (new_tokens - 1)`` over first-to-last token).
* peak memory during one ``generate`` (prefill + decode): ``torch.cuda.max_memory_allocated`` on GPU;
  on CPU the growth of the process's peak RSS (VmHWM, reset through ``/proc/self/clear_refs``) over
  its RSS before the call. The report says which.
* TFLOPs: paper convention (visual tokens only, prefill), from ``handle.last_stats`` (mean per sample);
  for ``none`` the same formula with every image token in every layer.

``none`` is the model with no pruning attached at all. Random-weight models (``--random-weights``, and
the ``*-reduced`` archs, which are always random) are built from configs written in code below, with
no download and no default init: every matrix is filled with seeded N(0, 1/fan_in) noise (norms 1,
biases 0), so attention is not degenerate; their cost does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .flops import ArchSpec, arch_from_hf_config, compress_runs, paper_tflops
from .methods import COMPOSITIONS, METHODS, build

# ---------------------------------------------------------------------------------------------- archs

ANYRES_GRID = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-NeXT-7B's pinpoints
IMAGE_TOKEN_ID, PAD_TOKEN_ID, VOCAB = 32000, 32001, 32064  # llava-hf's Vicuna-based checkpoints


def _clip_l336(**overrides):
    from transformers import CLIPVisionConfig

    fields = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return CLIPVisionConfig(**{**fields, **overrides})


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None = None, **overrides):
    from transformers import LlamaConfig

    fields = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads or heads, vocab_size=VOCAB,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False)
    return LlamaConfig(**{**fields, **overrides})


def _llava(vision, text, anyres: bool):
    from transformers import LlavaConfig, LlavaNextConfig

    common = dict(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, pad_token_id=PAD_TOKEN_ID,
                  projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                  image_seq_length=(vision.image_size // vision.patch_size) ** 2, tie_word_embeddings=False)
    if anyres:
        return LlavaNextConfig(**common, image_grid_pinpoints=[list(p) for p in ANYRES_GRID])
    return LlavaConfig(**common)


# Reduced: LLaVA's geometry (336 px / 14 px patches -> 576 image tokens per crop, 32 decoder layers, MHA,
# SwiGLU at ~2.7x) with a small hidden size and a 2-layer vision tower, so it runs on a CPU in seconds.
_REDUCED_TEXT = dict(hidden=128, intermediate=344, layers=32, heads=4)
_REDUCED_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       projection_dim=64)

CONFIGS = {
    "llava-1.5-7b": lambda: _llava(_clip_l336(), _llama(4096, 11008, 32, 32), anyres=False),
    "llava-1.5-13b": lambda: _llava(_clip_l336(), _llama(5120, 13824, 40, 40), anyres=False),
    "llava-next-7b": lambda: _llava(_clip_l336(), _llama(4096, 11008, 32, 32), anyres=True),
    "llava-1.5-reduced": lambda: _llava(_clip_l336(**_REDUCED_VISION), _llama(**_REDUCED_TEXT), anyres=False),
    "llava-next-reduced": lambda: _llava(_clip_l336(**_REDUCED_VISION), _llama(**_REDUCED_TEXT), anyres=True),
}
REDUCED = ("llava-1.5-reduced", "llava-next-reduced")


def arch_config(name: str):
    """The Hugging Face config (LlavaConfig / LlavaNextConfig) of a named bench arch, built in code."""
    if name not in CONFIGS:
        raise ValueError(f"unknown arch {name!r}; choose one of {', '.join(CONFIGS)} or a checkpoint folder")
    return CONFIGS[name]()


def arch_spec(name: str) -> ArchSpec:
    """The ArchSpec (FLOPs dimensions, nominal image tokens) of a named bench arch."""
    return arch_from_hf_config(arch_config(name), name)


# ---------------------------------------------------------------------------------------------- methods

# Bench names -> (method list for methods.build, preset); "none" is the model with nothing attached.
_NAMED = {
    "none": None,
    "transprune-high": ("transprune", "high"),
    "transprune-low": ("transprune", "low"),
    **{name: (name, None) for name in METHODS if name != "transprune"},
    **{name: (None, name) for name in COMPOSITIONS},
}


def method_names() -> list[str]:
    return list(_NAMED)


def method_config(name: str):
    """The config (or composition list) a bench method name stands for; None for ``none``.

    Besides the names in `method_names()`, ``A+B`` composes a pre-LLM and an in-LLM method
    (e.g. ``visionzip+fastv``; TransPrune-High for ``transprune``)."""
    if name in _NAMED:
        if _NAMED[name] is None:
            return None
        methods, preset = _NAMED[name]
        return build(methods or "transprune", preset)
    parts = name.split("+")
    if len(parts) == 2 and all(p in METHODS for p in parts):
        return build(",".join(parts))
    raise ValueError(f"unknown method {name!r}; allowed: {', '.join(method_names())}, "
                     f"or A+B with A, B in {', '.join(METHODS)} (e.g. visionzip+fastv)")


def parse_methods(text: str) -> list[tuple[str, object]]:
    """``"none,transprune-high"`` -> [(name, config), ...]; raises ValueError naming the allowed values."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--methods is empty; allowed: {', '.join(method_names())}")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods names a method twice: {names}")
    return [(n, method_config(n)) for n in names]


# ---------------------------------------------------------------------------------------------- models

@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Seeded weights: norms 1, biases 0, other vectors N(0, 0.02), matrices N(0, 1/fan_in) (unit-scale
    activations, so attention logits are O(1): neither uniform nor one-hot)."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1 and "norm" in name:
            param.fill_(1.0)
        else:
            gen = generators.get(param.device)
            if gen is None:
                gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            std = 0.02 if param.dim() == 1 else 1.0 / math.sqrt(param[0].numel())
            param.normal_(0.0, std, generator=gen)


def build_random_model(arch: str, dtype: torch.dtype, device, attn_implementation: str = "sdpa", seed: int = 0):
    """A random-weight model of a named arch, created directly on ``device`` in ``dtype`` (no meta
    device, no default init, no download), in eval mode."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
    from transformers.initialization import no_init_weights

    config = arch_config(arch)
    cls = LlavaNextForConditionalGeneration if config.model_type == "llava_next" else LlavaForConditionalGeneration
    with no_init_weights(), torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    fill_random(model, seed)
    return model.eval()


# ---------------------------------------------------------------------------------------------- inputs

@dataclass
class BenchInputs:
    tensors: dict  # model inputs: input_ids, attention_mask, pixel_values (+ image_sizes for NeXT)
    image_tokens: list[int]  # per sample
    text_tokens: list[int]  # per sample: every non-image token (BOS and chat template included)
    image_size: tuple[int, int]  # (height, width) of each synthetic image
    source: str  # how they were made

    @property
    def sha256(self) -> str:
        return inputs_sha256(self.tensors)


def inputs_sha256(tensors: dict) -> str:
    """Fingerprint of the exact tensors handed to the model (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            digest.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _image_tokens_per_image(model, image_size) -> tuple[int, int]:
    """(image tokens, vision crops) of one image of ``image_size`` (h, w), by the model's own packing."""
    from .adapters.llava import LlavaAdapter

    config = model.config
    vision = config.vision_config
    per_tile = (vision.image_size // vision.patch_size) ** 2
    if config.model_type != "llava_next":
        return per_tile, 1
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tiles = image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, vision.image_size)
    ids = LlavaAdapter(model)._packed_patch_ids(tiles, per_tile, torch.tensor([list(image_size)]))
    return int(ids[0].numel()), tiles


def synthetic_inputs(model, batch: int, text_tokens: int = 64, image_size=None, seed: int = 0) -> BenchInputs:
    """One image and ``text_tokens`` non-image tokens per sample, no tokenizer needed: BOS and 4 text ids,
    the image placeholders, then the rest of the text (the instruction IGA reads). Every sample has
    its own seeded image and text, all of the same length (no padding)."""
    if text_tokens < 2:
        raise ValueError(f"--text-tokens must be >= 2 (BOS and at least one instruction token), got {text_tokens}")
    config = model.config
    vision = config.vision_config
    size = tuple(image_size or ((vision.image_size, vision.image_size) if config.model_type != "llava_next"
                                else (2 * vision.image_size, 2 * vision.image_size)))
    n_image, tiles = _image_tokens_per_image(model, size)
    gen = torch.Generator().manual_seed(seed)
    vocab = min(config.text_config.vocab_size, IMAGE_TOKEN_ID)
    before = min(5, text_tokens - 1)
    rows = []
    for _ in range(batch):
        text = torch.randint(5, vocab, (text_tokens,), generator=gen)
        for reserved in (config.image_token_id, getattr(config, "pad_token_id", None)):
            if reserved is not None:
                text[text == reserved] = 5
        text[0] = config.text_config.bos_token_id if config.text_config.bos_token_id is not None else 1
        rows.append(torch.cat([text[:before], torch.full((n_image,), config.image_token_id), text[before:]]))
    input_ids = torch.stack(rows)
    side = vision.image_size
    shape = (batch, 3, side, side) if config.model_type != "llava_next" else (batch, tiles, 3, side, side)
    tensors = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
               "pixel_values": torch.randn(shape, generator=gen)}
    if config.model_type == "llava_next":
        tensors["image_sizes"] = torch.tensor([list(size)] * batch)
    return BenchInputs(tensors, [n_image] * batch, [text_tokens] * batch, size,
                       f"synthetic (seed {seed}): N(0,1) pixel values, random text ids")


def checkpoint_inputs(processor, model, batch: int, text_tokens: int = 64, image_size=None,
                      seed: int = 0) -> BenchInputs:
    """Inputs for a real checkpoint: seeded synthetic images and a fixed question, through the checkpoint's
    own processor and chat template; the question is as many filler words as keep the non-image token
    count <= ``text_tokens``."""
    from .cli import build_prompt
    from .testing import random_image

    vision = model.config.vision_config
    size = tuple(image_size or ((vision.image_size, vision.image_size) if model.config.model_type != "llava_next"
                                else (2 * vision.image_size, 2 * vision.image_size)))
    words = "describe the image in detail and list every object you can see".split()
    image_id = model.config.image_token_id

    image_token = getattr(processor, "image_token", "<image>")

    def prompt(n_words):
        return build_prompt(processor, " ".join(words[i % len(words)] for i in range(n_words)))

    def text_count(n_words):  # before the processor expands <image>: every token but the placeholder
        ids = processor.tokenizer(prompt(n_words).replace(image_token, ""))["input_ids"]
        return len(ids)

    n_words = 1
    while n_words < 4 * text_tokens and text_count(n_words + 1) <= text_tokens:
        n_words += 1
    images = [random_image(seed * 1000 + b, (size[1], size[0])) for b in range(batch)]
    out = processor(images=images, text=[prompt(n_words)] * batch, return_tensors="pt")
    tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    ids = tensors["input_ids"]
    return BenchInputs(tensors, (ids == image_id).sum(1).tolist(), (ids != image_id).sum(1).tolist(), size,
                       f"checkpoint processor, synthetic images (seed {seed}), a {n_words}-word question")


# ---------------------------------------------------------------------------------------------- timing

class _Clock:
    """Elapsed seconds of a block: CUDA events on GPU (read after the block's end event), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def time(self, out: list):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            yield
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            yield
            out.append(time.perf_counter() - start)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


class _StepStreamer:
    """A generate() streamer that only timestamps: the first put is the prompt, then one per step. On
    CUDA generate hands over `tokens.cpu()`, which has already waited for the step to finish."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


class _PeakMemory:
    """Peak memory of a block. GPU: torch.cuda.max_memory_allocated (absolute) and its growth over the
    allocation before the block. CPU: growth of the peak RSS over the RSS before the block; the peak is
    reset through /proc/self/clear_refs, or, where that is not allowed, sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.kind = ("cuda: torch.cuda.max_memory_allocated" if self.cuda else
                     "cpu: peak RSS growth during generate (VmHWM after resetting it via /proc/self/clear_refs, "
                     "minus VmRSS before, after gc + malloc_trim)")
        if not self.cuda and not _can_reset_peak_rss():
            self.kind = ("cpu: peak RSS growth during generate (VmRSS sampled every 2 ms, minus VmRSS before, "
                         "after gc + malloc_trim)")

    @contextlib.contextmanager
    def measure(self, out: dict):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            yield
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            out.update(peak_bytes=peak, peak_growth_bytes=peak - before)
            return
        _malloc_trim()  # hand memory freed by earlier runs back to the OS, so RSS counts live memory
        before = _proc_status("VmRSS")
        if _can_reset_peak_rss():
            _reset_peak_rss()
            yield
            peak = _proc_status("VmHWM")
        else:
            samples, stop = [before], threading.Event()

            def sample():
                while not stop.wait(0.002):
                    samples.append(_proc_status("VmRSS"))

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            try:
                yield
            finally:
                stop.set()
                thread.join()
            peak = max(samples + [_proc_status("VmRSS")])
        out.update(peak_bytes=peak, peak_growth_bytes=max(peak - before, 0))


def _proc_status(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _malloc_trim() -> None:
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_PEAK_RESET: bool | None = None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _can_reset_peak_rss() -> bool:
    global _PEAK_RESET
    if _PEAK_RESET is None:
        _PEAK_RESET = _reset_peak_rss()
    return _PEAK_RESET


def summarize(values: list[float]) -> dict:
    """median, min, max and the interquartile range of timed repeats."""
    if not values:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "n": 0}
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q1, "q3": q3,
            "n": len(values)}


def kv_cache_bytes(cache) -> tuple[int, list[int]]:
    """Bytes of every key and value tensor of a DynamicCache, and the cached length of each layer."""
    total, lengths = 0, []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or not isinstance(keys, torch.Tensor):
            lengths.append(0)
            continue
        total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        lengths.append(int(keys.shape[-2]))
    return total, lengths


# ---------------------------------------------------------------------------------------------- measuring

@dataclass
class MethodResult:
    name: str
    config: object  # list of method dicts (empty for none)
    inputs_sha256: str
    prefill_s: dict
    scoring_s: dict | None  # None for none
    scoring_detail: dict | None  # the last timed prefill's profile (ttv, per-stage select and drop)
    ttft_s: dict
    decode_tokens_per_s: dict | None
    new_tokens: list[int]  # generated tokens per sample, every timed run
    peak_memory_bytes: int
    peak_memory_growth_bytes: int
    kv_cache_bytes: int
    kv_tokens_per_layer: list[int]  # cached tokens per layer after the prefill (longest sample)
    visual_tokens_per_layer: list[list[int]]  # per sample, from handle.last_stats
    tflops: float  # paper convention, mean per sample
    tflops_unpruned: float
    ratios: dict = field(default_factory=dict)  # vs none, filled by run_bench

    def to_dict(self) -> dict:
        return asdict(self)


def _paper_tflops_unpruned(model, image_tokens: list[int]) -> list[float]:
    spec = arch_from_hf_config(model.config, "model")
    return [paper_tflops(spec, [n] * spec.num_layers) for n in image_tokens]


def measure_method(model, inputs: BenchInputs, name: str, config, *, repeats: int = 5, warmup: int = 2,
                   new_tokens: int = 64) -> MethodResult:
    """Measure one method (``config`` None: no pruning attached) on ``inputs``; see the module docstring."""
    from transformers import DynamicCache

    from .runtime import apply

    device = model.device
    clock, memory = _Clock(device), _PeakMemory(device)
    tensors = {k: v.to(device) for k, v in inputs.tensors.items()}
    if "pixel_values" in tensors:
        tensors["pixel_values"] = tensors["pixel_values"].to(model.dtype)
    sha = inputs_sha256(tensors)
    batch = tensors["input_ids"].shape[0]
    handle = apply(model, config, profile=True) if config is not None else None
    try:
        prefill, scoring, detail, cache = [], [], None, None
        with torch.no_grad():
            for i in range(warmup + repeats):
                cache = DynamicCache(config=model.config.get_text_config())
                timed = []
                with clock.time(timed):
                    model(**tensors, cache=cache, use_cache=True, logits_to_keep=1)
                if i >= warmup:
                    prefill.append(timed[0])
                    if handle is not None and handle.last_profile is not None:
                        scoring.append(handle.last_profile["scoring_s"])
                        detail = handle.last_profile
            kv_bytes, kv_lengths = kv_cache_bytes(cache)
            del cache
            if handle is not None:
                stats = handle.last_stats
                visual = [s.visual_tokens_per_layer for s in stats]
                tflops = [s.tflops for s in stats]
                tflops_unpruned = [s.tflops_unpruned for s in stats]
            else:
                depth = model.config.get_text_config().num_hidden_layers
                visual = [[n] * depth for n in inputs.image_tokens]
                tflops = tflops_unpruned = _paper_tflops_unpruned(model, inputs.image_tokens)

            ttft, decode, counts, mem = [], [], [], {}
            pad = model.config.get_text_config().pad_token_id
            for i in range(warmup + repeats):
                streamer = _StepStreamer()
                with (memory.measure(mem) if i == warmup else contextlib.nullcontext()):
                    clock.sync()
                    start = time.perf_counter()
                    out = model.generate(**tensors, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         do_sample=False, streamer=streamer, pad_token_id=pad)
                if i < warmup:
                    continue
                steps = streamer.stamps[1:]  # stamps[0]: the prompt
                counts.append(int(out.shape[1] - tensors["input_ids"].shape[1]))
                ttft.append(steps[0] - start)
                if len(steps) > 1:
                    decode.append(batch * (len(steps) - 1) / (steps[-1] - steps[0]))
    finally:
        if handle is not None:
            handle.remove()
    return MethodResult(
        name=name,
        config=[] if config is None else [c.to_dict() for c in (config if isinstance(config, list) else [config])],
        inputs_sha256=sha,
        prefill_s=summarize(prefill),
        scoring_s=summarize(scoring) if handle is not None else None,
        scoring_detail=detail,
        ttft_s=summarize(ttft),
        decode_tokens_per_s=summarize(decode) if decode else None,
        new_tokens=counts,
        peak_memory_bytes=mem.get("peak_bytes", 0),
        peak_memory_growth_bytes=mem.get("peak_growth_bytes", 0),
        kv_cache_bytes=kv_bytes,
        kv_tokens_per_layer=kv_lengths,
        visual_tokens_per_layer=visual,
        tflops=statistics.fmean(tflops),
        tflops_unpruned=statistics.fmean(tflops_unpruned),
    )


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def add_ratios(results: list[MethodResult]) -> None:
    """Ratios of every method to ``none`` (prefill, TTFT, KV, peak growth, TFLOPs: method / none; decode
    tokens/s: method / none, so > 1 is faster) and scoring as a fraction of the method's own prefill."""
    base = next((r for r in results if r.name == "none"), None)
    for r in results:
        med = lambda d: d["median"] if d else None  # noqa: E731
        r.ratios = {"scoring_fraction_of_prefill": _ratio(med(r.scoring_s), med(r.prefill_s))}
        if base is None:
            continue
        r.ratios.update(
            prefill=_ratio(med(r.prefill_s), med(base.prefill_s)),
            ttft=_ratio(med(r.ttft_s), med(base.ttft_s)),
            decode_tokens_per_s=_ratio(med(r.decode_tokens_per_s), med(base.decode_tokens_per_s)),
            kv_cache=_ratio(r.kv_cache_bytes, base.kv_cache_bytes),
            peak_memory_growth=_ratio(r.peak_memory_growth_bytes, base.peak_memory_growth_bytes),
            tflops=_ratio(r.tflops, base.tflops),
        )


# ---------------------------------------------------------------------------------------------- the run

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _environment(device: torch.device) -> dict:
    import platform

    import transformers

    env = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run_bench(arch: str, methods: list[tuple[str, object]], *, batch: int = 1, dtype: str = "fp32",
              device: str | None = None, attn_implementation: str = "sdpa", random_weights: bool = False,
              repeats: int = 5, warmup: int = 2, new_tokens: int = 64, text_tokens: int = 64,
              image_size=None, seed: int = 0, progress=None) -> dict:
    """Build (or load) the model and inputs once, measure every method, return the JSON-able report."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = DTYPES[dtype]
    if arch in CONFIGS:
        if arch not in REDUCED and not random_weights:
            raise ValueError(f"--arch {arch} needs --random-weights (bench never downloads weights); for real "
                             f"weights pass a local checkpoint folder as --arch")
        random_weights = True
        t0 = time.perf_counter()
        model = build_random_model(arch, torch_dtype, device, attn_implementation, seed)
        build_s = time.perf_counter() - t0
        inputs = synthetic_inputs(model, batch, text_tokens, image_size, seed)
        weights = f"random (seeded N(0, 1/fan_in) init, seed {seed}; no checkpoint)"
    else:
        from .cli import load_checkpoint

        if random_weights:
            raise ValueError("--random-weights applies to the named archs; a checkpoint folder has its own weights")
        t0 = time.perf_counter()
        model, processor = load_checkpoint(arch, dtype)
        model = model.to(device)
        if attn_implementation != model.config._attn_implementation:
            model.set_attn_implementation(attn_implementation)
        build_s = time.perf_counter() - t0
        inputs = checkpoint_inputs(processor, model, batch, text_tokens, image_size, seed)
        weights = f"checkpoint {arch}"
    results = []
    for name, config in methods:
        if progress:
            progress(f"measuring {name} ...")
        results.append(measure_method(model, inputs, name, config, repeats=repeats, warmup=warmup,
                                      new_tokens=new_tokens))
    add_ratios(results)
    text = model.config.get_text_config()
    return {
        "arch": arch,
        "random_weights": random_weights,
        "weights": weights,
        "model_build_s": build_s,
        "dtype": dtype,
        "attn_implementation": model.config._attn_implementation,
        "batch": batch,
        "image_size": list(inputs.image_size),
        "image_tokens": inputs.image_tokens,
        "text_tokens": inputs.text_tokens,
        "inputs": inputs.source,
        "inputs_sha256": inputs.sha256,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "decoder": {"layers": text.num_hidden_layers, "hidden_size": text.hidden_size,
                    "intermediate_size": text.intermediate_size, "heads": text.num_attention_heads,
                    "kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                    "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads},
        "memory_measure": _PeakMemory(device).kind,
        "timer": "cuda events (prefill), perf_counter after cuda sync (generate)" if device.type == "cuda"
        else "time.perf_counter",
        "environment": _environment(device),
        "methods": [r.to_dict() for r in results],
    }


# ---------------------------------------------------------------------------------------------- output

def _ms(d):
    return "-" if not d or d["median"] is None else f"{1e3 * d['median']:.1f} [{1e3 * d['min']:.1f}-{1e3 * d['max']:.1f}]"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


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
        "times: median [min-max] ms; ratios: method / none (decode: tokens/s ratio, > 1 is faster)",
    ]
    cols = ["method", "prefill ms", "x", "scoring ms (% prefill)", "TTFT ms", "x", "decode tok/s", "x",
            "peak MiB", "KV MiB", "x", "TFLOPs", "x"]
    rows = []
    for r in report["methods"]:
        q = r["ratios"]
        scoring = "-" if not r["scoring_s"] or r["scoring_s"]["median"] is None else (
            f"{1e3 * r['scoring_s']['median']:.1f} ({100 * q['scoring_fraction_of_prefill']:.1f}%)")
        dec = r["decode_tokens_per_s"]
        rows.append([
            r["name"], _ms(r["prefill_s"]), _x(q.get("prefill")), scoring, _ms(r["ttft_s"]), _x(q.get("ttft")),
            "-" if not dec else f"{dec['median']:.1f}", _x(q.get("decode_tokens_per_s")),
            f"{r['peak_memory_growth_bytes'] / 2**20:.1f}", f"{r['kv_cache_bytes'] / 2**20:.2f}", _x(q.get("kv_cache")),
            f"{r['tflops']:.4g}", _x(q.get("tflops")),
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


# ---------------------------------------------------------------------------------------------- CLI

def _methods_arg(value: str):
    try:
        return parse_methods(value)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _arch_arg(value: str) -> str:
    if value in CONFIGS or Path(value).is_dir():
        return value
    raise argparse.ArgumentTypeError(f"unknown arch {value!r}: use one of {', '.join(CONFIGS)} or a local "
                                     f"checkpoint folder")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return n


def _non_negative(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return n


def _size(value: str):
    try:
        h, w = (int(v) for v in value.lower().split("x"))
        if h > 0 and w > 0:
            return (h, w)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 672x672, got {value!r}")


def cmd_bench(args) -> int:
    try:
        report = run_bench(args.arch, args.methods, batch=args.batch, dtype=args.dtype, device=args.device,
                           attn_implementation=args.attn, random_weights=args.random_weights,
                           repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
                           text_tokens=args.text_tokens, image_size=args.image_size, seed=args.seed,
                           progress=None if args.json else lambda m: print(m, file=sys.stderr))
    except (ValueError, OSError) as exc:
        print(f"transprune bench: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def register(subparsers) -> None:
    """Add the ``bench`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench", help="measure latency, memory, KV cache and TFLOPs of pruning methods against the unpruned model",
        description="Measure prefill latency, time to first token, decode tokens/s, peak memory, KV-cache bytes, "
                    "scoring time and paper TFLOPs of each method in one run, on the same inputs and attention "
                    "backend, with ratios to 'none' (no pruning).")
    p.add_argument("--arch", type=_arch_arg, required=True, metavar="|".join([*CONFIGS, "PATH"]),
                   help=f"{', '.join(CONFIGS)} (random weights built in code) or a local checkpoint folder")
    p.add_argument("--methods", type=_methods_arg, default=parse_methods("none,transprune-high"),
                   metavar="M1,M2,...", help=f"comma-separated, from: {', '.join(method_names())} "
                   "(or A+B compositions); default none,transprune-high")
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa",
                   help="attention backend, the same for every method (default sdpa)")
    p.add_argument("--random-weights", action="store_true",
                   help="build the named arch with random weights (needed for the full-size archs)")
    p.add_argument("--repeats", type=_positive, default=5, help="timed repeats (default 5)")
    p.add_argument("--warmup", type=_non_negative, default=2, help="untimed warm-up runs (default 2)")
    p.add_argument("--new-tokens", type=_positive, default=64, help="greedy tokens to decode (default 64)")
    p.add_argument("--text-tokens", type=_positive, default=64,
                   help="non-image tokens per sample (default 64; a checkpoint's template may need more)")
    p.add_argument("--image-size", type=_size, default=None, metavar="HxW",
                   help="synthetic image size (default: the vision tower's; 2x that for LLaVA-NeXT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_with_default_dtype)


def _with_default_dtype(args) -> int:
    if args.dtype is None:
        cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        args.dtype = "bf16" if cuda else "fp32"
    return cmd_bench(args)
