"""The ``transprune`` lmms-eval model: any supported family (the adapter registry decides), any method.

    python -m lmms_eval --model transprune --model_args pretrained=DIR,method=transprune-high \
        --tasks ... --batch_size 8

``--model_args`` takes ``pretrained`` (a local checkpoint folder), ``method`` and ``preset`` in the grammar of
``transprune run --method/--preset`` (``transprune-high``, ``fastv``, ``visionzip+transprune``, ``none``),
any field of the chosen methods (``r=0.75``, ``dominant=162``, ``reference_depth=32``), ``dtype``
(fp32, fp16, bf16), ``device``, ``budget`` (the method scaled to that share of the unpruned paper-convention
TFLOPs, `transprune.budget`, for the model's nominal visual-token count: requests' images vary, the keep ratios
are fractions of each one's count) and ``log_path`` (a JSON-lines file: per sample, the kept visual tokens and
the paper-convention TFLOPs; last, the run's mean TFLOPs relative to unpruned). lmms-eval's
``--batch_size`` batches requests through the batched runtime (left padding). Unknown keys are an error
that names the allowed ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

from ...adapters import adapter_for
from ...compat import cache_kwargs, cache_of
from ...loading import DTYPES, image_prompt, load_checkpoint
from ...methods import METHODS, as_list, build, spelling
from ...runtime import apply

OWN_KEYS = ("pretrained", "method", "preset", "batch_size", "dtype", "device", "log_path", "budget")


@dataclass
class PrunedTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus what pruning did to the sample: lmms-eval writes ``to_dict()``
    into each sample of its ``--log_samples`` output (``token_counts``)."""

    image_tokens: int | None = None
    kept_tokens: list | None = None  # per pruning stage
    kept_after_layer: list | None = None
    tflops: float | None = None  # paper convention, this sample's prefill
    tflops_unpruned: float | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update({k: v for k, v in (("image_tokens", self.image_tokens), ("kept_tokens", self.kept_tokens),
                                      ("kept_after_layer", self.kept_after_layer), ("tflops", self.tflops),
                                      ("tflops_unpruned", self.tflops_unpruned)) if v is not None})
        return out


def _method_fields(config) -> set[str]:
    return {f.name for c in as_list(config) for f in fields(c)} - {"name"}


class TransPrune(lmms):
    is_simple = True

    def __init__(self, pretrained: str, method: str = "transprune", preset: str | None = None, batch_size=1,
                 dtype: str = "fp32", device: str | None = None, log_path: str | None = None, budget=None,
                 **method_fields):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
        params = {k: str(v) for k, v in method_fields.items()}
        if method == "none":
            if preset is not None or params:
                raise ValueError(f"method=none takes no preset or method fields, got {sorted(params) or preset!r}")
            self.config = None
        else:
            try:
                self.config = build(method, preset, params)
            except ValueError as exc:
                allowed = sorted(set(OWN_KEYS) | {f.name for c in METHODS.values() for f in fields(c)} - {"name"})
                raise ValueError(f"{exc} (transprune --model_args: {', '.join(allowed)}; method: none or "
                                 f"{spelling()})") from None
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.model, self.processor = load_checkpoint(pretrained, dtype)
        if budget is not None:
            if self.config is None:
                raise ValueError("budget needs a method to scale; method=none prunes nothing")
            from ...budget import budget as scale

            try:
                share = float(budget)
            except ValueError:
                share = budget  # check_target names the allowed range
            self.config = scale(self.config, self.model, share)
        self._init_processes(device)
        self.handle = apply(self.model, self.config) if self.config is not None else None
        self.images_per_prompt = adapter_for(self.model).images_per_prompt
        self.log_path = Path(log_path) if log_path else None
        self._tflops = [0.0, 0.0]  # this process: sum of pruned and unpruned paper TFLOPs over samples

    # -- processes (accelerate launch: one model per process, requests split by rank) --------------------
    def _init_processes(self, device):
        """Under ``accelerate launch`` each process holds its own model and answers its share of the requests
        (lmms-eval splits them by rank and gathers the results)."""
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.model.to(torch.device(device) if device else self.accelerator.device)

    @property
    def device(self):  # lmms-eval gathers results across processes on this device
        return self.model.device

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    # -- requests ---------------------------------------------------------------------------------------
    def _inputs(self, texts: list[str], visuals: list[list]) -> dict:
        self.processor.tokenizer.padding_side = "left"
        prompts = [image_prompt(self.processor, t, len(v)) if v else t for t, v in zip(texts, visuals)]
        # one list of images per prompt where the family's processor wants that (SmolVLM), else one flat list
        images = visuals if self.images_per_prompt else [image for v in visuals for image in v]
        inputs = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt")
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visual = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return [v for v in (visual if isinstance(visual, (list, tuple)) else [visual]) if v is not None]

    def _log(self, records: list[dict]) -> None:
        """Add each sample's pruning stats (the last prefill's) to its record and write the records to log_path."""
        stats = self.handle.last_stats if self.handle is not None else None
        for i, record in enumerate(records):
            record["rank"] = self.rank
            if stats is not None:
                s = stats[i]
                record.update(n_image_tokens=s.n_image_tokens, kept_tokens=[len(k) for k in s.kept_indices],
                              kept_after_layer=s.kept_after_layer, tflops=s.tflops, tflops_unpruned=s.tflops_unpruned)
                self._tflops[0] += s.tflops
                self._tflops[1] += s.tflops_unpruned
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        from tqdm import tqdm

        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):  # one generate() per batch of requests with the same settings
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="transprune", disable=self.rank != 0)
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1])
            until = settings.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(settings.get("temperature") or 0)
            generate = {"max_new_tokens": int(settings.pop("max_new_tokens", None) or 128),
                        "do_sample": bool(settings.pop("do_sample", False)) and temperature > 0}
            if generate["do_sample"]:
                generate.update(temperature=temperature, top_p=float(settings.get("top_p") or 1.0))
            generate["num_beams"] = int(settings.get("num_beams", 1) or 1)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                texts = [requests[i].args[0] for i in chunk]
                visuals = [self._visuals(*requests[i].args[2:6]) for i in chunk]
                inputs = self._inputs(texts, visuals)
                with torch.no_grad():
                    out = self.model.generate(**inputs, **generate,
                                              pad_token_id=self.processor.tokenizer.pad_token_id)
                prompt_len = inputs["input_ids"].shape[1]
                answers = self.processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
                records = []
                for i, answer in zip(chunk, answers):
                    for stop in until:
                        answer = answer.split(stop)[0] if stop else answer
                    records.append({"task": requests[i].args[4], "doc_id": requests[i].args[3], "answer": answer.strip()})
                self._log(records)
                for b, (i, record) in enumerate(zip(chunk, records)):
                    counts = PrunedTokenCounts(input_tokens=int(inputs["attention_mask"][b].sum()),
                                               output_tokens=int((out[b, prompt_len:] != self.processor.tokenizer.pad_token_id).sum()),
                                               image_tokens=record.get("n_image_tokens"),
                                               kept_tokens=record.get("kept_tokens"),
                                               kept_after_layer=record.get("kept_after_layer"),
                                               tflops=record.get("tflops"), tflops_unpruned=record.get("tflops_unpruned"))
                    results[i] = GenerationResult(record["answer"], counts)
                bar.update(len(chunk))
        bar.close()
        self._report()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log p(continuation | context, images): the prompt is pruned in its own prefill (the continuation is
        not there yet, as in generation), then the continuation runs on that pruned cache."""
        out = []
        tokenizer = self.processor.tokenizer
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            continuation = doc_to_target(self.task_dict[task][split][doc_id]) if callable(doc_to_target) else doc_to_target
            inputs = self._inputs([context], [self._visuals(doc_to_visual, doc_id, task, split)])
            target = tokenizer(str(continuation), add_special_tokens=False, return_tensors="pt")["input_ids"]
            target = target.to(self.model.device)
            with torch.no_grad():
                first = self.model(**inputs, use_cache=True)
                logits = [first.logits[:, -1:]]
                if target.shape[1] > 1:
                    mask = torch.cat([inputs["attention_mask"], torch.ones_like(target)], dim=1)
                    rest = self.model(input_ids=target[:, :-1], attention_mask=mask[:, :-1],
                                      **cache_kwargs(cache_of(first)), use_cache=True)
                    logits.append(rest.logits)
            logprobs = torch.cat(logits, dim=1).float().log_softmax(-1)[0]
            picked = logprobs.gather(1, target[0][:, None]).sum()
            out.append((float(picked), bool((logprobs.argmax(-1) == target[0]).all())))
            self._log([{"task": task, "doc_id": doc_id}])
        self._report()
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the transprune lmms-eval model answers single-round requests "
                                  "(generate_until, loglikelihood); multi-round tasks are not supported")

    def _report(self) -> None:
        """The run's mean paper-convention TFLOPs relative to unpruned (this process), logged and written last."""
        if self.handle is None or not self._tflops[1]:
            return
        from loguru import logger

        ratio = self._tflops[0] / self._tflops[1]
        logger.info(f"transprune: mean TFLOPs (paper convention) {100 * ratio:.1f}% of unpruned on rank {self.rank}")
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps({"summary": True, "rank": self.rank, "tflops_ratio": ratio,
                                    "tflops": self._tflops[0], "tflops_unpruned": self._tflops[1]}) + "\n")
