"""Models loaded with an accelerate device map that offloads part of them (here: to disk, as `max_memory` would on
a machine too small for the model) keep working with every method: the same kept tokens, stats and greedy tokens
as the same checkpoint loaded whole. Offloaded weights sit on the meta device and accelerate's hooks load them
for each call, so every part the runtime calls (TTV capture, scoring q/k, VisionZip's capture in the vision
tower) must go through those hooks."""

import pytest
import torch
from transformers import AutoConfig

import transprune
from transprune import FastVConfig, PDropConfig, TransPruneConfig, UniformConfig, VisionZipConfig
from transprune.loading import model_class
from transprune.testing import qwen_sample_inputs, sample_inputs, save_tiny_checkpoint, tiny_processor, tiny_qwen_processor

CONFIGS = {
    "transprune": TransPruneConfig(accumulation_layers=(2, 3, 4, 5), pruning_layers=(2, 4, 5), keep_ratios=(0.5, 0.25, 0.125)),
    "fastv": FastVConfig(k=4, r=0.5),
    "pdrop": PDropConfig(layers=(4, 5, 6)),
    "visionzip": VisionZipConfig(8, 2),
    "visionzip+transprune": [VisionZipConfig(10, 4), TransPruneConfig(accumulation_layers=(4, 5), pruning_layers=(4, 5),
                                                                      keep_ratios=(0.5, 0.25))],
    "uniform": UniformConfig(pruning_layers=(5,), keep_ratios=(0.5,)),
}


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl", "qwen3_vl"])
def whole_and_offloaded(request, tmp_path_factory):
    kind = request.param
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp(kind) / "ckpt", kind)
    cls = model_class(AutoConfig.from_pretrained(folder))
    whole = cls.from_pretrained(folder).eval()
    decoder = "model.language_model"
    device_map = {f"model.{name}": "disk" for name, _ in whole.model.named_children() if name != "language_model"}
    device_map.update({f"{decoder}.{name}": "cpu" for name, _ in whole.model.language_model.named_children()
                       if name != "layers"})
    device_map["lm_head"] = "cpu"
    for i in range(len(whole.model.language_model.layers)):  # the first layers stay, the rest (and the vision tower) go to disk
        device_map[f"{decoder}.layers.{i}"] = "cpu" if i < 3 else "disk"
    offloaded = cls.from_pretrained(folder, device_map=device_map,
                                    offload_folder=str(tmp_path_factory.mktemp("offload"))).eval()
    assert offloaded.model.language_model.layers[5].self_attn.q_proj.weight.device.type == "meta"
    if kind == "llava":
        inputs = sample_inputs(tiny_processor("llava"), n=2, seed=0)
    else:
        inputs = qwen_sample_inputs(tiny_qwen_processor(kind), 2, seed=0, sizes=[(128, 96), (64, 64)])
    return whole, offloaded, inputs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_offloaded_model_prunes_as_the_whole_one(whole_and_offloaded, name):
    whole, offloaded, inputs = whole_and_offloaded
    results = []
    for model in (whole, offloaded):
        with transprune.pruned(model, CONFIGS[name], record_scores=True) as handle, torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            results.append((tokens, [s.to_dict() for s in handle.last_stats]))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
