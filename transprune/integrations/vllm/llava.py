"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision in vLLM with transprune's embedding methods (DivPrune, CDPruner) on
their images (imported by vLLM where it builds the model).

Positions are 1-D: an image of fewer placeholders simply makes a shorter prompt, which is transprune's "compact"
rule for these families (and the official code's), so nothing is recomputed. An image's unit is its whole packed
token run (NeXT / OneVision: base and crop features with their newline rows), as transprune selects on
transformers. VisionZip is refused here: on these towers it reads the CLS (CLIP) or received (SigLIP) attention
and merges in the tower's space before the projector, which this plugin does not yet wire into vLLM's towers.
OneVision videos pass unpruned.
"""

from __future__ import annotations

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import ARCHS
from .common import PrunedModel, PrunedProcessor, pop_fields, rows, selections, served_of  # noqa: F401

TOWER_REFUSAL = ("transprune: VisionZip on the LLaVA families reads the vision tower's attention and merges tokens "
                 "before the projector, which the vLLM plugin does not wire into vLLM's CLIP / SigLIP towers yet; "
                 "serve divprune or cdpruner there (or VisionZip on Qwen2.5-VL / Qwen3-VL)")


class LlavaFamilyProcessor(PrunedProcessor):
    tower_refusal = TOWER_REFUSAL

    def image_token_id(self) -> int:
        return self.info.get_hf_config().image_token_index


class LlavaFamilyModel(PrunedModel):
    def embed_multimodal(self, **kwargs):  # LLaVA-1.5 / NeXT: the parent returns the images' embeddings only
        ours = pop_fields(kwargs)
        return self.prune_images(super().embed_multimodal(**kwargs), ours)

    def prune_images(self, embeds, ours) -> tuple:
        """Each image's kept rows of its projected features, by its own setting."""
        served = [served_of(s) for s in rows(ours["transprune_setting"])]
        instructions = rows(ours["transprune_instruction"])
        out = []
        for i, e in enumerate(embeds):
            kept = None if served[i].config is None else self.choose_from_embeddings(
                served[i], e, instructions[i] if instructions else None)
            self.record(e.shape[0], served[i], e.shape[0], kept, served[i].kept_of([e.shape[0]]))
            out.append(e if kept is None else e[kept])
        return tuple(out)


class PrunedLlavaProcessor(LlavaFamilyProcessor, LlavaMultiModalProcessor):
    architecture = ARCHS["LlavaForConditionalGeneration"].name


@MULTIMODAL_REGISTRY.register_processor(PrunedLlavaProcessor, info=LlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlava(LlavaFamilyModel, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 whose images lose the tokens transprune's embedding method drops, before the LLM."""


class PrunedLlavaNextProcessor(LlavaFamilyProcessor, LlavaNextMultiModalProcessor):
    architecture = ARCHS["LlavaNextForConditionalGeneration"].name


@MULTIMODAL_REGISTRY.register_processor(PrunedLlavaNextProcessor, info=LlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlavaNext(LlavaFamilyModel, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT whose images lose the tokens transprune's embedding method drops, before the LLM."""


class PrunedLlavaOnevisionProcessor(LlavaFamilyProcessor, LlavaOnevisionMultiModalProcessor):
    architecture = ARCHS["LlavaOnevisionForConditionalGeneration"].name


@MULTIMODAL_REGISTRY.register_processor(PrunedLlavaOnevisionProcessor, info=LlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class PrunedLlavaOnevision(LlavaFamilyModel, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision whose images lose the tokens transprune's embedding method drops (videos unpruned)."""

    def embed_multimodal(self, **kwargs):
        ours = pop_fields(kwargs)
        out = ()
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                out += self.prune_images(self._process_image_input(inputs), ours)
            else:
                out += tuple(self._process_video_pixels(inputs))
        return out
