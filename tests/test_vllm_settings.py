"""The vLLM plugin's settings (transprune.integrations.vllm): parsing, refusals and counts, without vLLM installed
(the served models themselves are tested in tests/test_vllm.py, in vLLM's environment)."""

import json

import pytest

from transprune.integrations.vllm import ARCHS, from_key, hf_overrides, served_methods, settings
from transprune.methods import CDPrunerConfig, DivPruneConfig, VisionZipConfig


def test_a_setting_builds_the_method_every_tool_builds():
    assert settings("divprune").config == DivPruneConfig()
    assert settings("cdpruner-64").config == CDPrunerConfig(keep_ratio=64 / 576)
    assert settings({"method": "visionzip", "params": {"dominant": 20, "contextual": 4}}).config == VisionZipConfig(20, 4)
    assert settings({"method": "visionzip", "params": {"dominant": 20, "contextual": 4, "reference_tokens": 576}}
                    ).config == VisionZipConfig(20, 4, reference_tokens=576)
    assert settings("none").config is None
    assert settings(None).config == VisionZipConfig()  # our architecture with no setting: VisionZip's paper share


def test_equal_settings_have_one_key_and_the_key_comes_back():
    spelled = [settings("divprune"), settings({"method": "divprune", "params": {"keep_ratio": 0.098}}),
               settings({"params": {"keep_ratio": 0.098}}, base="divprune")]
    assert len({s.key for s in spelled}) == 1
    assert settings({"method": "divprune", "params": {"keep_ratio": 0.25}}).key != spelled[0].key
    for s in ("visionzip", "cdpruner", "none", {"method": "divprune", "params": {"keep_ratio": 0.5}}):
        served = settings(s)
        assert from_key(served.key) == served
    assert json.loads(settings("cdpruner").key) == {"method": "cdpruner", "keep_ratio": 64 / 576, "theta": 1.0}


def test_a_request_refines_the_servers_setting_or_replaces_it():
    server = {"method": "visionzip", "params": {"dominant": 20, "contextual": 4}}
    assert settings({"params": {"contextual": 0}}, base=server).config == VisionZipConfig(20, 0)
    assert settings({"method": "divprune"}, base=server).config == DivPruneConfig()  # its own defaults
    assert settings(None, base=server).config == VisionZipConfig(20, 4)
    assert settings("none", base=server).config is None


def test_placeholder_counts_are_the_grid_and_the_setting_alone():
    for n in (16, 64, 100, 256, 1024):  # VisionZip: each frame its share of 54 + 10 of 576
        expected = round(54 * n / 576) + round(10 * n / 576)
        assert settings("visionzip").kept_of([n]) == max(1, min(n, expected))
        assert settings("visionzip").kept_of([n, n, n]) == 3 * max(1, min(n, expected))  # per frame
        assert settings({"method": "divprune", "params": {"keep_ratio": 0.25}}).kept_of([n, n]) == round(2 * n / 4)
        assert settings("none").kept_of([n, n]) == 2 * n
    assert settings({"method": "visionzip", "params": {"dominant": 90, "contextual": 10}}).kept_of([64]) == 64


@pytest.mark.parametrize("setting, says", [
    ("transprune", "transprune prunes inside the LLM, which vLLM cannot serve"),
    ("fastv", "fastv prunes inside the LLM"),
    ("visionzip+transprune", "serve its pre-LLM stage alone with method='visionzip'"),
    ("visionzip192+transprune", "serve its pre-LLM stage alone with method='visionzip'"),
    ("bogus", "unknown method 'bogus'"),
    ({"method": "divprune", "params": {"keep_ratio": 2}}, "keep_ratio must be a number in (0, 1]"),
    ({"method": "divprune", "params": {"dominant": 3}}, "unknown parameter(s) ['dominant'] for divprune; allowed: keep_ratio"),
    ({"method": "divprune", "keep_ratio": 0.5}, "unknown key(s) ['keep_ratio'] in setting; allowed: method, preset, params"),
    ({"method": "none", "params": {"keep_ratio": 0.5}}, "method 'none' takes no preset or params"),
    (0.5, "setting must be a method string or a dict"),
    ({"method": "divprune", "params": [0.5]}, "'params' must be a dict"),
])
def test_a_wrong_setting_is_one_error_naming_what_is_allowed(setting, says):
    with pytest.raises(ValueError) as err:
        settings(setting)
    assert says in str(err.value)
    assert str(err.value).startswith("transprune: ")


def test_refusals_name_the_served_methods():
    with pytest.raises(ValueError, match="served methods: visionzip, divprune, cdpruner, or 'none'"):
        settings("pdrop")
    assert served_methods() == ["visionzip", "divprune", "cdpruner"]


def test_hf_overrides_names_our_architecture_and_checks_the_setting():
    overrides = hf_overrides("visionzip", dominant=20, contextual=4)
    assert overrides["architectures"] == [ARCHS["Qwen2_5_VLForConditionalGeneration"].name]
    assert settings(overrides["transprune"]).config == VisionZipConfig(20, 4)
    assert json.loads(json.dumps(overrides)) == overrides  # what `vllm serve --hf-overrides` takes
    with pytest.raises(ValueError, match="prunes inside the LLM"):
        hf_overrides("fastv")
    with pytest.raises(ValueError, match="architecture='GemmaForCausalLM': the vLLM plugin serves"):
        hf_overrides("visionzip", architecture="GemmaForCausalLM")
    llava = hf_overrides("divprune", architecture="LlavaForConditionalGeneration")
    assert llava["architectures"] == ["TransPruneLlavaForConditionalGeneration"]
    with pytest.raises(ValueError, match="VisionZip reads the vision tower, which the vLLM plugin wires on "
                                         "TransPruneQwen2_5_VLForConditionalGeneration, "
                                         "TransPruneQwen3VLForConditionalGeneration only"):
        hf_overrides("visionzip", architecture="LlavaNextForConditionalGeneration")
