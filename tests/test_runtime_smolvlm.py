"""The pruned decoder loop on tiny random-init SmolVLM and Idefics3 (crops + global view, pixel shuffle, Llama
decoder under model.text_model, GQA; fp32, CPU)."""

import pytest
import torch

import transprune
from transprune.compat import rows_of
from transprune import VisionZipConfig
from transprune.testing import sample_inputs, sample_inputs_unbatched, tiny_model, tiny_processor, tiny_smolvlm

from family_checks import (IN_LLM_CONFIGS, IN_LLM_IDS, counts_and_batch_match_one_by_one,  # noqa: E402
                           keep_all_equals_unpruned, scores_and_forward_match_the_spec,
                           sdpa_eager_no_image_half_precision_and_save_load, visionzip_batch_matches_one_by_one)
from test_runtime_llava_onevision import n_visual, reference  # noqa: E402

SIZES = [(64, 64), (128, 64), (64, 128)]  # (width, height): 5, 3 and 3 crops of 16 tokens


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def smol(request):
    return tiny_model(request.param, seed=0), tiny_processor("smolvlm")


def test_family_counts_and_visionzip_limits(smol):
    model, processor = smol
    from transprune.adapters import adapter_for

    adapter = adapter_for(model)
    assert adapter.family == "smolvlm" and type(adapter.decoder).__name__ == "LlamaModel"
    inputs = sample_inputs(processor, 3, seed=0, sizes=SIZES)
    assert n_visual(model, inputs) == [80, 48, 48] == [adapter.image_tokens_for((128, 128)), adapter.image_tokens_for((64, 128)),
                                                       adapter.image_tokens_for((128, 64))]
    with pytest.raises(ValueError, match="more than the model's 16 patches per tile"):
        transprune.apply(model, VisionZipConfig(14, 4))
    assert "forward" not in vars(model.model) and "get_image_features" not in vars(model.model)


def test_keep_all_equals_unpruned(smol):
    model, processor = smol
    keep_all_equals_unpruned(model, sample_inputs(processor, 3, seed=1, sizes=SIZES))


@pytest.mark.parametrize("config", IN_LLM_CONFIGS, ids=IN_LLM_IDS)
def test_exact_counts_and_batch_matches_one_by_one(config):
    model, processor = tiny_smolvlm(seed=0), tiny_processor("smolvlm")
    counts_and_batch_match_one_by_one(model, config, sample_inputs(processor, 3, seed=3, sizes=SIZES),
                                      sample_inputs_unbatched(processor, 3, seed=3, sizes=SIZES))


def test_scores_kept_tokens_and_forward_match_the_spec(smol):
    model, processor = smol
    scores_and_forward_match_the_spec(model, sample_inputs_unbatched(processor, 3, seed=4, sizes=SIZES)[0], reference)


def test_sdpa_eager_no_image_half_precision_and_save_load(tmp_path):
    sdpa_eager_no_image_half_precision_and_save_load("smolvlm", SIZES, tmp_path)


@pytest.mark.parametrize("path", ["shared", "two-pass", "blockwise"])
def test_visionzip_per_crop_matches_the_eager_received_attention_reference(smol, path, monkeypatch):
    """Dominant tokens: the most-received attention of the tower's last layer (transformers' eager weights, mean
    over heads and the crop's queries), each visual token scored by the mean over its 2 x 2 shuffled patches (the
    model's pixel shuffle, run on patch ids); one contextual token = the mean of the crop's other tokens after
    the connector."""
    monkeypatch.setattr("transprune.adapters.vision._FUSED", path != "blockwise")
    monkeypatch.setattr("transprune.adapters.vision._SHARE_LAYER_PASS", path == "shared")
    model, processor = smol
    inputs = sample_inputs_unbatched(processor, 3, seed=11, sizes=SIZES)[1]  # 3 crops
    eager = tiny_model(model.config.model_type, seed=0, attn_implementation="eager")
    crops = inputs["pixel_values"][0]
    with torch.no_grad():
        attentions = eager.model.vision_model(pixel_values=crops, output_attentions=True).attentions[-1]
        features = rows_of(model.model.get_image_features(inputs["pixel_values"]).pooler_output).view(len(crops), 16, -1)
    received = attentions.mean(1).mean(1)  # (crops, 64 patches): heads, then queries
    ids = torch.arange(64.0).view(1, 64, 1)
    members = model.model.connector.pixel_shuffle(ids, 2)[0].long()  # each token's 4 patches
    score = received[:, members].mean(-1)  # (crops, 16)
    expected, merged = [], []
    for c in range(len(crops)):
        top = sorted(torch.topk(score[c], 6).indices.tolist())
        rest = [i for i in range(16) if i not in top]
        expected += [c * 16 + i for i in sorted(top + [rest[0]])]
        merged.append((c, rest[0], features[c, rest[0]] + features[c, rest[1:]].mean(0)))  # the official merge
    with transprune.pruned(model, VisionZipConfig(dominant=6, contextual=1)) as handle, torch.no_grad():
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0]
    assert handle.last_stats[0].kept_indices == [expected]
    visual = embeds[inputs["input_ids"][0] == model.config.image_token_id].view(len(crops), 16, -1)
    for c, target, mean in merged:
        assert torch.allclose(visual[c, target], mean, atol=1e-5)


def test_visionzip_batch_with_padding_crops_matches_one_by_one(smol):
    model, processor = smol
    visionzip_batch_matches_one_by_one(model, sample_inputs(processor, 3, seed=12, sizes=SIZES),
                                       sample_inputs_unbatched(processor, 3, seed=12, sizes=SIZES), [40, 24, 24])  # 5, 3, 3 crops: the batch pads two samples' crops; 8 per crop
