"""What a new user meets first: the Quickstart on small checkpoints, clear errors instead of tracebacks, inputs
that would be silently misread, and small images under aggressive compositions."""

import json
import re

import numpy as np
import pytest
import torch

import transprune
from transprune import CDPrunerConfig, TransPruneConfig
from transprune.cli import main
from transprune.loading import load_checkpoint
from transprune.testing import (prompt_inputs, random_image, sample_inputs, save_tiny_checkpoint, tiny_model,
                                tiny_processor)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ck")
    random_image(0).save(folder / "image.png")
    return save_tiny_checkpoint(folder / "llava", "llava"), folder / "image.png"


def test_the_quickstart_preset_runs_on_a_shallow_model_mapped_from_the_papers_depth():
    model, processor = tiny_model("llava", seed=0), tiny_processor("llava")
    inputs = sample_inputs(processor, n=1, seed=3)
    with pytest.warns(UserWarning, match=r"preset 'high'.*mapped from the paper's 32-layer decoder to "
                                         r"pruning_layers=\(2, 3, 4\).*--set reference_depth=N"):
        handle = transprune.apply(model, TransPruneConfig.preset("high"))
    with handle, torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        stats = handle.last_stats[0]
    with transprune.pruned(model, TransPruneConfig.preset("high", reference_depth=32)) as explicit, torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), tokens)
    assert stats.pruning_layers == explicit.last_stats[0].pruning_layers == (2, 3, 4)
    assert stats.kept_indices == explicit.last_stats[0].kept_indices


def test_a_custom_schedule_that_does_not_fit_names_both_spellings_of_the_fix():
    model = tiny_model("llava", seed=0)
    with pytest.raises(ValueError, match=r"pass reference_depth=N .*\(CLI: --set reference_depth=N; the papers' "
                                         r"settings are written for N=32\)"):
        transprune.apply(model, TransPruneConfig(accumulation_layers=(7,), pruning_layers=(7, 9, 12)))
    assert transprune.handle_of(model) is None


def test_run_without_a_method_works_on_a_small_checkpoint(checkpoint, capsys):
    folder, image = checkpoint
    with pytest.warns(UserWarning, match="preset 'high'"):
        assert main(["run", "--model", str(folder), "--image", str(image), "--prompt", "what is it ?", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pruning_layers"] == [2, 3, 4] and out["n_image_tokens"] == 64


def test_a_small_image_keeps_at_least_one_token_at_every_stage():
    """CDPruner keeps 4 of a 64x64 image's 16 tokens on Qwen3-VL; TransPrune's last ratio (0.125) of 4 rounds to
    0: the stage keeps 1, never 0 (which would lose the image)."""
    model, processor = tiny_model("qwen3_vl", seed=0), tiny_processor("qwen3_vl")
    inputs = prompt_inputs(processor, ["USER: <image>\nwhat is it ? ASSISTANT:"], [random_image(1)])
    config = [CDPrunerConfig(), TransPruneConfig.preset("high", reference_depth=32)]
    with transprune.pruned(model, config) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    stats = handle.last_stats[0]
    assert stats.n_image_tokens == 16
    assert [len(k) for k in stats.kept_indices] == [4, int(4 * 0.875), int(4 * 0.625), 1]
    assert min(stats.visual_tokens_per_layer) == 1


def test_an_error_inside_generate_in_run_is_an_error_line_not_a_traceback(checkpoint, tmp_path, capsys):
    """A llava folder whose config.json says llava_next: the processor makes no image_sizes for that model."""
    import shutil

    folder, image = checkpoint
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    config = json.loads((mixed / "config.json").read_text())
    (mixed / "config.json").write_text(json.dumps({**config, "model_type": "llava_next"}))
    assert main(["run", "--model", str(mixed), "--image", str(image), "--prompt", "what is it ?",
                 "--set", "reference_depth=32"]) == 1
    err = capsys.readouterr().err
    assert "transprune run: error: LlavaNextForConditionalGeneration failed on the inputs LlavaProcessor made" in err
    # the model's own message: 'image_sizes' missing (transformers >= 5.18 encodes before the forward), or None
    # iterated inside it (earlier releases)
    assert ("image_sizes" in err or "'NoneType' object is not iterable" in err) and "Traceback" not in err


def test_a_missing_or_corrupted_config_is_named(tmp_path, capsys):
    for text, message in ((None, f"{tmp_path} has no config.json"),
                          ('{"model_type": "llava",', f"{tmp_path / 'config.json'} is not valid JSON")):
        if text is not None:
            (tmp_path / "config.json").write_text(text)
        with pytest.raises(SystemExit) as exit_:  # --arch is checked while parsing: a usage error
            main(["flops", "--arch", str(tmp_path)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    image = tmp_path / "image.png"
    random_image(0).save(image)
    assert main(["run", "--model", str(tmp_path), "--image", str(image), "--prompt", "what ?"]) == 2
    assert f"{tmp_path / 'config.json'} is not valid JSON" in capsys.readouterr().err


def test_demo_out_to_an_unwritable_place_is_an_error_before_anything_runs(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker / "demo.png")]) == 2
    assert f"--out {blocker / 'demo.png'}: cannot write there ({blocker} is a file, not a folder)" in \
        capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "a folder; give a file name" in capsys.readouterr().err


def test_demo_writes_no_picture_unless_asked(random_mini, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--model", str(random_mini), "--threads", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["png"] is None
    assert list(tmp_path.iterdir()) == []


def test_flops_refuses_a_visionzip_setting_that_apply_refuses(capsys):
    assert main(["flops", "--arch", "llava-1.5-7b", "--method", "visionzip", "--set", "dominant=1000"]) == 2
    err = capsys.readouterr().err
    assert "dominant + contextual = 1010 tokens per image (per tile), more than llava-1.5-7b's 576" in err
    model = tiny_model("llava", seed=0)  # the same rule on a model
    with pytest.raises(ValueError, match="more than the model's 64 patches per tile"):
        transprune.apply(model, transprune.VisionZipConfig(dominant=1000))


def test_generate_without_a_cache_says_that_each_step_prunes_again():
    model, processor = tiny_model("llava", seed=0), tiny_processor("llava")
    inputs = sample_inputs(processor, n=1, seed=4)
    with transprune.pruned(model, TransPruneConfig.preset("high", reference_depth=32)), torch.no_grad():
        with pytest.warns(UserWarning, match=r"use_cache=False.*each step prunes again"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, use_cache=False)


def test_idefics3_has_a_tiny_processor_and_a_whole_checkpoint(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "idefics3", "idefics3")
    model, processor = load_checkpoint(str(folder))
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(processor).__name__ == "Idefics3Processor"
    built = prompt_inputs(tiny_processor("idefics3"), ["USER: <image>\nwhat ? ASSISTANT:"], [random_image(2)])
    loaded = prompt_inputs(processor, ["USER: <image>\nwhat ? ASSISTANT:"], [random_image(2)])
    assert all(torch.equal(built[k], loaded[k]) for k in built)
    with torch.no_grad():
        assert torch.equal(model(**loaded).logits, tiny_model("idefics3", seed=0)(**built).logits)


@pytest.mark.parametrize("layers, ratios", [((2,), ("0.5",)), ((2,), (True,)), ((2,), "0.5"), ((2, 3), (0.5, "0.25"))])
def test_keep_ratios_must_be_numbers(layers, ratios):
    with pytest.raises(TypeError, match="keep_ratios must"):
        TransPruneConfig(accumulation_layers=(2,), pruning_layers=layers, keep_ratios=ratios)


def test_budget_takes_numpy_scalars_and_0d_tensors():
    model = tiny_model("llava", seed=0)
    config = TransPruneConfig.preset("high", reference_depth=32)
    want = transprune.budget(config, model, 0.5)
    for target in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        assert transprune.budget(config, model, target) == want
    with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\]"):
        transprune.budget(config, model, torch.tensor([0.5, 0.4]))


def test_the_shipped_mini_model_answers_a_prompt_that_ends_with_the_image():
    """The README's own prompt shape, ``"USER: what is this ? <image>"``: pruned, the last image token (which predicts
    the answer) stays, so the answer is the unpruned model's word, never the ``<unk>`` of a dropped row."""
    from transprune import DivPruneConfig
    from transprune.mini import data
    from transprune.mini.model import load_mini

    model, processor = load_mini()
    sample = data.sample("test", 0)
    inputs = processor(images=sample.image, text=f"USER: {sample.question} <image>", return_tensors="pt")

    def answer():
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        return processor.decode(out[0, inputs["input_ids"].shape[1]:])

    unpruned = answer()
    assert "<unk>" not in unpruned
    for config in (TransPruneConfig.preset("high", reference_depth=32), DivPruneConfig()):
        with transprune.pruned(model, config):
            assert answer() == unpruned


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "llava"])
def test_load_processor_loads_any_supported_folder_without_torchvision(tmp_path, kind):
    """Qwen's AutoProcessor needs torchvision for its video processor, which the install leaves out: the public
    loader gives the same processor for images (the same inputs as the one the folder was saved from)."""
    import importlib.util

    from transprune.testing import qwen_sample_inputs

    folder = save_tiny_checkpoint(tmp_path / kind, kind)
    processor = transprune.load_processor(folder)
    if kind == "qwen2_5_vl":
        assert importlib.util.find_spec("torchvision") is None  # the case this loader is for
        made = [qwen_sample_inputs(p, 2, seed=3) for p in (processor, tiny_processor(kind))]
    else:
        made = [sample_inputs(p, 2, seed=3) for p in (processor, tiny_processor(kind))]
    assert set(made[0]) == set(made[1]) and all(torch.equal(made[0][k], made[1][k]) for k in made[1])
    with pytest.raises(ValueError, match="folder must be a local checkpoint folder with a config.json"):
        transprune.load_processor(tmp_path / "nothing")


def test_the_readme_quickstart_runs_as_written_on_the_shipped_mini_model():
    from pathlib import Path

    from transprune.mini.model import checkpoint_path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("## Quickstart (Python)")[1].split("```python")[1].split("```")[0]
    scope = {"path": str(checkpoint_path()), "image": random_image(0, (96, 96))}
    with pytest.warns(UserWarning, match="preset 'high'"):
        exec(block, scope)  # noqa: S102 - the README's own code
    assert scope["stats"].pruning_layers == (3, 4, 5) and not scope["handle"].active
    assert scope["stats"].visual_tokens_per_layer[:6] == [256, 256, 256, 224, 160, 32]


def test_a_base_models_chat_template_that_drops_the_image_is_named():
    """The real Qwen2-VL-2B *base* folder's template renders role messages to an empty prompt (it expects a list of
    content parts): the prompt builder names the template and the fix, instead of the model's later
    "0 <|image_pad|> tokens and 1 images"; a prompt that holds the placeholder itself goes through."""
    from transprune.loading import build_prompt

    folder = real_config("qwen2-vl-2b")
    processor = transprune.load_processor(folder)
    with pytest.raises(ValueError, match="chat template renders a user message with 1 image.* to '', with no image "
                                         "placeholder.*<\\|vision_start\\|><\\|image_pad\\|><\\|vision_end\\|>"):
        build_prompt(processor, "What is in the picture?")
    written = "<|vision_start|><|image_pad|><|vision_end|>What is in the picture?"
    assert build_prompt(processor, written) == written
    inputs = processor(images=[random_image(1)], text=written, return_tensors="pt")
    assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) > 0


def test_visionzip_defaults_prune_on_the_real_smolvlm_folder_and_a_setting_that_keeps_all_says_so(tmp_path, capsys):
    """SmolVLM-256M (real config and processor; text and vision narrowed, random weights): a 64-token crop was
    exactly the old default's 54 + 10, so nothing was pruned and nothing said. The default now keeps the paper's
    share of each crop; a setting that keeps every token warns at apply and after the prefill."""
    from transformers import AutoConfig, Idefics3ForConditionalGeneration

    from transprune import VisionZipConfig
    from transprune.loading import build_prompt

    folder = real_config("smolvlm-256m")
    config = AutoConfig.from_pretrained(folder)
    config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers = 2, 1
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
    processor = transprune.load_processor(folder)
    inputs = processor(images=[random_image(2)], text=build_prompt(processor, "What is it?"), return_tensors="pt")
    crops = inputs["pixel_values"].shape[1]
    n = int((inputs["input_ids"] == config.image_token_id).sum())
    assert n == 64 * crops
    with transprune.pruned(model, VisionZipConfig()) as handle, torch.no_grad():
        model(**inputs)
    assert handle.last_stats[0].visual_tokens_per_layer == [7 * crops] * 2  # 6 + 1 of each 64 (54 + 10 of 576)
    with pytest.warns(UserWarning, match="keeps all 64 tokens of every smolvlm tile"):
        handle = transprune.apply(model, VisionZipConfig(54, 10))
    with handle, torch.no_grad(), pytest.warns(UserWarning, match=f"pruned none of the {n} image tokens"):
        model(**inputs)
    assert handle.last_stats[0].pruned_nothing


def real_config(name):
    """A real public model folder's text files (``../shared/real-configs`` beside the checkout; not shipped)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "shared" / "real-configs" / name
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder} (the real model folders beside the checkout) is not here")
    return folder


def test_run_says_when_a_setting_pruned_nothing(checkpoint, capsys):
    folder, image = checkpoint
    keep_all = ["--method", "visionzip", "--set", "dominant=64", "--set", "contextual=0", "--set", "keep_cls=false"]
    with pytest.warns(UserWarning, match="prunes nothing on this model"):
        assert main(["run", "--model", str(folder), "--image", str(image), "--prompt", "what is it ?"] + keep_all) == 0
    assert re.search(r"\nnote +pruned nothing: every layer kept all 64 image tokens", capsys.readouterr().out)
    with pytest.warns(UserWarning):
        assert main(["run", "--model", str(folder), "--image", str(image), "--prompt", "what is it ?", "--json"]
                    + keep_all) == 0
    assert json.loads(capsys.readouterr().out)["pruned_nothing"] is True
    assert main(["run", "--model", str(folder), "--image", str(image), "--prompt", "what is it ?", "--json",
                 "--method", "visionzip"]) == 0
    assert json.loads(capsys.readouterr().out)["pruned_nothing"] is False


def test_run_on_a_folder_of_an_unsupported_family_is_refused_at_once_with_the_list(tmp_path, capsys):
    from transprune.adapters import supported_model_types

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    random_image(0).save(tmp_path / "image.png")
    assert main(["run", "--model", str(tmp_path), "--image", str(tmp_path / "image.png"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "'mamba' checkpoint" in err and f"supported: {', '.join(supported_model_types())}" in err


def test_the_readmes_model_table_and_arch_list_follow_the_registry():
    """Every registered family's classes have a row in the README's supported-models table, and the `flops --arch`
    line names exactly the registry's full-size archs (`ModelAdapter.archs`), in its order."""
    from pathlib import Path

    from transprune.adapters import supported_model_classes
    from transprune.flops import ARCHS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("Supported models"):readme.index("## Command line")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    listed = {name for row in rows for name in re.findall(r"`(\w+ForConditionalGeneration)`", row.split("|")[2])}
    assert listed == set(supported_model_classes())
    archs = re.search(r"transprune flops --arch (\S+)", readme).group(1).split("|")
    assert archs == [*ARCHS, "PATH/config.json"]
