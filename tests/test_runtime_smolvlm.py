"""The pruned decoder loop on tiny random-init SmolVLM and Idefics3 (crops + global view, pixel shuffle, Llama
decoder under model.text_model, GQA; fp32, CPU)."""

import pytest
import torch

import transprune
from transprune import FastVConfig, PDropConfig, RandomConfig, UniformConfig, VisionZipConfig
from transprune.testing import sample_inputs, sample_inputs_unbatched, tiny_model, tiny_processor, tiny_smolvlm

from test_runtime_llava_onevision import KEEP_ALL, TINY, greedy, n_visual, reference  # noqa: E402

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
    inputs = sample_inputs(processor, 3, seed=1, sizes=SIZES)
    ref = greedy(model, inputs)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    with transprune.pruned(model, KEEP_ALL):
        assert torch.equal(greedy(model, inputs), ref)
        with torch.no_grad():
            got = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert torch.allclose(got[valid], ref_logits[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [TINY, FastVConfig(k=2, r=0.5), PDropConfig(layers=(2, 4, 6), ratio=0.5),
                                    RandomConfig(pruning_layers=(2, 3, 5), keep_ratios=(0.875, 0.5, 0.25)),
                                    UniformConfig(pruning_layers=(2, 4), keep_ratios=(0.5, 0.25))],
                         ids=["transprune", "fastv", "pdrop", "random", "uniform"])
def test_exact_counts_and_batch_matches_one_by_one(config):
    model, processor = tiny_smolvlm(seed=0), tiny_processor("smolvlm")
    batch = sample_inputs(processor, 3, seed=3, sizes=SIZES)
    with transprune.pruned(model, config) as handle:
        tokens = greedy(model, batch, n=10)
        stats = handle.last_stats
        for n, s in zip(n_visual(model, batch), stats):
            assert [len(k) for k in s.kept_indices] == [int(n * r) for r in handle.schedule.keep_ratios]
        for b, inputs in enumerate(sample_inputs_unbatched(processor, 3, seed=3, sizes=SIZES)):
            assert torch.equal(greedy(model, inputs, n=10)[0], tokens[b])
            assert handle.last_stats[0].kept_indices == stats[b].kept_indices


def test_scores_kept_tokens_and_forward_match_the_spec(smol):
    model, processor = smol
    inputs = sample_inputs_unbatched(processor, 3, seed=4, sizes=SIZES)[0]
    stages, ref_logits = reference(model, inputs, TINY)
    with transprune.pruned(model, TINY, record_scores=True) as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    stats = handle.last_stats[0]
    for mine, ref in zip(stats.scores, stages):
        assert torch.allclose(mine["ttv"], ref["ttv"], atol=1e-5, rtol=1e-4)
        assert torch.allclose(mine["iga"], ref["iga"], atol=1e-5, rtol=1e-4)
    assert stats.kept_indices == [s["kept"] for s in stages]
    assert torch.allclose(got, ref_logits, atol=1e-4, rtol=1e-4)


def test_sdpa_eager_no_image_half_precision_and_save_load(tmp_path):
    from transprune.loading import load_checkpoint
    from transprune.testing import save_tiny_checkpoint

    processor = tiny_processor("smolvlm")
    inputs = sample_inputs(processor, 3, seed=5, sizes=SIZES)
    runs = []
    for model in (tiny_smolvlm(seed=0), tiny_smolvlm(seed=0, attn_implementation="eager")):
        with transprune.pruned(model, TINY) as handle:
            runs.append((greedy(model, inputs, n=8), [s.kept_indices for s in handle.last_stats]))
    assert runs[0][1] == runs[1][1] and torch.equal(runs[0][0], runs[1][0])
    model = tiny_smolvlm(seed=0)
    processor.tokenizer.padding_side = "left"
    text = processor(text=["USER: what is the colour ? ASSISTANT:", "USER: how many ? ASSISTANT:"], padding=True,
                     return_tensors="pt")
    ref = greedy(model, text, n=5)
    with transprune.pruned(model, TINY) as handle:
        assert torch.equal(greedy(model, text, n=5), ref) and [s.n_image_tokens for s in handle.last_stats] == [0, 0]
    for dtype in (torch.float16, torch.bfloat16):
        half = tiny_smolvlm(seed=0, dtype=dtype)
        with transprune.pruned(half, TINY, record_scores=True) as handle:
            assert greedy(half, {**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}, n=3).shape == (3, 3)
        assert all(torch.isfinite(st["score"]).all() for s in handle.last_stats for st in s.scores)
    loaded, loaded_processor = load_checkpoint(str(save_tiny_checkpoint(tmp_path / "smol", kind="smolvlm")))
    again = sample_inputs(loaded_processor, 3, seed=5, sizes=SIZES)
    assert all(torch.equal(again[k], inputs[k]) for k in inputs)
    with transprune.pruned(loaded, TINY):
        assert torch.equal(greedy(loaded, again, n=8), runs[0][0])


def test_visionzip_per_crop_matches_the_eager_received_attention_reference(smol):
    """Dominant tokens: the most-received attention of the tower's last layer (transformers' eager weights, mean
    over heads and the crop's queries), each visual token scored by the mean over its 2 x 2 shuffled patches (the
    model's pixel shuffle, run on patch ids); one contextual token = the mean of the crop's other tokens after
    the connector."""
    model, processor = smol
    inputs = sample_inputs_unbatched(processor, 3, seed=11, sizes=SIZES)[1]  # 3 crops
    eager = tiny_model(model.config.model_type, seed=0, attn_implementation="eager")
    crops = inputs["pixel_values"][0]
    with torch.no_grad():
        attentions = eager.model.vision_model(pixel_values=crops, output_attentions=True).attentions[-1]
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0].view(len(crops), 16, -1)
    received = attentions.mean(1).mean(1)  # (crops, 64 patches): heads, then queries
    ids = torch.arange(64.0).view(1, 64, 1)
    members = model.model.connector.pixel_shuffle(ids, 2)[0].long()  # each token's 4 patches
    score = received[:, members].mean(-1)  # (crops, 16)
    expected, merged = [], []
    for c in range(len(crops)):
        top = sorted(torch.topk(score[c], 6).indices.tolist())
        rest = [i for i in range(16) if i not in top]
        expected += [c * 16 + i for i in sorted(top + [rest[0]])]
        merged.append((c, rest[0], features[c, rest].mean(0)))
    with transprune.pruned(model, VisionZipConfig(dominant=6, contextual=1)) as handle, torch.no_grad():
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0]
    assert handle.last_stats[0].kept_indices == [expected]
    visual = embeds[inputs["input_ids"][0] == model.config.image_token_id].view(len(crops), 16, -1)
    for c, target, mean in merged:
        assert torch.allclose(visual[c, target], mean, atol=1e-5)


def test_visionzip_batch_with_padding_crops_matches_one_by_one(smol):
    model, processor = smol
    batch = sample_inputs(processor, 3, seed=12, sizes=SIZES)  # 5, 3, 3 crops: the batch pads two samples' crops
    with transprune.pruned(model, [VisionZipConfig(6, 2), TINY]) as handle:
        tokens = greedy(model, batch, n=8)
        stats = [s.kept_indices for s in handle.last_stats]
        assert [len(s[0]) for s in stats] == [40, 24, 24]  # 8 per crop
        for b, inputs in enumerate(sample_inputs_unbatched(processor, 3, seed=12, sizes=SIZES)):
            assert torch.equal(greedy(model, inputs, n=8)[0], tokens[b])
            assert handle.last_stats[0].kept_indices == stats[b]
