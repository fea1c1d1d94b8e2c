"""`PruneHandle`: pruning attached to one model instance, and what its two instance-level forwards do.

`apply` replaces the `forward` of two *instances* (never classes): the multimodal model, to learn where
each sample's image tokens are, and the text decoder, to run its layers with pruning; a pre-LLM method
wraps the instance's image encoder too. `remove()` restores all of them. Per-call state lives in a
ContextVar (the call in flight), on the encoded images (a pre-LLM selection) and in a map keyed by the
call's KV cache (decode state), never on modules, so concurrent calls and several generations sharing a
model stay independent.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..compat import cache_kwargs, decoder_output
from ..methods import Plan
from ..patching import patch, unpatch
from ..schedule import Schedule
from .decode import Generation, continue_generation
from .prefill import DecoderCall, prefill
from .stats import NO_PROFILE, Profiler, SampleStats, sample_stats

# model -> weak reference to its active handle. Both weak: the handle holds the model, so a strong value
# would keep every pruned model alive; the model's patched forwards keep its handle alive instead.
APPLIED: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
# The key under which encoded images (a ModelOutput) carry their `PreLLMChoice`: an item, not an attribute, so it
# survives accelerate's device hooks, which rebuild the output from its items (send_to_device).
_PRE_LLM = "transprune_pre_llm"


@dataclass
class PreLLMChoice:
    """A pre-LLM method's choice over all image tokens of the call (in input order), and its timing. Where the
    method wrote other tokens into the rows (LLaVA's VisionZip, in the official order): ``shift``, how far from
    its own row (among its sample's image tokens) the token each row holds is, and ``sourceless``, the rows whose
    token the unpruned model has none of (a CLS token); None: every row holds its own."""

    keep: torch.Tensor
    profiler: object = None
    shift: torch.Tensor | None = None
    sourceless: torch.Tensor | None = None

    @classmethod
    def of(cls, keep, source, profiler):
        """From ``source``: the row (numbered as ``keep``) each row now holds, -1 for none; None: its own."""
        if source is None:
            return cls(keep, profiler)
        rows = torch.arange(source.numel(), device=source.device)
        return cls(keep, profiler, torch.where(source >= 0, source - rows, 0), source < 0)


@dataclass
class _Call:
    handle: "PruneHandle"
    image_mask: torch.Tensor | None
    # With a pre-LLM method: each modality's (B, L) token mask and the method's choice over those tokens.
    modality_masks: dict | None = None
    pre: dict = field(default_factory=dict)
    # The call's 2-D padding mask, for a decoder the model hands prebuilt per-layer masks (a dict: Gemma 3).
    attention_mask: torch.Tensor | None = None
    # (B, L) the family's `attention_blocks` of the call (tokens that attend to each other both ways), or None.
    blocks: torch.Tensor | None = None


_CURRENT_CALL: ContextVar[_Call | None] = ContextVar("transprune_call", default=None)
# Inside a pruned model's generate(): (its handle, how many rows each input sample becomes: beams,
# num_return_sequences). Tied to the handle, so another pruned model called meanwhile keeps its own rows.
_ROWS_PER_SAMPLE: ContextVar[tuple | None] = ContextVar("transprune_rows_per_sample", default=None)


def _generate_rows(model, args, kwargs) -> int:
    """Refuse what pruning cannot run, and return the rows per input sample of a ``generate(*args, **kwargs)``
    call (generate repeats each sample max(num_beams, num_return_sequences) times before the prefill). A
    setting is read as generate resolves it: the keyword argument, else the caller's generation config
    (keyword or second positional argument) where it sets it, else the model's."""
    given = kwargs.get("generation_config", args[1] if len(args) > 1 else None)

    def setting(name):
        if name in kwargs:
            return kwargs[name]
        value = getattr(given, name, None) if given is not None else None
        return value if value is not None else getattr(model.generation_config, name, None)

    assisted = [name for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
                if setting(name) is not None]
    if assisted:
        raise ValueError(f"assisted generation ({', '.join(assisted)}) is not supported while transprune prunes: it "
                         "rolls the KV cache back (cache.crop), and each pruned layer caches only the tokens it kept; "
                         "generate without it, or remove() the pruning first")
    if setting("use_cache") is False:
        warnings.warn("generate(use_cache=False) while transprune prunes: without a cache every step is a new prefill "
                      "over the prompt and the tokens generated so far, so each step prunes again (those tokens then "
                      "count as text after the image) and the answer can differ from the cached run's, which prunes "
                      "once; generate with the cache (the default) for that", stacklevel=4)
    return max(setting("num_beams") or 1, setting("num_return_sequences") or 1)


# A pre-LLM shift that marks a row holding no token of the unpruned model (its rank becomes -1).
_SOURCELESS = torch.iinfo(torch.long).min


def _rows_of(keep: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """A pre-LLM choice over the image tokens of the encoded samples, for the rows of this call: generate()
    encodes images once and then repeats each sample's row (beams, num_return_sequences) next to itself."""
    total = int(image_mask.sum())
    if keep.numel() == total:
        return keep
    copies = total // keep.numel()
    per_row = image_mask.sum(1)
    if copies * keep.numel() != total or image_mask.shape[0] % copies:
        raise RuntimeError(f"the pre-LLM choice covers {keep.numel()} image tokens but this call has {total}")
    chunks = keep.split(per_row[::copies].tolist())
    return torch.cat([chunk.repeat(copies) for chunk in chunks])


class PruneHandle:
    """Pruning attached to one model. `remove()` (or leaving `pruned(...)`) restores the model."""

    def __init__(self, model, plan: Plan, adapter, schedule: Schedule, record_scores: bool = False,
                 profile: bool = False):
        self.model = model
        self.record_scores = record_scores
        # With profile=True each pruned prefill times its scoring steps into `last_profile` (see Profiler).
        self.profile = profile
        self.plan = Plan.of(plan)
        self.config = self.plan.config  # as given, positions resolved for the family
        self.pre, self.llm = self.plan.pre, self.plan.llm
        self.adapter = adapter
        self.schedule = schedule
        # False: score every sample on its own even when a batch's rows line up (the batched path's reference).
        self.batched_selection = True
        self._generations: "weakref.WeakKeyDictionary[object, Generation]" = weakref.WeakKeyDictionary()
        # last_stats / last_profile are per thread of execution: concurrent calls each read their own.
        self._local = threading.local()
        self._saved: list[tuple[torch.nn.Module, str, object]] = []
        self._hooks: list = []
        self._active = False
        self._said_nothing_pruned = False

    # -- attach / detach -------------------------------------------------------------------------
    def _install(self):
        mm, dec = self.adapter.multimodal_model, self.adapter.decoder
        mm_forward, dec_forward = mm.forward, dec.forward  # bound: the class's or an existing instance override

        def multimodal_forward(*args, **kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            call = _Call(self, self.adapter.image_token_mask(input_ids, kwargs.get("inputs_embeds")))
            mask = kwargs.get("attention_mask")  # HF passes it by name
            call.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            call.blocks = self.adapter.attention_blocks(kwargs)
            if self.pre is not None:
                call.modality_masks = self.adapter.visual_token_masks(input_ids, kwargs.get("inputs_embeds"))
                # generate() encodes images and videos before the forward and passes them in
                for modality, encoded in (kwargs.get("mm_encoder_outputs") or {}).items():
                    choice = encoded.get(_PRE_LLM) if hasattr(encoded, "get") else None
                    if choice is not None:
                        call.pre[modality] = choice
            token = _CURRENT_CALL.set(call)
            try:
                return mm_forward(*args, **kwargs)
            finally:
                _CURRENT_CALL.reset(token)

        def decoder_forward(*args, **kwargs):
            return self._decoder_forward(dec_forward, *args, **kwargs)

        generate = self.model.generate

        def pruned_generate(*args, **kwargs):
            token = _ROWS_PER_SAMPLE.set((self, _generate_rows(self.model, args, kwargs)))
            try:
                return generate(*args, **kwargs)
            finally:
                _ROWS_PER_SAMPLE.reset(token)

        self._saved = [patch(mm, "forward", functools.wraps(mm_forward)(multimodal_forward)),
                       patch(dec, "forward", functools.wraps(dec_forward)(decoder_forward)),
                       patch(self.model, "generate", functools.wraps(generate)(pruned_generate))]
        if self.pre is not None:
            hand_over = functools.partial(self._hand_over)
            hand_over.profiler = self._encoding_profiler
            saved, hooks = self.pre.install(self.adapter, hand_over)
            self._saved += saved
            self._hooks += hooks
        self._active = True
        APPLIED[self.model] = weakref.ref(self)

    def _hand_over(self, modality, encoded, choose, profiler=None) -> None:
        """Run a pre-LLM method's ``choose()`` -> (keep, source: None or the row each row now holds, -1 for none)
        over one modality's encoded tokens (timed when profiling, on the
        encoding's ``profiler`` if it has one: `_encoding_profiler`) and pass its choice to the prefill: on the
        encoded outputs (generate() encodes before the forward) and on the call in flight."""
        if profiler is None:
            profiler = Profiler(encoded.pooler_output[0].device) if self.profile else NO_PROFILE
        with profiler.span("pre_llm_s"):
            keep, source = choose()
            choice = PreLLMChoice.of(keep, source, profiler if profiler is not NO_PROFILE else None)
        encoded[_PRE_LLM] = choice
        call = _CURRENT_CALL.get()
        if call is not None and call.handle is self:
            call.pre[modality] = choice

    def _encoding_profiler(self, device):
        """A profiler for one encoding by a pre-LLM method (its capture and selection), or the no-op one."""
        return Profiler(device) if self.profile else NO_PROFILE

    def remove(self) -> None:
        """Restore the model exactly as it was before `apply`."""
        if not self._active:
            return
        for module, name, previous in self._saved:
            unpatch(module, name, previous)
        for hook in self._hooks:
            hook.remove()
        self._saved, self._hooks = [], []
        self._active = False
        APPLIED.pop(self.model, None)

    @property
    def last_stats(self) -> list[SampleStats] | None:
        """One `SampleStats` per input sample of this thread's last prefill (a call that starts a new cache),
        set by every such call, with images or without (then each sample reports 0 image tokens). Inside
        `generate()` the copies of a sample (beams, `num_return_sequences`) share its one entry."""
        return getattr(self._local, "stats", None)

    @property
    def last_profile(self) -> dict | None:
        """This thread's last pruned prefill's scoring times, with profiling on (see `Profiler`)."""
        return getattr(self._local, "profile", None)

    @property
    def position_rule(self) -> str:
        """The rule kept tokens' positions follow on this model: the in-LLM method's (resolved for the family at
        `apply`), else a pre-LLM drop's (closed up where the family's positions can be, as the official
        VisionZip; kept as they are under mRoPE)."""
        if self.llm is not None:
            return self.llm.positions
        return "compact" if "compact" in self.adapter.position_rules else "original"

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
        call = call if call is not None and call.handle is self else None
        image_mask = call.image_mask if call is not None else None
        prebuilt = isinstance(attention_mask, dict)  # per-layer-type masks the model built (Gemma 3)
        padding = (call.attention_mask if call is not None else None) if prebuilt else attention_mask
        generation = self._generations.get(cache) if cache is not None else None
        fresh = cache is None or cache.get_seq_length() == 0  # pruning happens in a prefill
        # Only a prefill looks for images (a decode step's mask is never read: no host sync per step).
        has_images = fresh and image_mask is not None and bool(image_mask.any())
        enabled = self.pre is not None or (self.llm is not None and self.llm.enabled)
        if generation is None and not (enabled and has_images):
            if fresh:
                self._record_unpruned(image_mask, padding, inputs_embeds if input_ids is None else input_ids)
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, use_cache=use_cache, **cache_kwargs(cache), **kwargs)
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not available while transprune prunes this model")
        if prebuilt and call is None:
            raise ValueError(f"{type(self.adapter.decoder).__name__} was given prebuilt attention masks without the "
                             "multimodal model around it: transprune needs the 2-D padding mask; call the model itself")
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"{type(cache).__name__} is not supported while transprune prunes: each layer caches only "
                             "the tokens it kept, which needs a DynamicCache (generate's default cache; do not set "
                             "cache_implementation)")
        adapter = self.adapter
        config = adapter.decoder.config
        if inputs_embeds is None:
            inputs_embeds = adapter.embed(input_ids)
        if use_cache is None:
            use_cache = config.use_cache
        if use_cache and cache is None:
            cache = adapter.new_cache()
        batch, length = inputs_embeds.shape[:2]
        if generation is not None:
            position_ids = adapter.continuation_positions(position_ids, generation.next_position, length)
            generation.next_position = adapter.next_position(position_ids)
        else:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = adapter.prefill_positions(position_ids, batch, length, past, inputs_embeds.device)
        if padding is None:
            new_valid = torch.ones(batch, length, dtype=torch.bool, device=inputs_embeds.device)
        else:
            new_valid = padding[:, -length:].to(device=inputs_embeds.device, dtype=torch.bool)
        blocks = call.blocks[:, -length:].to(inputs_embeds.device) if call is not None and call.blocks is not None else None
        want_hidden = kwargs.get("output_hidden_states", config.output_hidden_states)
        hidden = [] if want_hidden else None
        inputs = DecoderCall(inputs_embeds, new_valid, position_ids, cache if use_cache else None, hidden, blocks=blocks)
        if generation is None:
            inputs.image_mask, inputs.extras = image_mask, adapter.layer_extras(kwargs)
            h = self._prefill(call, inputs)
        else:
            h = continue_generation(adapter, generation, inputs)
        return decoder_output(h, cache if use_cache else None, tuple(hidden) if want_hidden else None)

    def _prefill(self, call, inputs: DecoderCall):
        embeds, valid, image_mask = inputs.embeds, inputs.valid, inputs.image_mask
        pre_keep = pre_shift = None
        on_embeddings = self.pre is not None and self.pre.from_embeddings
        if self.pre is not None and not on_embeddings:
            pre_keep = torch.zeros_like(image_mask)
            for modality, mask in call.modality_masks.items():
                if not bool(mask.any()):
                    continue
                if modality not in call.pre:
                    raise RuntimeError(f"{type(self.pre).__name__} found no selection for this call's {modality} tokens: "
                                       "they were encoded without transprune (pass pixel values, not precomputed "
                                       "features)")
                choice = call.pre[modality]
                pre_keep[mask] = _rows_of(choice.keep.to(mask.device), mask)
                if choice.shift is not None:  # the rows hold other tokens: rank each as the token it holds
                    if pre_shift is None:
                        pre_shift = torch.zeros(image_mask.shape, dtype=torch.long, device=image_mask.device)
                    sourceless = _rows_of(choice.sourceless.to(mask.device), mask)
                    pre_shift[mask] = torch.where(sourceless, _SOURCELESS, _rows_of(choice.shift.to(mask.device), mask))
        profiler = NO_PROFILE
        if self.profile:
            timed = [c.profiler for c in call.pre.values() if c.profiler] if pre_keep is not None else []
            profiler = Profiler(embeds.device)  # a fresh one: encoded outputs reused by a later call add nothing twice
            profiler.spans = [span for other in timed for span in other.spans]  # images and videos: one profile
        if on_embeddings:  # a pre-LLM method that chooses from the LLM's input embeddings (DivPrune, CDPruner)
            with profiler.span("pre_llm_s"):
                pre_keep = self.pre.keep_from_embeddings(embeds, valid, image_mask.to(embeds.device) & valid)
        inputs.pre_keep, inputs.pre_shift = pre_keep, pre_shift
        h, state, n_original, n_llm = prefill(self, inputs, profiler, aligned=self.batched_selection)
        if inputs.cache is not None:
            state.generation.next_position = self.adapter.next_position(inputs.position_ids)
            self._generations[inputs.cache] = state.generation
        self._record(n_original, n_llm, state.kept_ranks, state.scores, pre_keep is not None)
        if self.profile:
            result = profiler.result(len(self.schedule.pruning_layers))
            self._local.profile = result
        return h

    # -- statistics -------------------------------------------------------------------------------
    def _record(self, n_original, n_llm, kept_ranks, scores=None, pre_llm=False, pruning=True):
        inside = _ROWS_PER_SAMPLE.get()
        copies = inside[1] if inside is not None and inside[0] is self else 1
        if copies > 1 and len(n_original) % copies == 0:  # one entry per input sample, not per beam
            n_original, n_llm, kept_ranks = n_original[::copies], n_llm[::copies], kept_ranks[::copies]
            scores = scores[::copies] if scores is not None else None
        stats = sample_stats(self.schedule, self.adapter.decoder.config, n_original, n_llm, kept_ranks, scores, pre_llm,
                             self.position_rule)
        self._local.stats = stats
        with_images = [s for s in stats if s.n_image_tokens > 1]  # one token is kept whatever the settings
        if pruning and with_images and all(s.pruned_nothing for s in with_images) and not self._said_nothing_pruned:
            self._said_nothing_pruned = True  # once per handle: a setting, not a call, is the cause
            names = " + ".join(type(c).__name__ for c in (self.pre, self.llm) if c is not None)
            warnings.warn(f"transprune: {names} pruned none of the {with_images[0].n_image_tokens} image tokens of "
                          f"this {type(self.model).__name__} prefill (every layer kept them all): its settings keep "
                          "everything on this model; lower its keep ratios or token counts", stacklevel=2)

    def _record_unpruned(self, image_mask, attention_mask, tokens):
        if image_mask is None:  # the decoder was called on its own (no multimodal call around it): no images
            counts = [0] * tokens.shape[0]
        else:
            valid = image_mask if attention_mask is None else image_mask & attention_mask[:, -image_mask.shape[1]:].bool()
            counts = valid.sum(1).tolist()
        self._record(counts, counts, [[] for _ in counts], pruning=False)  # switched off (enabled=False), or no image
