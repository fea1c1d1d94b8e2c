"""The decoder-only probe: perfect image tokens in place of the vision tower, stage 2 of train-mini unchanged."""

import json

import pytest
import torch

from transprune.mini import data
from transprune.mini.model import build_mini, prompt
from transprune.mini.probe import PerfectImageTokens, _accuracy, main, probe
from transprune.mini.train import Batcher, TrainConfig, init_decoder


def test_perfect_tokens_are_the_sum_of_one_embedding_per_label():
    tokens = PerfectImageTokens(8)
    image, objects, masks, _ = data.scene("train", 0)
    labels = {k: torch.from_numpy(v)[None] for k, v in data.patch_labels(objects, masks, 6).items()}
    out = tokens(labels)
    at = int(labels["colour"][0].nonzero()[0, 0])  # an object patch
    expected = sum(tokens.tables[k].weight[labels[k][0, at]] for k in ("colour", "shape", "size", "digit", "centre",
                                                                       "row", "column"))
    assert out.shape == (1, 256, 8)
    torch.testing.assert_close(out[0, at], expected)
    assert not torch.equal(out[0, 0], out[0, 1])  # background patches still differ by position


def test_probe_accuracy_matches_full_sequences():
    """The probe's shared-prefix greedy answers == argmax of each full prompt run on its own, with the perfect
    tokens spliced in where the image goes."""
    torch.manual_seed(0)
    model = build_mini(seed=1).eval()
    init_decoder(model, 0.15, seed=2)  # a decoder whose answers vary from question to question
    tokens = PerfectImageTokens(model.config.text_config.hidden_size)
    batcher = Batcher()
    batch = batcher.batch(0, 4, split="val")
    cfg = TrainConfig(attn_heads=0, deep_layer=0)
    acc = _accuracy(model, tokens, [batch], cfg)
    lm = model.model.language_model
    hits, answers = {}, set()
    with torch.no_grad():
        for index in range(4):
            image, objects, masks, rng = data.scene("val", index)
            labels = {k: torch.from_numpy(v)[None] for k, v in data.patch_labels(objects, masks, 6).items()}
            for q in data.scene_questions(rng, objects, masks):
                head, tail = batcher.split_prompt(q.question)
                embeds = torch.cat([lm.embed_tokens(torch.tensor(head))[None], tokens(labels),
                                    lm.embed_tokens(torch.tensor(tail))[None]], dim=1)
                predicted = int(model.lm_head(lm(inputs_embeds=embeds).last_hidden_state[0, -1]).argmax())
                answers.add(predicted)
                hits.setdefault(q.qtype, []).append(predicted == batcher.answer_id(q.answer))
    assert len(answers) > 1
    assert acc == {**{k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())},
                   "overall": round(sum(sum(v) for v in hits.values()) / 20, 3)}


def test_probe_is_deterministic_and_logs_every_type(capsys):
    cfg = TrainConfig(steps=2, scenes_per_step=2, warmup=1, eval_every=1, gather_layer=2)
    first = probe(cfg, val_scenes=3, progress=False, log=lambda *a, **k: None)
    second = probe(cfg, val_scenes=3, progress=False, log=lambda *a, **k: None)
    strip = [{k: v for k, v in e.items() if k != "minutes"} for e in first["history"]]
    assert strip == [{k: v for k, v in e.items() if k != "minutes"} for e in second["history"]]
    assert [e["step"] for e in first["history"]] == [1, 2]
    assert set(first["history"][-1]["val"]) == set(data.QUESTION_TYPES) | {"overall"}
    assert {"answer", "attention", "gather", "deep"} <= set(first["history"][-1])


def test_probe_command_prints_json_and_rejects_bad_options(capsys):
    assert main(["--steps", "1", "--scenes-per-step", "1", "--val-scenes", "2", "--quiet", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["history"][-1]["step"] == 1 and record["val_scenes"] == 2
    assert main(["--steps", "1", "--find-layer", "13", "--quiet"]) == 2
    assert "find_layer=13" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--val-scenes", "0"])
