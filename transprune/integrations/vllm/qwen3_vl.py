"""Qwen3-VL in vLLM with transprune's pre-LLM pruning of its images (imported by vLLM where it builds the model).

Its image feature rows carry the DeepStack levels after the LLM's embedding (``[main | level 1 | ...]``), so a
row kept or merged keeps or merges its levels with it, as transprune does on transformers. Videos are refused:
vLLM lays a Qwen3-VL video out as frames with timestamp text between them, whose positions its pruning path
handles only together with its own video pruning (EVS)."""

from __future__ import annotations

from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import ARCHS
from .common import pop_fields, selections  # noqa: F401  (selections: for apply_model)
from .qwen import PrunedQwenModel, PrunedQwenProcessor

VIDEOS_REFUSED = ("transprune: the Qwen3-VL architecture served with pruning takes images only (vLLM's Qwen3-VL "
                  "video layout interleaves timestamp text, which its pruning path positions only with its own EVS); "
                  "serve videos with Qwen3VLForConditionalGeneration")


class PrunedQwen3VLProcessor(PrunedQwenProcessor, Qwen3VLMultiModalProcessor):
    architecture = ARCHS["Qwen3VLForConditionalGeneration"].name

    def check_items(self, inputs, served) -> None:
        super().check_items(inputs, served)
        if "video" in inputs.mm_data_items and len(inputs.mm_data_items["video"]):
            raise ValueError(VIDEOS_REFUSED)


class PrunedQwen3VLDummyInputs(Qwen3VLDummyInputsBuilder):
    """vLLM's dummy inputs (memory profiling at start-up) without videos, which the processor refuses."""

    def get_dummy_mm_data(self, seq_len, mm_counts, *args, **kwargs):
        return super().get_dummy_mm_data(seq_len, {**mm_counts, "video": 0}, *args, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=PrunedQwen3VLDummyInputs)
class PrunedQwen3_VL(PrunedQwenModel, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL whose images lose the tokens transprune's pre-LLM method drops, before the LLM."""

    def get_mrope_input_positions(self, input_tokens, mm_features):
        merge = self.config.vision_config.spatial_merge_size
        items = []
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if f.modality != "image":
                raise ValueError(VIDEOS_REFUSED)
            t, h, w = f.data["image_grid_thw"].data.tolist()
            items.append((f.mm_position.offset, f.mm_position.length, t, h // merge, w // merge, 1.0))
        return self.layout_positions(input_tokens, items)

    def embed_multimodal(self, **kwargs):
        ours = pop_fields(kwargs)
        out = ()
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality != "image":
                raise ValueError(VIDEOS_REFUSED)
            out += self.embed_images(inputs, ours)
        return out
