"""What every served family shares: the processor and model halves mixed into vLLM's own classes (imported by vLLM
where it builds a model; the family files `qwen2_5_vl`, `qwen3_vl` and `llava` say what differs).

The processor (prompt processing, in the serving process) reads the setting (the server's, or the request's from
``mm_processor_kwargs``), gives each image as many placeholders as the setting keeps of it (`ServedMethod.kept_of`
of the image's units: a function of its size and the setting, never of scores), ships the setting and the
instruction with the image (tensor fields, so they reach the model and the processor cache), and puts the setting
(and, for a method that reads it, the instruction) into the image's hash, which keys vLLM's processor, encoder and
prefix caches. The model runs vLLM's own encoder, then the library's selection per image on its output.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from contextvars import ContextVar

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement

from . import ServedMethod, from_key, server_setting, settings

# The setting (and instruction ids) of the prompt the processor is working on, for its helpers below `apply`.
_REQUEST: ContextVar["tuple[ServedMethod, list[int]] | None"] = ContextVar("transprune_vllm_request", default=None)

FIELDS = ("transprune_setting", "transprune_instruction")


def _bytes(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def rows(value) -> list[torch.Tensor]:
    """A batched field's per-item tensors (vLLM stacks equal shapes, else gives a list)."""
    return list(value) if value is not None else []


def served_of(value: torch.Tensor) -> ServedMethod:
    """The setting an image was shipped with (its ``transprune_setting`` field)."""
    return from_key(bytes(value.tolist()).decode())


class PrunedProcessor:
    """The processor half, mixed in before a vLLM processor class whose image replacement is a run of image tokens."""

    tower_refusal: str | None = None  # why this family's served path has no VisionZip (None: it has)
    architecture: str  # the architecture this processor serves (what `ARCHS` registers)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._server_setting = server_setting(self.info.get_hf_config(), self.architecture)
        self.served = self.checked(settings(self._server_setting))  # a wrong server setting fails here, at start-up

    def checked(self, served: ServedMethod) -> ServedMethod:
        if served.scores_tower and self.tower_refusal:
            raise ValueError(self.tower_refusal)
        return served

    def check_items(self, inputs, served: ServedMethod) -> None:
        """Raise, in the serving process, for an item the setting cannot serve: VisionZip reads the vision tower,
        which precomputed image embeddings skip (a family adds its own refusals)."""
        from vllm.multimodal.parse import EmbeddingItems

        images = inputs.mm_data_items.get("image") if "image" in inputs.mm_data_items else None
        if served.scores_tower and isinstance(images, EmbeddingItems):
            raise ValueError("transprune: VisionZip scores the vision tower's attention, and precomputed image "
                             "embeddings have none; send pixels, or use divprune / cdpruner")

    def image_token_id(self) -> int:
        return self.info.get_hf_config().image_token_id

    def units_of(self, item, placeholders: int) -> list[int]:
        """The units (tiles, frames) an image's ``placeholders`` tokens split into for the method (one by default)."""
        return [placeholders]

    def apply(self, inputs, timing_ctx=None, **kwargs):
        kw = dict(inputs.hf_processor_mm_kwargs)
        request = kw.pop("transprune", None)  # the HF processor never sees it
        served = self.served if request is None else self.checked(settings(request, base=self._server_setting))
        self.check_items(inputs, served)
        image_id = self.image_token_id()
        prompt = list(inputs.prompt) if not isinstance(inputs.prompt, str) else []
        last = max((i for i, t in enumerate(prompt) if t == image_id), default=len(prompt) - 1)
        instruction = prompt[last + 1:] if served.reads_instruction else []  # the text after the last image
        token = _REQUEST.set((served, instruction))
        try:
            return super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kw), timing_ctx, **kwargs)
        finally:
            _REQUEST.reset(token)

    def _request(self) -> tuple[ServedMethod, list[int]]:
        return _REQUEST.get() or (self.served, [])

    def _get_mm_hashes(self, inputs):
        served, instruction = self._request()  # the setting is part of every image's identity
        kw = {**inputs.hf_processor_mm_kwargs, "transprune": served.key}
        if served.reads_instruction:
            kw["transprune_instruction"] = instruction
        return super()._get_mm_hashes(dataclasses.replace(inputs, hf_processor_mm_kwargs=kw))

    @staticmethod
    def images_in(out) -> int:
        for name in ("image_grid_thw", "image_sizes", "pixel_values", "image_embeds"):
            if name in out:
                return len(out[name])
        return 0

    def _finalize_hf_mm_data(self, *args, **kwargs):
        out = super()._finalize_hf_mm_data(*args, **kwargs)  # the HF processor's outputs, every family's path
        n = self.images_in(out)
        if n:
            served, instruction = self._request()
            out["transprune_setting"] = torch.stack([_bytes(served.key)] * n)
            out["transprune_instruction"] = torch.tensor([instruction] * n, dtype=torch.int64).view(n, len(instruction))
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        ours = {name: MultiModalFieldConfig.batched("image", keep_on_cpu=True) for name in FIELDS}
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs), **ours}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        image_id = self.image_token_id()

        def kept_of(update):
            def kept(item: int) -> list[int]:  # the image's size and its setting alone: known before the encoder
                full = update.replacement(item) if callable(update.replacement) else update.replacement
                if not isinstance(full, list) or set(full) != {image_id}:
                    raise RuntimeError("transprune: this model's image placeholder is not a run of image tokens")
                data = out_mm_kwargs["image"][item]
                served = served_of(data["transprune_setting"].data)
                return [image_id] * served.kept_of(self.units_of(data, len(full)))

            return PromptReplacement("image", update.target, kept)

        return [kept_of(u) if u.modality == "image" else u for u in updates]


class PrunedModel:
    """The model half, mixed in before a vLLM model class: the library's selection on the encoder's output."""

    transprune_served = True  # read by `runner.enable_pruning_path_on_cpu`

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.selections = deque(maxlen=256)  # the last images' choices, for inspection (`selections`)

    def text_width(self) -> int:
        """The width of the LLM's input embeddings among an image feature row's columns."""
        return self.config.text_config.hidden_size

    def choose_from_embeddings(self, served: ServedMethod, embeds: torch.Tensor, instruction) -> torch.Tensor:
        """The kept rows (in order) of one image's LLM input embeddings, by an embedding method's own `order`
        given the instruction's embeddings (the text after the prompt's last image)."""
        ids = (instruction if instruction is not None else torch.zeros(0, dtype=torch.int64)).to(embeds.device)
        image = embeds[:, :self.text_width()]
        text = self.get_language_model().embed_input_ids(ids) if ids.numel() else image[:0]
        config = served.config
        return config.order(image.float(), text.float(), config.count(embeds.shape[0])).sort().values

    def record(self, size, served: ServedMethod, tokens: int, kept, expected: int) -> None:
        if kept is not None and kept.numel() != expected:
            raise RuntimeError(f"transprune: {served.name} kept {kept.numel()} tokens of an image where its prompt "
                               f"holds {expected} placeholders")
        self.selections.append({"grid": size, "setting": served.key, "tokens": tokens,
                                "kept": None if kept is None else kept.tolist()})


def pop_fields(kwargs) -> dict:
    """Our per-image fields, taken out of the model's multimodal inputs (its parser knows only its own)."""
    return {name: kwargs.pop(name, None) for name in FIELDS}


def selections(model) -> list[dict]:
    """The last images' choices on a served model (for ``LLM.apply_model(selections)``): size (Qwen: the patch
    grid; LLaVA: the image's token count), setting, the tokens of the full image and the kept indices (None: all)."""
    return list(getattr(model, "selections", []))
