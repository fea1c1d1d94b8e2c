"""VisionZip (arXiv 2412.04467), before the LLM: per image (per vision tile) keep the patches the CLS token
attends to most and merge the rest into a few contextual tokens.

The method owns its rule and its wiring; the family adapter only supplies the vision hooks (which layer's
attention to read, CLS attention and keys from its q and k, the feature-layer patches, the projector and
the order in which a tile's patches reach the LLM)."""

from __future__ import annotations

import functools
from contextvars import ContextVar
from dataclasses import asdict, dataclass

import torch

from ..patching import patch
from ..scoring import select_top
from .base import register_method

# (CLS attention, keys) of the vision feature layer, captured while this call encodes images.
_CAPTURE: ContextVar[list | None] = ContextVar("transprune_visionzip_capture", default=None)


@dataclass(frozen=True)
class VisionZipConfig:
    """VisionZip, before the LLM: per image keep the ``dominant`` patches with the most CLS attention in
    the vision feature layer and merge the rest into ``contextual`` tokens (by key similarity)."""

    dominant: int = 54
    contextual: int = 10
    method = "visionzip"
    stage = "pre"

    def __post_init__(self):
        for name in ("dominant", "contextual"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.dominant + self.contextual == 0:
            raise ValueError("dominant + contextual must be >= 1 (tokens kept per image)")

    @property
    def tokens(self) -> int:
        return self.dominant + self.contextual

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}

    def llm_tokens(self, arch) -> int:
        """Image tokens that reach the LLM on ``arch`` (an `ArchSpec`): ``tokens`` per vision crop (FLOPs tool)."""
        return min(self.tokens * arch.crops, arch.image_tokens)

    def check(self, adapter) -> None:
        """Raise before the model changes if this family or setting cannot run VisionZip."""
        hooks = adapter.vision_hooks()
        if hooks is None:
            raise ValueError(f"VisionZip needs vision-tower hooks that the {adapter.family} adapter does not have")
        hooks.check()
        n = hooks.patches_per_tile()
        if self.tokens > n:
            raise ValueError(f"VisionZipConfig keeps dominant + contextual = {self.tokens} tokens per image (per anyres "
                             f"tile), more than the model's {n} patches per tile")

    def install(self, adapter, hand_over) -> tuple[list, list]:
        """Wrap this model instance's image encoder; ``hand_over(outputs, run)`` times ``run()`` (the
        selection, a bool over every image token of the call) and passes the result to the prefill.
        Returns what `PruneHandle.remove` undoes: ([(module, attribute, previous instance value)], [hooks])."""
        hooks = adapter.vision_hooks()
        mm = adapter.multimodal_model
        features = mm.get_image_features

        @functools.wraps(features)
        def image_features(*args, **kwargs):
            kwargs["return_dict"] = True
            token = _CAPTURE.set([])
            try:
                out = features(*args, **kwargs)
                captured = _CAPTURE.get()
            finally:
                _CAPTURE.reset(token)
            geometry = hooks.geometry(args, kwargs)
            hand_over(out, lambda: self.select(hooks, out, captured[-1], geometry))
            return out

        def capture(module, args, kwargs):
            """Pre-hook on the feature layer's attention: the CLS row and keys, from q and k."""
            found = _CAPTURE.get()
            if found is not None:
                found.append(hooks.cls_attention(module, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]))

        saved = [patch(mm, "get_image_features", image_features)]
        hook = hooks.attention_layer().register_forward_pre_hook(capture, with_kwargs=True)
        return saved, [hook]

    def select(self, hooks, image_outputs, captured, geometry) -> torch.Tensor:
        """Replace contextual slots of each image's features by merged tokens; return which slots stay.

        Per vision tile (the whole image for LLaVA-1.5; the base image and every anyres tile for NeXT):
        the ``dominant`` patches with the most CLS attention stay as they are; of the rest, ``contextual``
        evenly spaced targets absorb every other remaining patch by key similarity and become the mean of
        their group in vision space, projected like any patch. Everything else (NeXT's newline tokens
        included) is dropped before the LLM. Returns a bool over all image tokens of the call, in order.
        """
        cls_attention, keys = captured
        patches = hooks.feature_patches(image_outputs)  # (tiles, patches, d), CLS dropped
        cls_attention, keys = cls_attention[:, 1:], torch.nn.functional.normalize(keys[:, 1:], dim=-1)
        tiles, per_tile = patches.shape[:2]
        keep = torch.zeros(tiles, per_tile, dtype=torch.bool, device=patches.device)
        merged_ids, merged = [], []
        for t in range(tiles):
            keep[t, select_top(cls_attention[t], self.dominant)] = True
            rest = (~keep[t]).nonzero().squeeze(1)
            c = min(self.contextual, rest.numel())
            if c:
                targets = rest[torch.arange(c, device=rest.device) * rest.numel() // c]
                others = rest[~torch.isin(rest, targets)]
                group = (keys[t, others] @ keys[t, targets].T).argmax(1)
                total = patches[t, targets].float().index_add(0, group, patches[t, others].float())
                sizes = torch.ones(c, device=total.device).index_add(0, group, torch.ones_like(group, dtype=torch.float))
                merged.append(total / sizes[:, None])
                merged_ids.append(t * per_tile + targets)
                keep[t, targets] = True
        keep = keep.flatten()
        slot = torch.full((tiles * per_tile,), -1, dtype=torch.long, device=patches.device)
        if merged:
            merged_ids = torch.cat(merged_ids)
            slot[merged_ids] = torch.arange(merged_ids.numel(), device=slot.device)
            merged = hooks.project(torch.cat(merged).to(patches.dtype))
        features, keeps = [], []
        for feats, ids in zip(image_outputs.pooler_output, hooks.packed_patch_ids(tiles, per_tile, geometry)):
            real = ids >= 0  # -1 marks rows that are no patch (NeXT's newline tokens)
            ids = ids.clamp_min(0)
            rows = real & (slot[ids] >= 0)
            if rows.any():
                feats = feats.clone()
                feats[rows] = merged[slot[ids[rows]]].to(feats.dtype)
            features.append(feats)
            keeps.append(real & keep[ids])
        image_outputs.pooler_output = features
        return torch.cat(keeps)


register_method("visionzip", VisionZipConfig)
