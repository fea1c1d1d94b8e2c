"""The "must hold" checks every crop / tile family's tests run (SmolVLM, InternVL, Gemma 3), written once: each
family's test module calls them with its own model, inputs and counts."""

import torch

import transprune
from transprune import FastVConfig, PDropConfig, RandomConfig, UniformConfig, VisionZipConfig
from transprune.testing import sample_inputs, tiny_model, tiny_processor

from test_runtime_llava_onevision import KEEP_ALL, TINY, greedy, n_visual  # noqa: E402

# The in-LLM methods every family's batch == one-by-one test runs (pytest.mark.parametrize("config", ...)).
IN_LLM_CONFIGS = [TINY, FastVConfig(k=2, r=0.5), PDropConfig(layers=(2, 4, 6), ratio=0.5),
                  RandomConfig(pruning_layers=(2, 3, 5), keep_ratios=(0.875, 0.5, 0.25)),
                  UniformConfig(pruning_layers=(2, 4), keep_ratios=(0.5, 0.25))]
IN_LLM_IDS = ["transprune", "fastv", "pdrop", "random", "uniform"]


def keep_all_equals_unpruned(model, inputs):
    """Keep ratios of 1.0: the same greedy tokens and (up to rounding) the same logits as the unpruned model."""
    ref = greedy(model, inputs)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    with transprune.pruned(model, KEEP_ALL):
        assert torch.equal(greedy(model, inputs), ref)
        with torch.no_grad():
            got = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert torch.allclose(got[valid], ref_logits[valid], atol=1e-5, rtol=1e-5)


def counts_and_batch_match_one_by_one(model, config, batch, singles, in_order: bool = False):
    """Each sample keeps exactly ``int(n * ratio)`` of its visual tokens per stage (ascending, with ``in_order``),
    and the batch gives each sample's tokens and kept tokens as it alone does."""
    with transprune.pruned(model, config) as handle:
        tokens = greedy(model, batch, n=10)
        stats = handle.last_stats
        for n, s in zip(n_visual(model, batch), stats):
            assert [len(k) for k in s.kept_indices] == [int(n * r) for r in handle.schedule.keep_ratios]
            if in_order:
                assert all(k == sorted(k) for k in s.kept_indices)
        for b, inputs in enumerate(singles):
            assert torch.equal(greedy(model, inputs, n=10)[0], tokens[b])
            assert handle.last_stats[0].kept_indices == stats[b].kept_indices


def scores_and_forward_match_the_spec(model, inputs, reference):
    """TTV, IGA, the kept tokens and the final logits equal ``reference(model, inputs, TINY)``: the spec written on
    transformers' own layers."""
    stages, ref_logits = reference(model, inputs, TINY)
    with transprune.pruned(model, TINY, record_scores=True) as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    stats = handle.last_stats[0]
    for mine, ref in zip(stats.scores, stages):
        assert torch.allclose(mine["ttv"], ref["ttv"], atol=1e-5, rtol=1e-4)
        assert torch.allclose(mine["iga"], ref["iga"], atol=1e-5, rtol=1e-4)
    assert stats.kept_indices == [s["kept"] for s in stages]
    assert torch.allclose(got, ref_logits, atol=1e-4, rtol=1e-4)


def sdpa_eager_no_image_half_precision_and_save_load(kind: str, sizes, tmp_path):
    """sdpa == eager (kept tokens and greedy tokens), text-only prompts unchanged and counted as 0 image tokens,
    fp16 / bf16 finite scores, and a saved tiny checkpoint that loads back with the same processor and tokens."""
    from transprune.loading import load_checkpoint
    from transprune.testing import save_tiny_checkpoint

    processor = tiny_processor(kind)
    inputs = sample_inputs(processor, 3, seed=5, sizes=sizes)
    runs = []
    for model in (tiny_model(kind, seed=0), tiny_model(kind, seed=0, attn_implementation="eager")):
        with transprune.pruned(model, TINY) as handle:
            runs.append((greedy(model, inputs, n=8), [s.kept_indices for s in handle.last_stats]))
    assert runs[0][1] == runs[1][1] and torch.equal(runs[0][0], runs[1][0])
    model = tiny_model(kind, seed=0)
    processor.tokenizer.padding_side = "left"
    text = processor(text=["USER: what is the colour ? ASSISTANT:", "USER: how many ? ASSISTANT:"], padding=True,
                     return_tensors="pt")
    ref = greedy(model, text, n=5)
    with transprune.pruned(model, TINY) as handle:
        assert torch.equal(greedy(model, text, n=5), ref) and [s.n_image_tokens for s in handle.last_stats] == [0, 0]
    for dtype in (torch.float16, torch.bfloat16):
        half = tiny_model(kind, seed=0, dtype=dtype)
        with transprune.pruned(half, TINY, record_scores=True) as handle:
            assert greedy(half, {**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}, n=3).shape == (3, 3)
        assert all(torch.isfinite(st["score"]).all() for s in handle.last_stats for st in s.scores)
    loaded, loaded_processor = load_checkpoint(str(save_tiny_checkpoint(tmp_path / kind, kind=kind)))
    again = sample_inputs(loaded_processor, 3, seed=5, sizes=sizes)
    assert all(torch.equal(again[k], inputs[k]) for k in inputs)
    with transprune.pruned(loaded, TINY):
        assert torch.equal(greedy(loaded, again, n=8), runs[0][0])


def visionzip_batch_matches_one_by_one(model, batch, singles, first_stage_counts):
    """VisionZip (6 dominant + 2 contextual per unit) then the tiny TransPrune schedule: the pre-LLM stage keeps
    ``first_stage_counts`` per sample, and the batch matches each sample alone."""
    with transprune.pruned(model, [VisionZipConfig(6, 2), TINY]) as handle:
        tokens = greedy(model, batch, n=8)
        stats = [s.kept_indices for s in handle.last_stats]
        assert [len(s[0]) for s in stats] == first_stage_counts
        for b, inputs in enumerate(singles):
            assert torch.equal(greedy(model, inputs, n=8)[0], tokens[b])
            assert handle.last_stats[0].kept_indices == stats[b]
