"""Attach pruning to one model instance, run the pruned decoder loop, and detach again.

`apply(model, config)` replaces the `forward` of two *instances* (never classes): the multimodal
model, to learn where each sample's image tokens are, and the text decoder, to run its layers with
pruning. `handle.remove()` restores both. Per-call state lives in a ContextVar (for the image mask of
the call in flight) and in a map keyed by the call's KV cache (for decode offsets), never on modules,
so concurrent calls and several generations sharing a model stay independent.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function
from transformers.modeling_outputs import BaseModelOutputWithPast

from . import scoring
from .adapters import adapter_for
from .config import Schedule
from .flops import paper_layer_macs
from .methods import split_methods
from .surgery import Layout, drop_tokens, gather_tokens, scatter_to_input

_APPLIED: "weakref.WeakKeyDictionary[torch.nn.Module, PruneHandle]" = weakref.WeakKeyDictionary()
# Attention backends for which "no mask" means "attend to every cached key" (a 1-token decode step with no
# padding needs nothing else): sdpa (HF returns None itself there), eager (its mask would be all zeros), flash.
_MASK_FREE_DECODE = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


@dataclass
class _Call:
    handle: "PruneHandle"
    image_mask: torch.Tensor | None
    pre_keep: torch.Tensor | None = None  # pre-LLM choice over all image tokens of the call, in input order


_CURRENT_CALL: ContextVar[_Call | None] = ContextVar("transprune_call", default=None)
# (CLS attention, keys) of the vision feature layer, captured while VisionZip encodes images.
_VISION_CAPTURE: ContextVar[list | None] = ContextVar("transprune_vision", default=None)


class _Profiler:
    """Wall time of the scoring pieces of one prefill, only while `handle.profile` is on.

    On CUDA every span is a pair of events: recording them never blocks the host, and the one
    synchronisation happens in `result()`, at the end of the prefill. On CPU spans are perf_counter
    intervals (CPU ops run synchronously). With profiling off the runtime uses `_NO_PROFILE`, whose
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


_NO_PROFILE = _NoProfile()


@dataclass
class SampleStats:
    """What one prefill did to one sample."""

    n_image_tokens: int
    kept_indices: list[list[int]]  # per pruning stage: kept image tokens, numbered 0..N-1 in input order
    kept_after_layer: list[int]  # the 1-indexed layer each stage pruned after (0: before the LLM)
    visual_tokens_per_layer: list[int]
    tflops: float  # paper convention (visual tokens only, 4nd^2 + 2n^2d + 3ndm per layer, prefill)
    tflops_unpruned: float
    pruning_layers: tuple[int, ...]  # 1-indexed layers actually used for this model's depth
    accumulation_layers: tuple[int, ...]
    # With apply(..., record_scores=True): per stage, the scored image tokens (`image_index`, numbered
    # like kept_indices) and their L1-normalised `ttv`, `iga` and combined `score`, as fp32 CPU tensors.
    scores: list[dict] | None = None

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        if self.scores is not None:
            out["scores"] = [{k: v.tolist() for k, v in stage.items()} for stage in self.scores]
        return out


@dataclass
class _Stage:
    """Decode-time state of one group of layers that hold the same tokens."""

    first_layer: int  # 0-based index of the stage's first layer
    key_valid: torch.Tensor  # (B, kv_len) bool over this stage's cached tokens
    shift: torch.Tensor  # (B,) dropped tokens whose positions were closed up before this stage
    all_valid: bool = False  # known on the host: key_valid is all True (no padding), so a 1-token step needs no mask


@dataclass
class _Generation:
    stages: list[_Stage] = field(default_factory=list)
    next_position: torch.Tensor | None = None  # (B,) position of the next token, unpruned numbering


class PruneHandle:
    """Pruning attached to one model. `remove()` (or leaving `pruned(...)`) restores the model."""

    def __init__(self, model, config, adapter, schedule: Schedule, record_scores: bool = False,
                 profile: bool = False):
        self.model = model
        self.record_scores = record_scores
        # With profile=True each pruned prefill times its scoring steps into `last_profile` (see _Profiler).
        self.profile = profile
        self.last_profile: dict | None = None
        self._pre_llm_profile: _Profiler | None = None
        self.config = config
        self.pre, self.llm = split_methods(config)
        self.adapter = adapter
        self.schedule = schedule
        self.last_stats: list[SampleStats] | None = None
        self._generations: "weakref.WeakKeyDictionary[object, _Generation]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._saved: list[tuple[torch.nn.Module, object]] = []
        self._active = False

    # -- attach / detach -------------------------------------------------------------------------
    def _install(self):
        mm, dec = self.adapter.multimodal_model, self.adapter.decoder
        mm_forward, dec_forward = mm.forward, dec.forward  # bound: the class's or an existing instance override
        self._saved = [(mm, "forward", mm.__dict__.get("forward")), (dec, "forward", dec.__dict__.get("forward"))]

        @functools.wraps(mm_forward)
        def multimodal_forward(*args, **kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            mask = self.adapter.image_token_mask(input_ids, kwargs.get("inputs_embeds"))
            call = _Call(self, mask)
            if self.pre is not None:  # generate() encodes images before the forward and passes them in
                encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
                call.pre_keep = getattr(encoded, "_transprune_keep", None)
            token = _CURRENT_CALL.set(call)
            try:
                return mm_forward(*args, **kwargs)
            finally:
                _CURRENT_CALL.reset(token)

        @functools.wraps(dec_forward)
        def decoder_forward(*args, **kwargs):
            return self._decoder_forward(dec_forward, *args, **kwargs)

        mm.forward = multimodal_forward
        dec.forward = decoder_forward
        self._hooks = []
        if self.pre is not None:
            features = mm.get_image_features
            self._saved.append((mm, "get_image_features", mm.__dict__.get("get_image_features")))

            @functools.wraps(features)
            def image_features(*args, **kwargs):
                kwargs["return_dict"] = True
                token = _VISION_CAPTURE.set([])
                try:
                    out = features(*args, **kwargs)
                    captured = _VISION_CAPTURE.get()
                finally:
                    _VISION_CAPTURE.reset(token)
                sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
                prof = _Profiler(out.pooler_output[0].device) if self.profile else _NO_PROFILE
                with prof.span("pre_llm_s"):
                    keep = self.adapter.visionzip(self.pre, out, captured[-1], sizes)
                if self.profile:
                    self._pre_llm_profile = prof
                object.__setattr__(out, "_transprune_keep", keep)  # travels with the encoded images
                call = _CURRENT_CALL.get()
                if call is not None and call.handle is self:
                    call.pre_keep = keep
                return out

            mm.get_image_features = image_features
            self._hooks.append(self.adapter.vision_attention_layer().register_forward_pre_hook(
                self._capture_vision, with_kwargs=True))
        self._active = True
        _APPLIED[self.model] = self

    def remove(self) -> None:
        """Restore the model exactly as it was before `apply`."""
        if not self._active:
            return
        for module, name, previous in self._saved:
            delattr(module, name)
            if previous is not None:
                setattr(module, name, previous)
        for hook in self._hooks:
            hook.remove()
        self._saved, self._hooks = [], []
        self._active = False
        _APPLIED.pop(self.model, None)

    def _capture_vision(self, module, args, kwargs):
        """Pre-hook on the vision feature layer's attention: the CLS row, from q and k, for VisionZip."""
        captured = _VISION_CAPTURE.get()
        if captured is not None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured.append(self.adapter.vision_cls_attention(module, hidden))

    @property
    def active(self) -> bool:
        return self._active

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # -- the decoder ------------------------------------------------------------------------------
    def _decoder_forward(self, original, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                         inputs_embeds=None, use_cache=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        call = _CURRENT_CALL.get()
        image_mask = call.image_mask if call is not None and call.handle is self else None
        generation = self._generations.get(cache) if cache is not None else None
        fresh = cache_is_fresh(cache)
        # Only a prefill looks for images (a decode step's mask is never read: no host sync per step).
        has_images = fresh and image_mask is not None and bool(image_mask.any())
        enabled = self.pre is not None or (self.llm is not None and self.llm.enabled)
        prunes = enabled and has_images
        if generation is None and not prunes:
            if has_images:
                self._record_unpruned(image_mask, attention_mask)
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not available while transprune prunes this model")
        decoder = self.adapter.decoder
        if inputs_embeds is None:
            inputs_embeds = decoder.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = decoder.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=decoder.config)
        batch, length = inputs_embeds.shape[:2]
        steps = torch.arange(length, device=inputs_embeds.device)[None]
        if position_ids is None and generation is not None:
            # Layer 0's cache may be shorter than the sequence (pre-LLM pruning): count from the state.
            position_ids = generation.next_position[:, None] + steps
        elif position_ids is None:
            position_ids = steps + (cache.get_seq_length() if cache is not None else 0)
        position_ids = position_ids.expand(batch, -1)
        if generation is not None:
            generation.next_position = position_ids[:, -1] + 1
        if attention_mask is None:
            new_valid = torch.ones(batch, length, dtype=torch.bool, device=inputs_embeds.device)
        else:
            new_valid = attention_mask[:, -length:].to(device=inputs_embeds.device, dtype=torch.bool)
        hidden = []
        want_hidden = kwargs.get("output_hidden_states", decoder.config.output_hidden_states)
        if generation is None:
            pre_keep = None
            if self.pre is not None and call.pre_keep is None:
                raise RuntimeError("VisionZip found no selection for these images: they were encoded without "
                                   "transprune (pass pixel_values, not precomputed features)")
            if call.pre_keep is not None:
                pre_keep = torch.zeros_like(image_mask)
                pre_keep[image_mask] = call.pre_keep.to(image_mask.device)
            h = self._prefill(inputs_embeds, new_valid, image_mask.to(inputs_embeds.device), position_ids,
                              cache if use_cache else None, hidden if want_hidden else None, pre_keep)
        else:
            h = self._continue(generation, inputs_embeds, new_valid, position_ids, cache,
                               hidden if want_hidden else None)
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            cache=cache if use_cache else None,
            hidden_states=tuple(hidden) if want_hidden else None,
        )

    def _stage_mask(self, embeds, key_valid, q_len):
        """The attention mask, in whatever form the model's attention backend wants, for one stage."""
        config = self.adapter.decoder.config
        kv_len = key_valid.shape[1]
        return ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
            batch_size=embeds.shape[0], q_length=q_len, kv_length=kv_len, q_offset=kv_len - q_len, kv_offset=0,
            mask_function=causal_mask_function, attention_mask=key_valid, allow_is_causal_skip=True,
            dtype=embeds.dtype, config=config, use_vmap=False, device=embeds.device,
        )

    def _prefill(self, embeds, valid, image_mask, position_ids, cache, hidden, pre_keep=None):
        cfg, sched, adapter = self.llm, self.schedule, self.adapter
        decoder = adapter.decoder
        layers = decoder.layers[: decoder.config.num_hidden_layers]
        prune_at = {p - 1: i for i, p in enumerate(sched.pruning_layers)}  # 0-based layer -> stage
        last_prune = max(prune_at) if prune_at else -1
        scorer = cfg.scorer if cfg is not None else None
        accumulate = {a - 1 for a in sched.accumulation_layers if a - 1 <= last_prune} if scorer != "iga" else set()
        layout = Layout.initial(valid, image_mask, position_ids)
        n_original = layout.image.sum(1).tolist()
        kept_ranks: list[list[torch.Tensor]] = [[] for _ in n_original]
        h = embeds
        stage_dropped = torch.zeros(embeds.shape[0], dtype=torch.long, device=embeds.device)
        prof = _NO_PROFILE
        if self.profile:
            prof = self._pre_llm_profile if pre_keep is not None and self._pre_llm_profile else _Profiler(embeds.device)
        self._pre_llm_profile = None

        all_valid = bool(valid.all())  # host-side: no padding anywhere in the current sequence

        def drop(keep, compact, kind="drop_s", stage=-1, new_length=None):
            """Apply a keep mask; returns the gather index for other per-token tensors. ``new_length``:
            every row keeps exactly that many tokens (known on the host: no sync, no padding after)."""
            nonlocal layout, h, stage_dropped, all_valid
            with prof.span(kind, stage):
                before = layout.valid.sum(1)
                layout, index = drop_tokens(layout, keep, compact_positions=compact, new_length=new_length)
                all_valid = new_length is not None or bool(layout.valid.all())
                if compact:  # decode positions close up by as many tokens
                    stage_dropped = stage_dropped + before - layout.valid.sum(1)
                h = gather_tokens(h, index)
            return index

        if pre_keep is not None:
            # Pre-LLM stage (VisionZip): the LLM never sees the other image tokens; positions close up.
            keep = layout.valid & (~layout.image | pre_keep)
            for b in range(len(n_original)):
                kept_ranks[b].append(layout.image_rank[b][layout.image[b] & keep[b]])
            drop(keep, compact=True, kind="pre_llm_drop_s")
        n_image = layout.image.sum(1).tolist()  # in-LLM ratios apply to what reaches the LLM
        keep_counts = [[int(n * r) for r in sched.keep_ratios] for n in n_image]
        ttv = torch.zeros(layout.valid.shape, dtype=torch.float32, device=embeds.device)
        scores = [[] for _ in n_original] if self.record_scores else None
        generation = _Generation()

        def open_stage(first_layer):
            generation.stages.append(_Stage(first_layer, layout.valid, stage_dropped.clone(), all_valid))
            mask = self._stage_mask(h, layout.valid, layout.length)
            return mask, decoder.rotary_emb(h, layout.positions)

        mask, rope = open_stage(0)
        for i, layer in enumerate(layers):
            capture = i in accumulate
            h_in = h
            h, moved = adapter.run_layer(layer, h, mask=mask, position_embeddings=rope, position_ids=layout.positions,
                                         cache=cache, use_cache=cache is not None, capture=capture)
            if capture:
                with prof.span("ttv_s"):
                    ttv += scoring.module_ttv(moved[0], moved[1], layout.valid, cfg.direction)
                    ttv += scoring.module_ttv(moved[2], moved[3], layout.valid, cfg.direction)
            if hidden is not None:
                hidden.append(scatter_to_input(h, layout, valid.shape[1]))
            if i in prune_at:
                stage = prune_at[i]
                with prof.span("select_s", stage):
                    keep, new_length = self._select(h, h_in, layout, ttv, rope, layer, layers[i + 1], stage,
                                                    [c[stage] for c in keep_counts], kept_ranks, scores, all_valid)
                ttv = gather_tokens(ttv, drop(keep, compact=cfg.positions == "compact", stage=stage,
                                              new_length=new_length))
                mask, rope = open_stage(i + 1)
        h = decoder.norm(h)
        if hidden is not None:
            hidden[-1] = scatter_to_input(h, layout, valid.shape[1])
            hidden.insert(0, embeds)
        if cache is not None:
            generation.next_position = position_ids[:, -1] + 1
            self._generations[cache] = generation
        self._record(n_original, n_image, kept_ranks, scores, pre_keep is not None)
        if self.profile:
            result = prof.result(len(sched.pruning_layers))
            with self._lock:
                self.last_profile = result
        return scatter_to_input(h, layout, valid.shape[1])

    def _select(self, h, h_in, layout, ttv, rope, layer, next_layer, stage, keep_counts, kept_ranks, scores=None,
                all_valid=False):
        """Score the image tokens of every sample; return the (B, L) mask of tokens to keep and, when every
        row keeps the same number of tokens with no padding, that number (else None)."""
        cfg = self.llm
        if all_valid and cfg.scorer != "uniform":
            # One batched pass when the rows line up: no padding and image tokens in the same columns (the
            # usual benchmark / serving batch of same-length prompts, and any single sample).
            if layout.image.shape[0] == 1 or bool((layout.image == layout.image[:1]).all()):
                image_cols = layout.image[0].cpu().nonzero().squeeze(1)  # on the host: one copy, no more syncs
                return self._select_aligned(h, h_in, layout, ttv, rope, layer, next_layer, stage, keep_counts[0],
                                            kept_ranks, scores, image_cols)
        keep = layout.valid & ~layout.image
        cos, sin = rope
        for b, k in enumerate(keep_counts):
            cols = layout.valid[b].nonzero().squeeze(1)
            image_at = layout.image[b, cols].nonzero().squeeze(1)  # image tokens, as indices into cols
            if image_at.numel() == 0:
                kept_ranks[b].append(image_at)
                continue
            parts = {}
            if cfg.scorer in ("transprune", "ttv", "iga"):
                ttv_img = ttv[b, cols[image_at]]
                iga_img = torch.zeros_like(ttv_img)
                if cfg.scorer != "ttv":
                    # Instruction rows: the text after the last image token (D3 in method.md).
                    after = torch.arange(cols.numel(), device=cols.device) > image_at[-1]
                    iga_img = self._attention_to(next_layer, h[b, cols], cos[b, cols], sin[b, cols],
                                                 after.nonzero().squeeze(1))[image_at]
                score = scoring.combine(ttv_img, iga_img, cfg.alpha, cfg.scorer)
                parts = {"ttv": scoring.l1_normalize(ttv_img), "iga": scoring.l1_normalize(iga_img)}
            elif cfg.scorer in ("fastv", "pdrop"):
                # FastV: this layer's own attention (its input); PDrop: the next layer's, on this output.
                source, weights = (h_in, layer) if cfg.scorer == "fastv" else (h, next_layer)
                last = torch.tensor([cols.numel() - 1], device=cols.device)
                score = self._attention_to(weights, source[b, cols], cos[b, cols], sin[b, cols], last)[image_at]
            elif cfg.scorer == "random":
                # Seeded per stage, not per batch position: a sample gets the same draw alone or batched.
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + stage)
                score = torch.rand(image_at.numel(), generator=gen).to(h.device)
            else:  # uniform
                score = scoring.even_spread_priority(self._grid_coords(layout.image_rank[b, cols[image_at]]))
            chosen = image_at[scoring.select_top(score, k)]
            keep[b, cols[chosen]] = True
            kept_ranks[b].append(layout.image_rank[b, cols[chosen]])
            if scores is not None:
                scores[b].append({"image_index": layout.image_rank[b, cols[image_at]].cpu(),
                                  **{n: v.cpu() for n, v in parts.items()}, "score": score.float().cpu()})
        return keep, None

    def _select_aligned(self, h, h_in, layout, ttv, rope, layer, next_layer, stage, k, kept_ranks, scores, image_cols):
        """`_select` for rows that line up (no padding, image tokens at the same columns ``image_cols`` in
        every row): the same per-sample arithmetic on (B, ...) tensors, with the host syncs of the loop
        (nonzero per sample) replaced by one index computed from row 0. Every row keeps k image tokens."""
        cfg = self.llm
        batch, length = layout.valid.shape
        device = layout.valid.device
        keep = layout.valid & ~layout.image
        n = image_cols.numel()
        if n == 0:
            for b in range(batch):
                kept_ranks[b].append(layout.image_rank.new_zeros(0))
            return keep, length
        last_image = int(image_cols[-1])  # a host tensor: no sync
        image_cols = image_cols.to(device)
        cos, sin = rope
        parts = {}
        if cfg.scorer in ("transprune", "ttv", "iga"):
            ttv_img = ttv[:, image_cols]
            iga_img = torch.zeros_like(ttv_img)
            if cfg.scorer != "ttv":
                # Instruction rows: the text after the last image token (D3 in method.md).
                after = torch.arange(last_image + 1, length, device=device)
                iga_img = self._attention_to(next_layer, h, cos, sin, after)[:, image_cols]
            score = scoring.combine(ttv_img, iga_img, cfg.alpha, cfg.scorer)
            parts = {"ttv": scoring.l1_normalize(ttv_img), "iga": scoring.l1_normalize(iga_img)}
        elif cfg.scorer in ("fastv", "pdrop"):
            source, weights = (h_in, layer) if cfg.scorer == "fastv" else (h, next_layer)
            last = torch.tensor([length - 1], device=device)
            score = self._attention_to(weights, source, cos, sin, last)[:, image_cols]
        else:  # random: seeded per stage, the same draw for every sample (as in the loop)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + stage)
            score = torch.rand(n, generator=gen).to(h.device).expand(batch, n)
        chosen = image_cols[scoring.select_top(score, k)]  # (B, k) columns
        keep.scatter_(1, chosen, True)
        ranks = layout.image_rank.gather(1, chosen)
        image_rank = layout.image_rank[:, image_cols]
        for b in range(batch):
            kept_ranks[b].append(ranks[b])
            if scores is not None:
                scores[b].append({"image_index": image_rank[b].cpu(), **{m: v[b].cpu() for m, v in parts.items()},
                                  "score": score[b].float().cpu()})
        return keep, length - n + k

    def _attention_to(self, layer, h, cos, sin, query_idx):
        q, k, scale = self.adapter.scoring_qk(layer, h, cos, sin, query_idx)
        return scoring.instruction_attention(q, k, query_idx, scale)

    def _grid_coords(self, ranks):
        """(row, col) of image tokens on a square patch grid; position along the sequence otherwise."""
        side = self.adapter.patch_grid_side()
        ranks = ranks.float()
        if side is None:
            return torch.stack([ranks, torch.zeros_like(ranks)], dim=1)
        return torch.stack([torch.div(ranks, side, rounding_mode="floor"), ranks % side], dim=1)

    def _continue(self, generation, embeds, new_valid, position_ids, cache, hidden):
        """Decode steps (or any continuation) after a pruned prefill: per-stage masks and positions."""
        decoder = self.adapter.decoder
        layers = decoder.layers[: decoder.config.num_hidden_layers]
        q_len = embeds.shape[1]
        starts = {s.first_layer: s for s in generation.stages}
        # One host check per step (HF's own mask does the same): are the new tokens all real? Stages whose
        # cache has no padding then need no mask for a 1-token step (all keys are visible), in any backend
        # whose mask only hides padding and future keys; their mask is None, as HF's sdpa mask would be.
        no_mask_ok = q_len == 1 and decoder.config._attn_implementation in _MASK_FREE_DECODE
        new_all = bool(new_valid.all()) if any(s.all_valid for s in generation.stages) else False
        h = embeds
        for i, layer in enumerate(layers):
            if i in starts:
                stage = starts[i]
                stage.key_valid = torch.cat([stage.key_valid, new_valid], dim=1)
                stage.all_valid = stage.all_valid and new_all
                positions = position_ids - stage.shift[:, None]
                mask = None if no_mask_ok and stage.all_valid else self._stage_mask(h, stage.key_valid, q_len)
                rope = decoder.rotary_emb(h, positions)
            h, _ = self.adapter.run_layer(layer, h, mask=mask, position_embeddings=rope, position_ids=positions,
                                          cache=cache, use_cache=True, capture=False)
            if hidden is not None:
                hidden.append(h)
        h = decoder.norm(h)
        if hidden is not None:
            hidden[-1] = h
            hidden.insert(0, embeds)
        return h

    # -- statistics -------------------------------------------------------------------------------
    def _paper_tflops(self, tokens_per_layer):
        cfg = self.adapter.decoder.config
        return sum(paper_layer_macs(n, cfg.hidden_size, cfg.intermediate_size) for n in tokens_per_layer) / 1e12

    def _record(self, n_original, n_llm, kept_ranks, scores=None, pre_llm=False):
        sched = self.schedule
        stage_layers = ([0] if pre_llm else []) + list(sched.pruning_layers)
        stats = []
        for b, (n, n_start, ranks) in enumerate(zip(n_original, n_llm, kept_ranks)):
            counts = [int(r.numel()) for r in ranks[1:]] if pre_llm else [int(r.numel()) for r in ranks]
            per_layer, current, stage = [], n_start, 0
            for layer in range(1, sched.depth + 1):
                per_layer.append(current)
                if stage < len(sched.pruning_layers) and layer == sched.pruning_layers[stage]:
                    current = counts[stage] if stage < len(counts) else current
                    stage += 1
            stats.append(SampleStats(
                n_image_tokens=n,
                kept_indices=[r.tolist() for r in ranks],
                kept_after_layer=stage_layers[: len(ranks)],
                visual_tokens_per_layer=per_layer,
                tflops=self._paper_tflops(per_layer),
                tflops_unpruned=self._paper_tflops([n] * sched.depth),
                pruning_layers=sched.pruning_layers,
                accumulation_layers=sched.accumulation_layers,
                scores=scores[b] if scores is not None else None,
            ))
        with self._lock:
            self.last_stats = stats

    def _record_unpruned(self, image_mask, attention_mask):
        valid = image_mask if attention_mask is None else image_mask & attention_mask[:, -image_mask.shape[1]:].bool()
        counts = valid.sum(1).tolist()
        self._record(counts, counts, [[] for _ in counts])


def cache_is_fresh(cache) -> bool:
    """Pruning happens in a prefill: no cache yet, or an empty one."""
    return cache is None or cache.get_seq_length() == 0


def apply(model, config, *, record_scores: bool = False, profile: bool = False) -> PruneHandle:
    """Attach pruning to this one model instance; returns the handle that undoes it.

    `config` is one method config (TransPruneConfig, FastVConfig, PDropConfig, VisionZipConfig,
    RandomConfig, UniformConfig) or a list with at most one pre-LLM and one in-LLM config, e.g.
    `[VisionZipConfig(...), TransPruneConfig(...)]`. `record_scores=True` keeps every stage's scores
    in `handle.last_stats`; `profile=True` (or setting `handle.profile` later) times the scoring of
    every pruned prefill into `handle.last_profile` (CUDA events, read once at the end of the prefill;
    off by default, so normal runs add no host syncs). Everything is validated before the model is
    touched.
    """
    pre, llm = split_methods(config)
    adapter = adapter_for(model)
    if model in _APPLIED and _APPLIED[model].active:
        raise ValueError("transprune is already applied to this model; call handle.remove() before applying again")
    if not isinstance(getattr(adapter.decoder, "layers", None), torch.nn.ModuleList):
        raise TypeError(f"{type(adapter.decoder).__name__} has no `layers` ModuleList; transprune cannot run it")
    depth = adapter.decoder.config.num_hidden_layers
    schedule = llm.layers_for_depth(depth) if llm is not None else Schedule(depth, (), (), ())
    if pre is not None:
        adapter.check_visionzip(pre)
    handle = PruneHandle(model, config, adapter, schedule, record_scores, profile)
    handle._install()
    return handle


@contextlib.contextmanager
def pruned(model, config, *, record_scores: bool = False, profile: bool = False):
    """`with pruned(model, config) as handle:` apply for the block, then restore the model."""
    handle = apply(model, config, record_scores=record_scores, profile=profile)
    try:
        yield handle
    finally:
        handle.remove()
