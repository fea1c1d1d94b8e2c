"""Measuring one bench run; what is measured, per method (``measure_method``):

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

``none`` is the model with no pruning attached at all.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..compat import cache_kwargs
from ..flops import arch_from_hf_config, paper_tflops
from ..loading import load_checkpoint, load_config, torch_dtype
from .archs import CONFIGS, REDUCED, arch_config, build_random_model
from .inputs import BenchInputs, checkpoint_inputs, inputs_sha256, synthetic_inputs


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
    # FLOPs of one prefill (vision tower, projector, decoder, the method's own scoring), counted by torch's
    # FlopCounterMode (matrix products and attention; the CPU's fused attention counted as 4 L S d)
    prefill_flops: int = 0
    rounds: dict = field(default_factory=dict)  # per timed round: prefill_s, ttft_s, decode_tokens_per_s
    ratios: dict = field(default_factory=dict)  # vs none (of the medians), filled by add_ratios
    # vs none within each round (same round, back to back): median, min, max, IQR over the rounds
    round_ratios: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _paper_tflops_unpruned(model, image_tokens: list[int]) -> list[float]:
    spec = arch_from_hf_config(model.config, "model")
    return [paper_tflops(spec, [n] * spec.num_layers) for n in image_tokens]


class _MethodRun:
    """One method's measurements, one round at a time (`once`): the pruning is applied for the round and
    removed after it, so the methods of a round run on the same model one after another."""

    def __init__(self, model, inputs: BenchInputs, name: str, config, new_tokens: int):
        from ..adapters import adapter_for

        self.model, self.inputs, self.name, self.config, self.new_tokens = model, inputs, name, config, new_tokens
        self.adapter = adapter_for(model)
        self.clock, self.memory = _Clock(model.device), _PeakMemory(model.device)
        self.tensors = {k: v.to(model.device) for k, v in inputs.tensors.items()}
        if "pixel_values" in self.tensors:
            self.tensors["pixel_values"] = self.tensors["pixel_values"].to(model.dtype)
        self.prefill, self.scoring, self.ttft, self.decode, self.counts = [], [], [], [], []
        self.detail, self.mem, self.kv, self.stats, self.ran_config = None, {}, (0, []), None, None

    def once(self, timed: bool, measure_memory: bool = False) -> None:
        from ..runtime import apply

        model, tensors = self.model, self.tensors
        handle = apply(model, self.config, profile=True) if self.config is not None else None
        try:
            with torch.no_grad():
                cache, seconds = self.adapter.new_cache(), []
                with self.clock.time(seconds):
                    model(**tensors, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
                self.kv = kv_cache_bytes(cache)
                del cache
                if handle is not None:
                    self.stats, self.ran_config = handle.last_stats, handle.config
                if timed:
                    self.prefill.append(seconds[0])
                    if handle is not None and handle.last_profile is not None:
                        self.scoring.append(handle.last_profile["scoring_s"])
                        self.detail = handle.last_profile
                streamer = _StepStreamer()
                pad = model.config.get_text_config().pad_token_id
                with (self.memory.measure(self.mem) if measure_memory else contextlib.nullcontext()):
                    self.clock.sync()
                    start = time.perf_counter()
                    out = model.generate(**tensors, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                         do_sample=False, streamer=streamer, pad_token_id=pad)
            if timed:
                steps = streamer.stamps[1:]  # stamps[0]: the prompt
                self.counts.append(int(out.shape[1] - tensors["input_ids"].shape[1]))
                self.ttft.append(steps[0] - start)
                batch = tensors["input_ids"].shape[0]
                self.decode.append(batch * (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else None)
        finally:
            if handle is not None:
                handle.remove()

    def result(self) -> "MethodResult":
        if self.stats is not None:
            visual = [s.visual_tokens_per_layer for s in self.stats]
            tflops, tflops_unpruned = [s.tflops for s in self.stats], [s.tflops_unpruned for s in self.stats]
        else:
            depth = self.model.config.get_text_config().num_hidden_layers
            visual = [[n] * depth for n in self.inputs.image_tokens]
            tflops = tflops_unpruned = _paper_tflops_unpruned(self.model, self.inputs.image_tokens)
        decode = [d for d in self.decode if d is not None]
        configs = [] if self.ran_config is None else (self.ran_config if isinstance(self.ran_config, list)
                                                       else [self.ran_config])
        return MethodResult(
            name=self.name,
            config=[c.to_dict() for c in configs],  # as the model ran it (positions resolved for the family)
            inputs_sha256=inputs_sha256(self.tensors),
            prefill_s=summarize(self.prefill),
            scoring_s=summarize(self.scoring) if self.config is not None else None,
            scoring_detail=self.detail,
            ttft_s=summarize(self.ttft),
            decode_tokens_per_s=summarize(decode) if decode else None,
            new_tokens=self.counts,
            peak_memory_bytes=self.mem.get("peak_bytes", 0),
            peak_memory_growth_bytes=self.mem.get("peak_growth_bytes", 0),
            kv_cache_bytes=self.kv[0],
            kv_tokens_per_layer=self.kv[1],
            visual_tokens_per_layer=visual,
            tflops=statistics.fmean(tflops),
            tflops_unpruned=statistics.fmean(tflops_unpruned),
            rounds={"prefill_s": list(self.prefill), "ttft_s": list(self.ttft), "decode_tokens_per_s": list(self.decode)},
        )


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU's fused attention (which FlopCounterMode leaves out): q k^T and the weights times v."""
    b, h, length, dim = query_shape
    return 2 * b * h * length * key_shape[-2] * dim + 2 * b * h * length * key_shape[-2] * value_shape[-1]


def prefill_flops(model, tensors: dict, config) -> int:
    """FLOPs of one prefill of ``model`` on ``tensors`` with ``config`` attached (None: unpruned)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..adapters import adapter_for
    from ..runtime import apply

    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_flops
    handle = apply(model, config) if config is not None else None
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(**tensors, **cache_kwargs(adapter_for(model).new_cache()), use_cache=True, logits_to_keep=1)
    finally:
        if handle is not None:
            handle.remove()
    return counter.get_total_flops()


def measure_methods(model, inputs: BenchInputs, methods: list[tuple[str, object]], *, repeats: int = 5,
                    warmup: int = 2, new_tokens: int = 64, progress: bool = False) -> list["MethodResult"]:
    """Measure every ``(name, config)`` (config None: no pruning attached) on ``inputs`` in interleaved
    rounds: each of ``warmup`` untimed rounds and ``repeats`` timed rounds runs every method once, in an
    order that rotates by one method per round, so a method is never timed only while the machine is
    busier (or quieter) than for the others. Peak memory is read in the first timed round."""
    from tqdm import tqdm

    runs = [_MethodRun(model, inputs, name, config, new_tokens) for name, config in methods]
    bar = tqdm(total=(warmup + repeats) * len(runs), desc="bench", unit="run", disable=not progress, leave=False)
    try:
        for round_index in range(warmup + repeats):
            shift = round_index % len(runs)
            for run in runs[shift:] + runs[:shift]:
                bar.set_postfix_str(f"round {round_index + 1}/{warmup + repeats}: {run.name}")
                run.once(timed=round_index >= warmup, measure_memory=round_index == warmup)
                bar.update()
    finally:
        bar.close()
    results = [run.result() for run in runs]
    for run, result in zip(runs, results):  # counted once, untimed: the work each method's prefill does
        result.prefill_flops = prefill_flops(model, run.tensors, run.config)
    return results


def measure_method(model, inputs: BenchInputs, name: str, config, *, repeats: int = 5, warmup: int = 2,
                   new_tokens: int = 64) -> "MethodResult":
    """Measure one method (``config`` None: no pruning attached) on ``inputs``; see the module docstring."""
    return measure_methods(model, inputs, [(name, config)], repeats=repeats, warmup=warmup, new_tokens=new_tokens)[0]


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
            flops=_ratio(r.prefill_flops, base.prefill_flops),
        )
        # how close the speed-up comes to the work saved: 1.0 = time falls as the FLOPs do (<= 1.1 is the goal)
        r.ratios["prefill_per_flops"] = _ratio(r.ratios["prefill"], r.ratios["flops"])
        r.round_ratios = {
            key: summarize([_ratio(a, b) for a, b in zip(r.rounds.get(key, []), base.rounds.get(key, []))
                            if _ratio(a, b) is not None])
            for key in ("prefill_s", "ttft_s", "decode_tokens_per_s")
        }



def _cpu_model() -> str | None:
    """The CPU's model name as Linux reports it (``/proc/cpuinfo``), or None elsewhere: the machine a figure ran on."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    except OSError:
        return None


def environment(device: torch.device) -> dict:
    import platform

    import transformers

    env = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "cpu": _cpu_model() or platform.processor() or platform.machine(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _folder(arch: str) -> str:
    """A checkpoint folder, given as itself or as its config.json."""
    path = Path(arch)
    return str(path.parent) if path.name == "config.json" and path.is_file() else arch


def run_bench(arch: str, methods: list[tuple[str, object]], *, batch: int = 1, dtype: str = "fp32",
              device: str | None = None, attn_implementation: str = "sdpa", random_weights: bool = False,
              repeats: int = 5, warmup: int = 2, new_tokens: int = 64, text_tokens: int = 64,
              image_size=None, seed: int = 0, progress: bool = False, budget: float | None = None) -> dict:
    """Build (or load) the model and inputs once, measure every method, return the JSON-able report. With
    ``budget``, every method is first scaled to that share of the unpruned paper-convention TFLOPs for the
    inputs' visual-token count (`transprune.budget`).

    ``arch``: a name in `CONFIGS`, or a checkpoint folder (or its config.json): its weights, or with
    ``random_weights`` a random-weight model of its config."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    named = arch in CONFIGS
    if named and arch not in REDUCED and not random_weights:
        raise ValueError(f"--arch {arch} needs --random-weights (bench never downloads weights); for real "
                         f"weights pass a local checkpoint folder as --arch")
    random_weights = random_weights or named
    folder = None if named else _folder(arch)
    t0 = time.perf_counter()
    if random_weights:
        hf_config = arch_config(arch) if named else load_config(folder, option="--arch")
        model = build_random_model(hf_config, torch_dtype(dtype), device, attn_implementation, seed)
        build_s = time.perf_counter() - t0
        inputs = synthetic_inputs(model, batch, text_tokens, image_size, seed)
        weights = f"random (seeded N(0, 1/fan_in) init, seed {seed}; no checkpoint)"
    else:
        model, processor = load_checkpoint(folder, dtype)
        model = model.to(device)
        if attn_implementation != model.config._attn_implementation:
            model.set_attn_implementation(attn_implementation)
        build_s = time.perf_counter() - t0
        inputs = checkpoint_inputs(processor, model, batch, text_tokens, image_size, seed)
        weights = f"checkpoint {arch}"
    if budget is not None:
        from ..budget import budget as scale

        methods = [(name, None if config is None else scale(config, model, budget, image_tokens=inputs.image_tokens[0]))
                   for name, config in methods]
    results = measure_methods(model, inputs, methods, repeats=repeats, warmup=warmup, new_tokens=new_tokens,
                              progress=progress)
    add_ratios(results)
    text = model.config.get_text_config()
    return {
        "arch": arch,
        "budget": budget,
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
        "order": "interleaved: every round runs each method once, the order rotating by one method per round",
        "decoder": {"layers": text.num_hidden_layers, "hidden_size": text.hidden_size,
                    "intermediate_size": text.intermediate_size, "heads": text.num_attention_heads,
                    "kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                    "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads},
        "memory_measure": _PeakMemory(device).kind,
        "timer": "cuda events (prefill), perf_counter after cuda sync (generate)" if device.type == "cuda"
        else "time.perf_counter",
        "environment": environment(device),
        "methods": [r.to_dict() for r in results],
    }
