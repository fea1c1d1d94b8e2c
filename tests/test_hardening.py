"""Inputs users give that pruning cannot run, refused up front with a clear error; stats that belong to
their call's input samples."""

import pytest
import torch

import transprune
from transprune.compat import cache_kwargs, cache_of
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
        cache_of(out).crop(-2)
        with pytest.raises(RuntimeError, match="the cache was cropped or edited outside transprune"):
            model(input_ids=inputs["input_ids"][:, -1:], **cache_kwargs(cache_of(out)), use_cache=True)


# -- every field of every registered method refuses bad values on construction, naming the field ---------------
def _bad_values(default, field_name):
    if field_name == "name":
        return [None, 5]
    if field_name == "reference_depth":
        return [0, 1, -3, 1.5, "32", True]
    if default is None:  # an optional count (VisionZip's: None is the paper's share of the unit)
        return ["2", 1.5, True, -1] + ([0] if field_name == "reference_tokens" else [])
    if isinstance(default, bool):
        return [None, "yes", 1, 0]
    if isinstance(default, str):
        return [None, 5, "nope"]
    if isinstance(default, int):
        return [None, "2", 1.5, True, -1]
    if isinstance(default, float):
        return [None, "0.5", True, -0.5, 1.5, float("nan")]
    if isinstance(default, tuple):
        return [None, "2,3", 5, ("a",), (-1,), (1.5,)]
    raise AssertionError(f"no bad values for {field_name}={default!r}: add them here")


def _fields():
    import dataclasses

    from transprune.methods import METHODS

    for method, cls in METHODS.items():
        for f in dataclasses.fields(cls):
            if f.init:
                yield method, cls, f.name, getattr(cls(), f.name)


@pytest.mark.parametrize("method, cls, field_name, default", list(_fields()),
                         ids=[f"{m}.{n}" for m, _, n, _ in _fields()])
def test_every_config_field_refuses_bad_values_naming_the_field(method, cls, field_name, default):
    for bad in _bad_values(default, field_name):
        with pytest.raises((ValueError, TypeError), match=field_name):
            cls(**{field_name: bad})


SET_FIELDS = [f for f in _fields() if f[2] != "name"]  # name is a label, not a --set field


@pytest.mark.parametrize("method, cls, field_name, default", SET_FIELDS, ids=[f"{m}.{n}" for m, _, n, _ in SET_FIELDS])
def test_every_config_field_on_the_command_line_exits_2_with_one_line(method, cls, field_name, default, capsys):
    from transprune.cli import main

    bad = "nope" if not isinstance(default, str) else "5"
    assert main(["flops", "--arch", "llava-1.5-7b", "--method", method, "--set", f"{field_name}={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and field_name in err


def test_keep_ratios_that_keep_no_token_are_refused_at_apply(llava):
    model, _ = llava  # 64 image tokens
    for config in (TransPruneConfig(accumulation_layers=(2, 3), pruning_layers=(2, 3), keep_ratios=(0.5, 0.01)),
                   FastVConfig(k=2, r=0.995)):  # FastV keeps round(64 * 0.005) = 0
        with pytest.raises(ValueError, match=r"0 of this model's 64 image tokens"):
            transprune.apply(model, config)
        assert "forward" not in vars(model.model)
    transprune.apply(model, FastVConfig(k=2, r=63 / 64)).remove()  # one token left: fine


def test_rows_per_sample_follow_generates_own_config_resolution(llava):
    """Beams set on the model's default config, or on a GenerationConfig passed positionally: still one entry
    per input sample."""
    from transformers import GenerationConfig

    model, processor = llava
    inputs = sample_inputs(processor, n=2, seed=5)
    with transprune.pruned(model, CONFIG) as handle, torch.no_grad():
        model.generation_config.num_beams = 2
        try:
            model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=2))
            assert len(handle.last_stats) == 2
        finally:
            model.generation_config.num_beams = 1
        model.generate(inputs["input_ids"], GenerationConfig(num_beams=2, max_new_tokens=2),
                       attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
        assert len(handle.last_stats) == 2


def test_visionzip_leaves_no_hook_on_the_tower_nor_in_a_copy(llava):
    import copy

    from transprune import VisionZipConfig

    model, processor = llava
    from transprune.adapters import adapter_for

    layer = adapter_for(model).vision_hooks().attention_layer()
    before = len(layer._forward_pre_hooks)
    with transprune.pruned(model, VisionZipConfig(dominant=20, contextual=4)) as handle, torch.no_grad():
        model(**sample_inputs(processor, n=1, seed=6))
        assert len(layer._forward_pre_hooks) == before and len(handle.last_stats[0].kept_indices[0]) == 24
        twin = copy.deepcopy(model)
    twin_layer = adapter_for(twin).vision_hooks().attention_layer()
    assert len(twin_layer._forward_pre_hooks) == before
    # the copy's encoder and scored layer are their classes' own, bound to the copy (patching.py): no VisionZip there
    assert twin.model.get_image_features.__func__ is type(twin.model).get_image_features
    assert twin_layer.forward.__func__ is type(twin_layer).forward
    assert "forward" not in layer.__dict__  # removed with the pruning


def test_a_method_with_a_composition_preset_is_an_error():
    from transprune.methods import build

    with pytest.raises(ValueError, match="is a named composition of its own methods; it cannot apply to 'random'"):
        build("random", "visionzip288+transprune")
    assert [c.method for c in build(None, "visionzip288+transprune")] == ["visionzip", "transprune"]


def test_profile_of_a_visionzip_prefill_times_its_selection(llava):
    from transprune import VisionZipConfig

    model, processor = llava
    inputs = sample_inputs(processor, n=2, seed=7)
    with transprune.pruned(model, [VisionZipConfig(20, 4), CONFIG], profile=True) as handle, torch.no_grad():
        model(**inputs)
        first = handle.last_profile
        model(**inputs)
        second = handle.last_profile
    for profile in (first, second):
        assert profile["pre_llm_s"] > 0 and len(profile["select_s"]) == 2 and all(t > 0 for t in profile["select_s"])
        assert profile["scoring_s"] == pytest.approx(profile["ttv_s"] + profile["pre_llm_s"] + sum(profile["select_s"]))


def test_a_mistral_decoder_with_a_sliding_window_is_masked_as_its_cache_slides():
    """A LLaVA on a Mistral decoder with sliding_window=12 and no layer_types: every layer slides (as the model's
    own masks and DynamicCache read the config); keep-all == unpruned past the window, and batch == one by one."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    from transprune import TransPruneConfig
    from transprune.testing import _build, _common, sample_inputs, sample_inputs_unbatched, tiny_processor

    common = _common()
    text = MistralConfig(**{k: v for k, v in common["text_config"].to_dict().items()
                            if k in MistralConfig().to_dict() and k not in ("model_type", "architectures")},
                         sliding_window=12)
    config = LlavaConfig(**{**common, "text_config": text}, image_seq_length=64)
    model = _build(config, LlavaForConditionalGeneration, 0, "sdpa", torch.float32)
    processor = tiny_processor("llava")
    batch = sample_inputs(processor, 3, seed=1)

    def greedy(inputs, n=20):
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=n, do_sample=False)[:, inputs["input_ids"].shape[1]:]

    ref = greedy(batch)
    keep_all = TransPruneConfig(accumulation_layers=(2, 3), pruning_layers=(2, 3), keep_ratios=(1.0, 1.0))
    with transprune.pruned(model, keep_all) as handle:
        assert handle.adapter.layer_types == ["sliding_attention"] * 8
        assert torch.equal(greedy(batch), ref)
    tiny = TransPruneConfig(accumulation_layers=(2, 3), pruning_layers=(2, 3), keep_ratios=(0.5, 0.25))
    with transprune.pruned(model, tiny):
        tokens = greedy(batch)
        for b, inputs in enumerate(sample_inputs_unbatched(processor, 3, seed=1)):
            assert torch.equal(greedy(inputs)[0], tokens[b])
