"""LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`).

Both expand each `<image>` into one placeholder id per image feature (for NeXT: every anyres feature,
newline tokens included), so the image tokens of a sample are exactly `input_ids == image_token_id`.
The text decoder is a Llama-style model at `model.model.language_model`.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from . import llama


class LlavaAdapter:
    family = "llava"
    model_classes = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)
    run_layer = staticmethod(llama.run_layer)
    scoring_qk = staticmethod(llama.scoring_qk)

    def __init__(self, model):
        self.model = model

    @property
    def multimodal_model(self):
        """The module whose forward sees `input_ids` and hands `inputs_embeds` to the decoder."""
        return self.model.model

    @property
    def decoder(self):
        return self.model.model.language_model

    def image_token_mask(self, input_ids, inputs_embeds) -> torch.Tensor | None:
        image_id = self.model.config.image_token_id
        if input_ids is not None:
            return input_ids == image_id
        if inputs_embeds is None:
            return None
        # Embeddings passed directly: placeholders are still the image token's embedding at this point.
        table = self.multimodal_model.get_input_embeddings()
        marker = table(torch.tensor(image_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)
        return (inputs_embeds == marker).all(-1)
