"""`transprune eval --suite mini`, `transprune demo` and the shipped mini checkpoint."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from transprune import TransPruneConfig, pruned
from transprune.cli import main
from transprune.flops import estimate, arch_from_config
from transprune.mini import data
from transprune.mini.card import FIRST
from transprune.mini.evaluate import SUITE, evaluate, questions, resolve
from transprune.mini.model import PATCH_SIZE, checkpoint_path, load_mini, prompt


@pytest.fixture(scope="module")
def shipped():
    return load_mini()


def test_unknown_method_names_are_rejected_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown .transprune-medium.; choose suite entries \(none, transprune-high"):
        resolve("none,transprune-medium")
    assert resolve(None) == list(SUITE)


def test_accuracy_recall_and_tflops_match_an_independent_computation(random_mini):
    model, processor = load_mini(random_mini)
    samples = questions(12)
    results = evaluate(model, processor, ["none", "transprune-high"], batch_size=5, progress=False,
                       samples=samples)
    none, high = results
    # Independent: unbatched, unpruned forward passes and the same for pruned with kept indices.
    hits_none, hits_high, recalls = [], [], [[], [], []]
    for s in samples:
        inputs = processor(images=s.image, text=prompt(s.question), return_tensors="pt")
        answer = processor.tokenizer.convert_tokens_to_ids(s.answer)
        with torch.no_grad():
            hits_none.append(int(model(**inputs).logits[0, -1].argmax()) == answer)
            with pruned(model, TransPruneConfig.preset("high", reference_depth=32)) as handle:
                hits_high.append(int(model(**inputs).logits[0, -1].argmax()) == answer)
                stats = handle.last_stats[0]
        relevant = np.flatnonzero(s.relevant_patches(PATCH_SIZE))
        if len(relevant):
            for k in range(3):
                recalls[k].append(np.isin(relevant, stats.kept_indices[k]).mean())
    assert none.accuracy == pytest.approx(np.mean(hits_none)) and none.stages == []
    assert high.accuracy == pytest.approx(np.mean(hits_high))
    assert [s["recall"] for s in high.stages] == pytest.approx([np.mean(r) for r in recalls])
    assert [s["after_layer"] for s in high.stages] == [3, 4, 5]
    assert [s["tokens"] for s in high.stages] == [224, 160, 32]
    expected = estimate(TransPruneConfig.preset("high", reference_depth=32), arch_from_config(random_mini))
    assert high.tflops_ratio == pytest.approx(expected.ratio)
    assert none.tflops_ratio == 1.0


def test_every_suite_method_runs_with_its_stage_counts(random_mini):
    model, processor = load_mini(random_mini)
    results = evaluate(model, processor, None, batch_size=4, progress=False, samples=questions(4))
    by_name = {r.name: r for r in results}
    assert set(by_name) == set(SUITE)
    assert [s["tokens"] for s in by_name["transprune-low"].stages] == [160, 48, 16]
    assert [s["after_layer"] for s in by_name["visionzip"].stages] == [0]
    assert by_name["visionzip"].stages[0]["tokens"] == 85
    assert [s["tokens"] for s in by_name["visionzip+transprune"].stages] == [85, 42, 21, 10]
    assert [s["tokens"] for s in by_name["fastv"].stages] == [128]
    for r in results:
        assert all(0.0 <= s["recall"] <= 1.0 for s in r.stages)
        assert 0 < r.tflops_ratio <= 1.0


def test_eval_cli_json_and_errors(random_mini, capsys):
    assert main(["eval", "--suite", "mini", "--model", str(random_mini), "--methods", "none,random",
                 "--n", "6", "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out["results"]] == ["none", "random"] and out["results"][0]["n"] == 6
    assert main(["eval", "--suite", "mini", "--model", str(random_mini), "--methods", "fastvv"]) == 2
    assert "choose suite entries" in capsys.readouterr().err
    assert main(["eval", "--suite", "mini", "--model", str(random_mini), "--n", "0"]) == 2
    assert "--n and --batch-size must be >= 1" in capsys.readouterr().err


def test_eval_plot_writes_a_picture(random_mini, tmp_path, capsys):
    out = tmp_path / "eval.png"
    assert main(["eval", "--suite", "mini", "--model", str(random_mini), "--methods", "none,random,fastv,divprune",
                 "--n", "4", "--batch-size", "4", "--threads", "1", "--budget", "0.5", "--plot", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 500 and image.size[1] > 150
    assert "| divprune |" in capsys.readouterr().out


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--suite", "mini", "--model", str(tmp_path)]) == 2
    assert "no mini checkpoint at" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "train-mini" in capsys.readouterr().err


def test_demo_writes_a_picture_and_reports_stages(random_mini, tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert main(["demo", "--model", str(random_mini), "--out", str(png), "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept_per_stage"] == [[3, 224], [4, 160], [5, 32]]
    assert out["question"] == data.sample("test", 3).question and out["expected"] == data.sample("test", 3).answer
    picture = Image.open(png)
    assert picture.size == (4 * 192, 4 * 210 + 4)  # header row + one row per stage
    image = tmp_path / "mine.png"
    data.sample("val", 0).image.save(image)
    assert main(["demo", "--model", str(random_mini), "--image", str(image), "--prompt", "is there a red circle ?",
                 "--out", str(png), "--threads", "1"]) == 0
    assert "kept per stage" in capsys.readouterr().out
    assert main(["demo", "--image", str(image)]) == 2  # --prompt missing


def test_shipped_checkpoint_answers_as_its_card_says(shipped):
    """The package ships a trained checkpoint; on the first 100 test questions it answers as many right as
    its model card records (one question of slack for another CPU's kernels), and its card meets the bar."""
    model, processor = shipped
    card = (checkpoint_path() / "README.md").read_text()
    recorded = int(re.search(re.escape(FIRST.format(k=100)) + r": (\d+)\.", card).group(1))
    result = evaluate(model, processor, ["none"], progress=False, samples=questions(100))[0]
    assert abs(round(100 * result.accuracy) - recorded) <= 1, (result.accuracy, recorded)
    overall = float(re.search(r"\| \*\*overall\*\* \| \*\*([\d.]+)%\*\* \(500 questions\)", card).group(1))
    assert overall >= 75.0
    for qtype, accuracy, prior in re.findall(r"^\| (\w+) \| ([\d.]+)% \| ([\d.]+)% ", card, re.M):
        assert float(accuracy) > float(prior), qtype
