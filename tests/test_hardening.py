"""Inputs users give that pruning cannot run, refused up front with a clear error; stats that belong to
their call's input samples."""

import pytest
import torch

import transprune
from transprune import FastVConfig, TransPruneConfig
from transprune.testing import qwen_sample_inputs, sample_inputs, tiny_model, tiny_processor, tiny_qwen_processor

CONFIG = TransPruneConfig(accumulation_layers=(2, 3), pruning_layers=(2, 3), keep_ratios=(0.5, 0.25))


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava", seed=0), tiny_processor("llava")


@pytest.mark.parametrize("settings", [dict(num_beams=3), dict(num_beams=3, num_return_sequences=2),
                                      dict(do_sample=True, num_return_sequences=3)], ids=["beams", "beams+seqs", "seqs"])
def test_last_stats_has_one_entry_per_input_sample(llava, settings):
    model, processor = llava
    inputs = sample_inputs(processor, n=2, seed=1)
    with transprune.pruned(model, CONFIG) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        single = [s.kept_indices for s in handle.last_stats]
        torch.manual_seed(0)
        model.generate(**inputs, max_new_tokens=2, **{"do_sample": False, **settings})
        assert [s.kept_indices for s in handle.last_stats] == single
        model(**inputs)  # a plain forward: its own rows, one per sample
        assert len(handle.last_stats) == 2


def test_last_stats_per_input_sample_on_qwen():
    model, processor = tiny_model("qwen2_5_vl", seed=0), tiny_qwen_processor("qwen2_5_vl")
    inputs = qwen_sample_inputs(processor, 3, seed=2, sizes=[(64, 64), (128, 96), (96, 128)])
    with transprune.pruned(model, FastVConfig(k=2, r=0.5)) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, num_beams=2, num_return_sequences=2)
    assert [s.n_image_tokens for s in handle.last_stats] == [16, 48, 48]


@pytest.mark.parametrize("kwargs", [dict(prompt_lookup_num_tokens=2), dict(assistant_early_exit=1)],
                         ids=["prompt-lookup", "early-exit"])
def test_assisted_generation_is_refused_up_front(llava, kwargs):
    model, processor = llava
    inputs = sample_inputs(processor, n=1, seed=3)
    with transprune.pruned(model, CONFIG):
        with pytest.raises(ValueError, match=r"assisted generation \(\w+\) is not supported while transprune prunes"):
            model.generate(**inputs, max_new_tokens=2, **kwargs)
    assert "generate" not in vars(model)  # remove() restores generate too
    with pytest.raises(ValueError, match=r"assisted generation \(assistant_model\) is not supported while"):
        with transprune.pruned(model, CONFIG):
            model.generate(**inputs, max_new_tokens=2, assistant_model=tiny_model("llava", seed=1))


def test_a_cache_cropped_behind_the_pruning_is_an_error(llava):
    model, processor = llava
    inputs = sample_inputs(processor, n=1, seed=4)
    with transprune.pruned(model, CONFIG), torch.no_grad():
        out = model(**inputs, use_cache=True)
        out.cache.crop(-2)
        with pytest.raises(RuntimeError, match="the cache was cropped or edited outside transprune"):
            model(input_ids=inputs["input_ids"][:, -1:], cache=out.cache, use_cache=True)
