"""vLLM serving speed with transprune's pre-LLM pruning, as ratios to the unpruned model in the same engine:

    python -m transprune.integrations.vllm.bench DIR [--methods none,visionzip,divprune,cdpruner] [--json]

One engine serves ``DIR`` under the plugin's architecture; every method is a per-request setting (``none``: no
pruning), so all run on the same engine, interleaved round by round (the order rotates). Per method and round:
offline throughput (``--requests`` prompts, each with its own image, in one `LLM.generate`: requests/s, prompt
tokens/s as served) and time to first token (``--ttft`` single requests of one output token, the median). Every
image is new (its own seed), so no cache answers. Beside the times: the prompt-token ratio and the FLOPs ratio of
one prefill counted on the model in transformers with the same method (vision tower, projector, decoder, the
method's own work: `transprune.bench.measure.prefill_flops`), the ratio time should approach; ``--no-flops`` skips
it (it loads the model a second time).

``--narrow-from REAL`` first writes ``DIR`` as a random-weight copy of a real Qwen folder's text files
(`transprune.testing.qwen.narrowed_qwen_folder`; ``--narrow-layers`` / ``--narrow-hidden`` size its decoder). On a GPU, the same command on a real checkpoint folder with
``--dtype bfloat16`` measures full size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from . import ARCHS, check_arch, hf_overrides, settings

QUESTION = "Describe the image in detail."


def _image(seed: int, side: int):
    from ...bench.inputs import random_image

    return random_image(seed, (side, side))


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m transprune.integrations.vllm.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a Qwen2.5-VL or Qwen3-VL folder")
    parser.add_argument("--methods", default="none,visionzip,divprune,cdpruner",
                        help="comma-separated settings (the method grammar; 'none' is the reference)")
    parser.add_argument("--requests", type=int, default=8, help="prompts per throughput batch (default 8)")
    parser.add_argument("--ttft", type=int, default=3, help="single requests per round for the time to first token")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, methods interleaved (default 3)")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per throughput request")
    parser.add_argument("--image-size", type=int, default=448, help="square image side in pixels (default 448)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size (vLLM's kv_cache_memory_bytes)")
    parser.add_argument("--narrow-from", type=Path, help="first write MODEL as a narrowed random-weight copy of this real folder")
    parser.add_argument("--narrow-layers", type=int, default=4, help="with --narrow-from: decoder layers (default 4)")
    parser.add_argument("--narrow-hidden", type=int, default=128, help="with --narrow-from: decoder width (default 128)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOPs ratio (loads the model in transformers)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    for name in ("requests", "ttft", "rounds", "max_tokens", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "none" not in args.methods:
        args.methods.insert(0, "none")
    try:
        for m in args.methods:
            settings(m)
    except ValueError as err:
        parser.error(f"--methods: {err}")
    return args


def prefill_flops_ratio(folder: Path, image, prompt: str, methods: list[str]) -> dict:
    """Per method, FLOPs of one prefill on transformers (the same method through transprune) / unpruned."""
    import torch
    import transformers

    from ...bench.measure import prefill_flops

    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(folder, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    tensors = dict(processor(text=[prompt], images=[image], return_tensors="pt"))
    counts = {m: prefill_flops(model, tensors, settings(m).config) for m in methods}
    return {m: counts[m] / counts["none"] for m in methods}


def run(args) -> dict:
    import torch
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from ...bench.measure import environment

    folder = args.model
    if args.narrow_from is not None:
        from ...testing.qwen import narrowed_qwen_folder

        narrowed_qwen_folder(args.narrow_from, folder, layers=args.narrow_layers, hidden=args.narrow_hidden)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} has no config.json: give a model folder, or --narrow-from REAL to write one")
    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    if architecture not in ARCHS:
        raise SystemExit(f"{folder}: architecture {architecture}; the vLLM plugin serves {', '.join(ARCHS)}")
    try:
        for method in args.methods:
            check_arch(settings(method), ARCHS[architecture].name)
    except ValueError as err:
        raise SystemExit(f"--methods: {err}") from None
    llm = LLM(model=str(folder), hf_overrides=hf_overrides("none", architecture=architecture), dtype=args.dtype,
              max_model_len=args.max_model_len, kv_cache_memory_bytes=int(args.kv_cache_gib * 2 ** 30),
              enforce_eager=True, limit_mm_per_prompt={"image": 1, "video": 0}, seed=0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    from transformers import AutoProcessor

    prompt = AutoProcessor.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True)

    def requests(method: str, seeds) -> list[dict]:
        return [{"prompt": prompt, "multi_modal_data": {"image": _image(seed, args.image_size)},
                 "mm_processor_kwargs": {"transprune": method}} for seed in seeds]

    per_method = {m: {"throughput_s": [], "prompt_tokens": [], "ttft_s": []} for m in args.methods}
    seed = 1000
    llm.generate(requests("none", [0]), SamplingParams(max_tokens=1), use_tqdm=False)  # warm-up
    for r in tqdm(range(args.rounds), desc="rounds", disable=args.json, file=sys.stderr):
        order = args.methods[r % len(args.methods):] + args.methods[:r % len(args.methods)]
        for method in order:
            batch = requests(method, range(seed, seed + args.requests))
            seed += args.requests
            began = time.perf_counter()
            outs = llm.generate(batch, SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                                      ignore_eos=True), use_tqdm=False)
            per_method[method]["throughput_s"].append(time.perf_counter() - began)
            per_method[method]["prompt_tokens"].append(sum(len(o.prompt_token_ids) for o in outs))
            for single in requests(method, range(seed, seed + args.ttft)):
                began = time.perf_counter()
                llm.generate([single], SamplingParams(max_tokens=1), use_tqdm=False)
                per_method[method]["ttft_s"].append(time.perf_counter() - began)
            seed += args.ttft
    flops = None if args.no_flops else prefill_flops_ratio(folder, _image(0, args.image_size), prompt, args.methods)
    report = {"model": str(folder), "architecture": architecture, "image_size": args.image_size,
              "requests": args.requests, "max_tokens": args.max_tokens, "rounds": args.rounds, "dtype": args.dtype,
              "environment": {**environment(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                              "vllm": __import__("vllm").__version__}, "methods": []}
    base = per_method["none"]
    for method, m in per_method.items():
        throughput = statistics.median(args.requests / t for t in m["throughput_s"])
        tokens = statistics.median(n / t for n, t in zip(m["prompt_tokens"], m["throughput_s"]))
        ttft = statistics.median(m["ttft_s"])
        report["methods"].append({
            "name": method, "setting": json.loads(settings(method).key) if method != "none" else "none",
            "requests_per_s": throughput, "prompt_tokens_per_s": tokens, "ttft_s": ttft,
            "prompt_tokens_per_request": m["prompt_tokens"][0] / args.requests,
            "ratios": {"requests_per_s": throughput / statistics.median(args.requests / t for t in base["throughput_s"]),
                       "ttft": ttft / statistics.median(base["ttft_s"]),
                       "prompt_tokens": m["prompt_tokens"][0] / base["prompt_tokens"][0],
                       "prefill_flops": None if flops is None else flops[method]}})
    llm.llm_engine.engine_core.shutdown()
    return report


def table(report: dict) -> str:
    rows = [["method", "prompt tokens", "requests/s (x)", "prompt tok/s", "TTFT ms (x)", "prefill FLOPs x"]]
    for m in report["methods"]:
        q = m["ratios"]
        rows.append([m["name"], f"{m['prompt_tokens_per_request']:.0f} ({q['prompt_tokens']:.2f})",
                     f"{m['requests_per_s']:.2f} ({q['requests_per_s']:.2f})", f"{m['prompt_tokens_per_s']:.0f}",
                     f"{1e3 * m['ttft_s']:.0f} ({q['ttft']:.2f})",
                     "-" if q["prefill_flops"] is None else f"{q['prefill_flops']:.3f}"])
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def main(argv=None) -> int:
    import os

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout holds the report alone
    args = _parse(argv)
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
