import json

import pytest

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
                 "visionzip,fastv", "--set", "dominant=20", "--set", "contextual=4", "--set", "k=3",
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
