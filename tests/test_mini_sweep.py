"""`python -m transprune.mini.sweep`: the layer sweep of the mini testbed (mechanics, on an untrained model)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from transprune import FastVConfig, RandomConfig, TransPruneConfig, pruned
from transprune.mini.evaluate import evaluate, questions
from transprune.mini.model import IMAGE_TOKENS, PATCH_SIZE, load_mini, prompt
from transprune.mini.sweep import RULES, main, rule_config, run_sweep

LAYERS = (2, 11)  # an early layer and the last one IGA allows in the 12-layer decoder
KEEPS = (0.5, 0.125)


@pytest.fixture(scope="module")
def loaded(random_mini):
    return load_mini(random_mini)


@pytest.fixture(scope="module")
def samples():
    return questions(8)


@pytest.fixture(scope="module")
def result(loaded, samples):
    model, processor = loaded
    return run_sweep(model, processor, RULES, KEEPS, LAYERS, batch_size=3, progress=False, samples=samples)


def _row(result, rule, keep, layer):
    (row,) = [r for r in result["rows"] if (r["rule"], r["keep"], r["layer"]) == (rule, keep, layer)]
    return row


def _relevant(sample):
    return np.flatnonzero(sample.relevant_patches(PATCH_SIZE).reshape(-1))


def test_configs_are_the_documented_ones():
    ttv = rule_config("ttv", 0.125, 4)
    assert ttv == TransPruneConfig(pruning_layers=(4,), keep_ratios=(0.125,), accumulation_layers=(1, 2, 3, 4),
                                   score="ttv", reference_depth=None)
    assert rule_config("iga", 0.5, 4).score == "iga"
    both = rule_config("ttv+iga", 0.5, 4)
    assert both.score == "transprune" and both.alpha == 0.5 and both.positions == "compact"
    assert rule_config("fastv", 0.125, 11) == FastVConfig(k=11, r=0.875, reference_depth=None)
    assert rule_config("fastv", 0.125, 11).positions == "original"
    assert rule_config("random", 0.5, 1) == RandomConfig(pruning_layers=(1,), keep_ratios=(0.5,), reference_depth=None)
    # Absolute layer numbers: on the 12-layer decoder every L in 1..11 is used as given.
    for rule in RULES:
        for layer in (1, 11):
            assert rule_config(rule, 0.5, layer).layers_for_depth(12).pruning_layers == (layer,)


def test_every_rule_keep_layer_has_a_row_with_the_exact_kept_count(result, samples):
    assert [(r["rule"], r["keep"], r["layer"]) for r in result["rows"]] == [
        (rule, keep, layer) for rule in RULES for keep in KEEPS for layer in LAYERS]
    assert result["n"] == len(samples)
    for row in result["rows"]:
        assert row["after_layer"] == row["layer"]
        assert row["tokens"] == int(IMAGE_TOKENS * row["keep"])  # every sample keeps exactly this many
        assert row["kept_share"] == int(IMAGE_TOKENS * row["keep"]) / IMAGE_TOKENS
        assert 0.0 <= row["recall"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0
        assert set(row["accuracy_by_type"]) == {s.qtype for s in samples}
    assert list(_row(result, "ttv", 0.5, 11)["config"]["accumulation_layers"]) == list(range(1, 12))


@pytest.mark.parametrize("rule, keep, layer", [("ttv+iga", 0.125, 2), ("iga", 0.5, 11), ("fastv", 0.125, 11),
                                               ("ttv", 0.5, 2)])
def test_a_row_equals_an_independent_one_by_one_run(loaded, samples, result, rule, keep, layer):
    model, processor = loaded
    config = rule_config(rule, keep, layer)
    hits, recalls, hits_by_type = [], [], {}
    for s in samples:
        inputs = processor(images=s.image, text=prompt(s.question), return_tensors="pt")
        answer = processor.tokenizer.convert_tokens_to_ids(s.answer)
        with torch.no_grad(), pruned(model, config) as handle:
            hit = int(model(**inputs).logits[0, -1].argmax()) == answer
            (kept,) = handle.last_stats[0].kept_indices
        hits.append(hit)
        hits_by_type.setdefault(s.qtype, []).append(hit)
        if len(_relevant(s)):
            recalls.append(np.isin(_relevant(s), kept).mean())
    row = _row(result, rule, keep, layer)
    assert row["accuracy"] == pytest.approx(np.mean(hits))
    assert row["accuracy_by_type"] == pytest.approx({t: np.mean(h) for t, h in hits_by_type.items()})
    assert row["recall"] == pytest.approx(np.mean(recalls))


def test_random_recall_is_recomputed_from_last_stats(loaded, samples, result):
    model, processor = loaded
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[s.image for s in samples], text=[prompt(s.question) for s in samples],
                       padding=True, return_tensors="pt")
    for keep in KEEPS:
        with torch.no_grad(), pruned(model, RandomConfig(pruning_layers=(2,), keep_ratios=(keep,),
                                                         reference_depth=None)) as handle:
            model(**inputs)  # one batch of all samples (the sweep used batches of 3)
            stats = handle.last_stats
        recalls = [np.isin(_relevant(s), st.kept_indices[0]).mean() for s, st in zip(samples, stats)
                   if len(_relevant(s))]
        assert _row(result, "random", keep, 2)["recall"] == pytest.approx(np.mean(recalls))


def test_the_unpruned_accuracy_is_evaluates(loaded, samples, result):
    model, processor = loaded
    (none,) = evaluate(model, processor, ["none"], batch_size=8, progress=False, samples=samples)
    assert result["unpruned"]["accuracy"] == none.accuracy
    assert result["unpruned"]["accuracy_by_type"] == none.accuracy_by_type


def test_json_has_every_row_and_the_record(random_mini, capsys):
    argv = ["--model", str(random_mini), "--n", "4", "--layers", "1,3-4", "--keeps", "0.25", "--rules",
            "ttv,random", "--batch-size", "4", "--threads", "1", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert {(r["rule"], r["keep"], r["layer"]) for r in out["rows"]} == {
        (rule, 0.25, layer) for rule in ("ttv", "random") for layer in (1, 3, 4)}
    assert len(out["rows"]) == 6 and all(r["tokens"] == 64 for r in out["rows"])
    assert out["n"] == 4 and 0.0 <= out["unpruned"]["accuracy"] <= 1.0
    assert out["machine"] and out["command"] == "python -m transprune.mini.sweep " + " ".join(argv)
    assert out["layers"] == [1, 3, 4] and out["model"] == str(random_mini)


def test_table_and_plot(random_mini, tmp_path, capsys):
    png = tmp_path / "sweep.png"
    assert main(["--model", str(random_mini), "--n", "3", "--layers", "1,5", "--rules", "iga,fastv",
                 "--threads", "1", "--plot", str(png)]) == 0
    table = capsys.readouterr().out.splitlines()
    header = next(line for line in table if line.startswith("| L |"))
    assert header == "| L | iga 50% | iga 12.5% | fastv 50% | fastv 12.5% |"
    body = [line for line in table if line.startswith("| 1 |") or line.startswith("| 5 |")]
    assert len(body) == 2 and all(line.count(" / ") == 4 for line in body)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, field, allowed", [
    (["--rules", "ttv,fastvv"], "--rules", "choose from ttv, iga, ttv+iga, fastv, random"),
    (["--keeps", "0.5,0"], "--keeps", "(0, 1]"),
    (["--keeps", "1.5"], "--keeps", "(0, 1]"),
    (["--layers", "0,3"], "--layers", "1..11"),
    (["--layers", "2-12"], "--layers", "1..11"),
    (["--layers", "two"], "--layers", "1..11"),
    (["--n", "0"], "--n", ">= 1"),
])
def test_bad_arguments_exit_2_naming_the_field_before_loading(random_mini, monkeypatch, capsys, args, field,
                                                              allowed):
    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for bad arguments")

    monkeypatch.setattr("transprune.mini.model.load_mini", no_load)
    assert main(["--model", str(random_mini), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and allowed in err


def test_plot_without_matplotlib_and_missing_checkpoint_exit_2(random_mini, tmp_path, monkeypatch, capsys):
    assert main(["--model", str(tmp_path)]) == 2
    assert "no mini checkpoint at" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["--model", str(random_mini), "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_runs_as_a_module(tmp_path):
    done = subprocess.run([sys.executable, "-m", "transprune.mini.sweep", "--model", str(tmp_path), "--rules", "ttvv"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--rules: unknown 'ttvv'" in done.stderr
