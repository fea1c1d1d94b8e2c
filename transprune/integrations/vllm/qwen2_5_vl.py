"""Qwen2.5-VL in vLLM with transprune's pre-LLM pruning of its images (imported by vLLM where it builds the model).

Videos go through unpruned, with the position columns vLLM's multimodal-pruning path strips from every item."""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import ARCHS
from .common import pop_fields, selections  # noqa: F401  (selections: for apply_model)
from .qwen import PrunedQwenModel, PrunedQwenProcessor


class PrunedQwen2_5_VLProcessor(PrunedQwenProcessor, Qwen2_5_VLMultiModalProcessor):
    architecture = ARCHS["Qwen2_5_VLForConditionalGeneration"].name


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class PrunedQwen2_5_VL(PrunedQwenModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL whose images lose the tokens transprune's pre-LLM method drops, before the LLM."""

    windows = True  # the tower's rows are in window order

    def get_mrope_input_positions(self, input_tokens, mm_features):
        lengths = {f.mm_position.offset: f.mm_position.length for f in mm_features}
        items = [(offset, lengths[offset], t, h, w, t_factor)
                 for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features)]
        return self.layout_positions(input_tokens, items)

    def embed_multimodal(self, **kwargs):
        ours = pop_fields(kwargs)
        out = ()
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                out += self.embed_images(inputs, ours)
            else:
                seconds = inputs.get("second_per_grid_ts")
                tps = self.config.vision_config.tokens_per_second
                out += tuple(self.with_positions(e, grid, tokens_per_second=tps,
                                                 video_second_per_grid=float(seconds[i]) if seconds is not None else 1.0)
                             for i, (e, grid) in enumerate(zip(self._process_video_input(inputs),
                                                               inputs["video_grid_thw"].tolist())))
        return out
