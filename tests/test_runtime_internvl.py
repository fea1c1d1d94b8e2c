"""The pruned decoder loop on a tiny random-init InternVL (tiles + thumbnail, pixel shuffle 0.5, <img> markers,
Qwen2 decoder, GQA; fp32, CPU)."""

import pytest
import torch

import transprune
from transprune import VisionZipConfig
from transprune.testing import sample_inputs, sample_inputs_unbatched, tiny_internvl, tiny_model, tiny_processor

from family_checks import (IN_LLM_CONFIGS, IN_LLM_IDS, counts_and_batch_match_one_by_one,  # noqa: E402
                           keep_all_equals_unpruned, scores_and_forward_match_the_spec,
                           sdpa_eager_no_image_half_precision_and_save_load, visionzip_batch_matches_one_by_one)
from test_runtime_llava_onevision import TINY, n_visual, reference  # noqa: E402

SIZES = [(64, 64), (128, 64), (64, 128)]  # (width, height): 1, 3 and 3 tiles of 16 tokens


@pytest.fixture(scope="module")
def internvl():
    return tiny_model("internvl", seed=0), tiny_processor("internvl")


def test_family_and_counts(internvl):
    model, processor = internvl
    from transprune.adapters import adapter_for

    adapter = adapter_for(model)
    assert adapter.family == "internvl" and type(adapter.decoder).__name__ == "Qwen2Model"
    inputs = sample_inputs(processor, 3, seed=0, sizes=SIZES)
    assert n_visual(model, inputs) == [16, 48, 48] == [adapter.image_tokens_for((64, 64)), adapter.image_tokens_for((64, 128)),
                                                       adapter.image_tokens_for((128, 64))]
    with pytest.raises(ValueError, match="more than the model's 16 patches per tile"):
        transprune.apply(model, VisionZipConfig(14, 4))
    assert "forward" not in vars(model.model)


def test_keep_all_equals_unpruned(internvl):
    model, processor = internvl
    keep_all_equals_unpruned(model, sample_inputs(processor, 3, seed=1, sizes=SIZES))


@pytest.mark.parametrize("config", IN_LLM_CONFIGS, ids=IN_LLM_IDS)
def test_exact_counts_and_batch_matches_one_by_one(config):
    model, processor = tiny_internvl(seed=0), tiny_processor("internvl")
    counts_and_batch_match_one_by_one(model, config, sample_inputs(processor, 3, seed=3, sizes=SIZES),
                                      sample_inputs_unbatched(processor, 3, seed=3, sizes=SIZES))


def test_scores_kept_tokens_and_forward_match_the_spec(internvl):
    model, processor = internvl
    scores_and_forward_match_the_spec(model, sample_inputs_unbatched(processor, 3, seed=4, sizes=SIZES)[0], reference)


def test_sdpa_eager_no_image_half_precision_and_save_load(tmp_path):
    sdpa_eager_no_image_half_precision_and_save_load("internvl", SIZES, tmp_path)


def test_flops_arch_and_bench_inputs():
    from transprune.adapters import family_for
    from transprune.bench.inputs import synthetic_inputs
    from transprune.flops import ARCHS
    from transprune.testing import tiny_internvl_config

    assert family_for("internvl").arch_spec(tiny_internvl_config(), "tiny").image_tokens == 16
    assert (ARCHS["internvl3-8b"].num_layers, ARCHS["internvl3-8b"].image_tokens) == (28, 256)
    model = tiny_internvl(seed=0)
    inputs = synthetic_inputs(model, 2, text_tokens=12, image_size=(128, 128))  # 2 x 2 tiles + a thumbnail
    assert inputs.image_tokens == [80, 80]
    with transprune.pruned(model, TINY) as handle, torch.no_grad():
        model(**inputs.tensors)
    assert [s.n_image_tokens for s in handle.last_stats] == [80, 80]


def test_visionzip_refused_by_flops_on_a_family_without_hooks_and_image_sizes_checked(monkeypatch):
    from transprune.adapters.smolvlm import SmolVLMAdapter
    from transprune.bench.serving import table
    from transprune.cli import main
    from transprune.flops import estimate

    # every built-in family has vision hooks: give one a reason, as a family without hooks declares it
    monkeypatch.setattr(SmolVLMAdapter, "vision_hooks_missing", "its tower has none (test)")
    with pytest.raises(ValueError, match="the smolvlm adapter does not have: its tower has none"):
        estimate(VisionZipConfig(), "smolvlm-256m")
    assert main(["flops", "--arch", "smolvlm-256m", "--method", "visionzip"]) == 2
    assert "| smolvlm-256m | visionzip | not supported on this family |" in table(["smolvlm-256m"], [1])
    # the default is the paper's 64-of-576 share of each tile: 24 + 4 of 256; of each 64-token crop, 6 + 1
    assert estimate(VisionZipConfig(), "internvl3-8b").visual_tokens_per_layer[0] == 28
    monkeypatch.undo()
    assert estimate(VisionZipConfig(), "smolvlm-256m").visual_tokens_per_layer[0] == 7 * 17
    from transprune.adapters import adapter_for

    with pytest.raises(ValueError, match="multiple of the 64-px tile"):
        adapter_for(tiny_internvl(seed=0)).image_tokens_for((100, 64))


def test_visionzip_per_tile_matches_the_eager_cls_attention_reference(internvl):
    """Dominant tokens: the top CLS attention of the feature layer (transformers' eager weights), each visual
    token scored by the mean over its 2 x 2 patches (the model's pixel shuffle, run on patch ids); one contextual
    token = the mean of the tile's other tokens after the projector."""
    model, processor = internvl
    inputs = sample_inputs_unbatched(processor, 3, seed=11, sizes=SIZES)[1]  # 3 tiles (2 + thumbnail)
    eager = tiny_internvl(seed=0, attn_implementation="eager")
    with torch.no_grad():
        attentions = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-1]
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # (tiles, 16, d)
    cls = attentions[:, :, 0, 1:].mean(1)  # (tiles, 64 patches)
    ids = torch.arange(64.0).view(1, 8, 8, 1)
    members = model.model.pixel_shuffle(ids, 0.5).reshape(-1, 4).long()  # each token's 4 patches
    score = cls[:, members].mean(-1)  # (tiles, 16)
    expected, merged = [], []
    for t in range(3):
        top = sorted(torch.topk(score[t], 6).indices.tolist())
        rest = [i for i in range(16) if i not in top]
        expected += [t * 16 + i for i in sorted(top + [rest[0]])]
        merged.append((t, rest[0], features[t, rest[0]] + features[t, rest[1:]].mean(0)))  # the official merge
    with transprune.pruned(model, VisionZipConfig(dominant=6, contextual=1)) as handle, torch.no_grad():
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0]
    assert handle.last_stats[0].kept_indices == [expected]
    visual = embeds[inputs["input_ids"][0] == model.config.image_token_id].view(3, 16, -1)
    for t, target, mean in merged:
        assert torch.allclose(visual[t, target], mean, atol=1e-5)


def test_visionzip_batch_matches_one_by_one(internvl):
    model, processor = internvl
    visionzip_batch_matches_one_by_one(model, sample_inputs(processor, 3, seed=12, sizes=SIZES),
                                       sample_inputs_unbatched(processor, 3, seed=12, sizes=SIZES), [8, 24, 24])  # 8 per tile
