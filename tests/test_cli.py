import json

import pytest
import torch

from transprune.cli import main
from transprune.testing import random_image, save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_tiny_checkpoint(folder, kind="llava", seed=0, num_hidden_layers=32)
    image = folder / "image.png"
    random_image(3).save(image)
    return folder, image


def test_run_json_reports_answer_tokens_and_tflops(checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, image = checkpoint
    assert main(["run", "--model", str(folder), "--image", str(image), "--prompt", "what is the colour ?",
                 "--preset", "high", "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] and out["preset"] == "high"
    assert out["n_image_tokens"] == 64
    assert out["visual_tokens_per_layer"] == [64] * 7 + [56] * 2 + [40] * 3 + [8] * 20
    assert [len(k) for k in out["kept_indices"]] == [56, 40, 8]
    assert 0 < out["tflops"] < out["tflops_unpruned"]


def test_run_text_output_and_off_preset(checkpoint, capsys):
    folder, image = checkpoint
    assert main(["run", "--model", str(folder), "--image", str(image), "--prompt", "what is the colour ?",
                 "--preset", "off", "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out
    assert "32x64" in text and "(100.0% of" in text and "pruned after layers       none" in text


def test_run_rejects_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    image = tmp_path / "i.png"
    random_image(0).save(image)
    assert main(["run", "--model", str(tmp_path), "--image", str(image), "--prompt", "hi"]) == 2
    assert "local checkpoint folder" in capsys.readouterr().err


def test_run_rejects_unknown_preset(checkpoint):
    folder, image = checkpoint
    with pytest.raises(SystemExit) as exc:
        main(["run", "--model", str(folder), "--image", str(image), "--prompt", "hi", "--preset", "max"])
    assert exc.value.code == 2


def test_run_with_a_composition(checkpoint, capsys):
    folder, image = checkpoint
    assert main(["run", "--model", str(folder), "--image", str(image), "--prompt", "what ?", "--method",
                 "visionzip+fastv", "--set", "dominant=20", "--set", "contextual=4", "--set", "k=3",
                 "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [m["method"] for m in out["method"]] == ["visionzip", "fastv"]
    assert [len(k) for k in out["kept_indices"]] == [24, 12] and out["kept_after_layer"] == [0, 3]
    assert out["visual_tokens_per_layer"] == [24] * 3 + [12] * 29


def test_flops_methods_json(capsys):
    assert main(["flops", "--arch", "llava-1.5-7b", "--method", "pdrop", "--json"]) == 0
    assert round(json.loads(capsys.readouterr().out)["tflops"], 2) == 1.78
    assert main(["flops", "--arch", "llava-1.5-7b", "--preset", "visionzip288+transprune", "--json"]) == 0
    assert round(json.loads(capsys.readouterr().out)["tflops"], 2) == 0.66
    assert main(["flops", "--arch", "llava-1.5-7b", "--method", "fastv", "--set", "z=1"]) == 2
    assert "allowed: k, positions, r, reference_depth" in capsys.readouterr().err


def test_cli_mistakes_exit_2_with_one_line_before_any_work(tmp_path, capsys):
    """Each mistake a user makes on the command line: exit 2, one line on stderr naming the option or field."""
    from transprune.mini.model import build_mini, mini_processor
    from transprune.testing import random_image, save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "tiny")
    image = tmp_path / "img.png"
    random_image(0).save(image)
    mini = tmp_path / "mini"
    build_mini(seed=0).save_pretrained(mini)
    mini_processor().save_pretrained(mini)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    run = ["run", "--model", str(ckpt), "--image", str(image), "--prompt", "hi"]
    cases = [
        (run + ["--method", "visionzip", "--set", "dominant=100"], "more than the model's 64 patches"),
        (run + ["--method", "pdrop"], "do not fit a 8-layer decoder"),  # PDrop's layers as written, on 8 layers
        (run + ["--max-new-tokens", "0"], "--max-new-tokens"),
        (["eval", "--suite", "mini", "--model", str(mini), "--threads", "0"], "--threads"),
        (["eval", "--suite", "mini", "--model", str(ckpt), "--n", "5"], "is not a mini checkpoint"),
        (["bench", "--arch", "llava-1.5-reduced", "--attn", "flash_attention_2", "--methods", "none"], "flash"),
        (["train-mini", "--out", str(tmp_path / "x"), "--lr", "-1"], "lr=-1.0"),
        (["train-mini", "--out", str(tmp_path / "x"), "--init", str(tmp_path / "empty")], "init="),
        (["train-mini", "--out", str(tmp_path / "file")], "an existing file"),
    ]
    if not torch.cuda.is_available():
        cases.append((["bench", "--arch", "llava-1.5-reduced", "--device", "cuda", "--methods", "none"], "no CUDA"))
    for argv, message in cases:
        with pytest.raises(SystemExit) if "--max-new-tokens" in message or "--threads" in message else _nothing():
            assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]  # loading bars aside
        assert message in err and "Traceback" not in err, (argv, err)
        errors = [line for line in lines if line.startswith("transprune") and "error:" in line]
        assert len(errors) == 1 and message in errors[0], lines
        assert lines[0].startswith("usage") or len(lines) == 1, lines  # only argparse adds its usage
    assert not (tmp_path / "x").exists()
    # a single value for a one-stage sequence field is accepted
    assert main(run + ["--set", "pruning_layers=2", "--set", "keep_ratios=0.5", "--set", "accumulation_layers=2",
                       "--max-new-tokens", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pruning_layers"] == [2]


def _nothing():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("method", [["--preset", "high"], ["--method", "visionzip", "--set", "dominant=10",
                                                           "--set", "contextual=2"]], ids=["transprune", "visionzip"])
def test_run_on_a_qwen_checkpoint_uses_its_processor_and_chat_template(tmp_path, capsys, method):
    folder = save_tiny_checkpoint(tmp_path / "qwen", kind="qwen2_5_vl", num_hidden_layers=28)
    image = tmp_path / "i.png"
    random_image(0, size=(128, 96)).save(image)  # 8 x 6 merged tokens
    assert main(["run", "--model", str(folder), "--image", str(image), "--prompt", "what is the colour ?",
                 *method, "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_image_tokens"] == 48 and out["positions"] == "original"
    if method[0] == "--preset":  # layers 7, 9, 12 as written, of 48 tokens
        assert [len(k) for k in out["kept_indices"]] == [42, 30, 6]
    else:
        assert [len(k) for k in out["kept_indices"]] == [12] and out["kept_after_layer"] == [0]


def test_flops_reports_the_position_rule_the_family_runs(capsys):
    """The rule shown is the one `apply` would use: Qwen's own for a defaulted rule; an explicit rule the
    family cannot honour is the same error as `apply`'s."""
    assert main(["flops", "--arch", "qwen2.5-vl-7b", "--preset", "high", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["positions"] == "original" and round(100 * out["ratio_token_linear"], 1) == 45.1
    assert main(["flops", "--arch", "qwen2.5-vl-7b", "--preset", "high"]) == 0
    assert "positions=original" in capsys.readouterr().out
    assert main(["flops", "--arch", "llava-1.5-7b", "--preset", "high", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["positions"] == "compact"
    assert main(["flops", "--arch", "qwen2.5-vl-7b", "--preset", "high", "--set", "positions=compact"]) == 2
    assert "not supported on the qwen2-vl family" in capsys.readouterr().err


def test_flops_image_size_sets_the_token_count_on_qwen(capsys):
    assert main(["flops", "--arch", "qwen2.5-vl-7b", "--preset", "high", "--image-size", "896x448", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image_tokens"] == 32 * 16 and out["image_size"] == [896, 448]
    assert out["visual_tokens_per_layer"][:7] == [512] * 7 and out["visual_tokens_per_layer"][-1] == 64
    assert main(["flops", "--arch", "qwen3-vl-8b", "--image-size", "512x256", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image_tokens"] == 16 * 8  # 32-pixel tokens on Qwen3-VL
    assert main(["flops", "--arch", "qwen2.5-vl-7b", "--image-size", "900x448"]) == 2
    assert "multiple of 28 pixels" in capsys.readouterr().err
    assert main(["flops", "--arch", "llava-1.5-7b", "--image-size", "448x448"]) == 2
    assert "fixed 576 image tokens" in capsys.readouterr().err


def test_every_typed_cli_option_refuses_a_bad_value_with_usage_exit_2(capsys):
    """Walk the parser: every option that takes a typed value or a choice, on every subcommand, given a value
    that is neither, exits 2 at parsing with an error naming the option (nothing is loaded first)."""
    import argparse

    from transprune.cli import build_parser

    required = {"flops": ["--arch", "llava-1.5-7b"], "run": ["--model", "m", "--image", "i", "--prompt", "p"],
                "eval": ["--suite", "mini"], "train-mini": ["--out", "o"], "bench": ["--arch", "llava-1.5-reduced"],
                "demo": []}
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(required)
    walked = 0
    for command, parser in subparsers.choices.items():
        for action in parser._actions:
            if not action.option_strings or (action.type is None and action.choices is None) or action.nargs == 0:
                continue
            option = action.option_strings[0]
            with pytest.raises(SystemExit) as exc:
                main([command, *required[command], option, "nope?"])
            assert exc.value.code == 2
            err = capsys.readouterr().err
            assert f"argument {option}" in err and "Traceback" not in err, (command, option, err)
            walked += 1
    assert walked >= 30


def test_bench_device_that_is_no_device_is_one_line(capsys):
    assert main(["bench", "--arch", "llava-1.5-reduced", "--device", "nope", "--methods", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "transprune bench: error: --device 'nope' is not a torch device (e.g. cpu, cuda, cuda:1)"


@pytest.mark.parametrize("kind, tokens", [("smolvlm", 80), ("llava_onevision", 268), ("gemma3", 16)])
def test_run_on_more_families_uses_their_processor_and_chat_template(tmp_path, capsys, kind, tokens):
    folder = save_tiny_checkpoint(tmp_path / kind, kind=kind, num_hidden_layers=16)
    image = tmp_path / "i.png"
    random_image(0, size=(128, 96)).save(image)
    assert main(["run", "--model", str(folder), "--image", str(image), "--prompt", "what is the colour ?",
                 "--preset", "high", "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_image_tokens"] == tokens and out["positions"] == "compact"
    assert [len(k) for k in out["kept_indices"]] == [int(tokens * r) for r in (0.875, 0.625, 0.125)]
