"""The mini LLaVA's tokenizer / processor, the training step's prefix-sharing trick, and the trainer."""

import shlex
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, LlavaForConditionalGeneration

from transprune.mini import data
from transprune.mini.model import (EOS_ID, IMAGE_ID, IMAGE_TOKENS, PATCH_SIZE, build_mini, mini_config,
                                   mini_processor, prompt)
from transprune.cli import build_parser, train_config
from transprune.mini.card import command, write_card
from transprune.mini.train import (AUX_CLASSES, Batcher, TrainConfig, _patch_batch, focus_targets, forward_losses,
                                   init_decoder, patch_accuracy, train)


def test_every_generated_question_and_answer_is_in_the_vocabulary():
    tokenizer = mini_processor().tokenizer
    for i in range(100):
        s = data.sample("train", i)
        ids = tokenizer(prompt(s.question))["input_ids"]
        assert tokenizer.unk_token_id not in ids, s.question
        assert len(tokenizer(s.answer, add_special_tokens=False)["input_ids"]) == 1  # one-word answers


def test_geometry_leaves_room_for_the_schedule():
    cfg = mini_config()
    assert cfg.text_config.num_hidden_layers >= 12
    assert IMAGE_TOKENS == (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 == 256


def test_processor_round_trips_through_auto_processor(tmp_path):
    mini_processor().save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    s = data.sample("test", 0)
    inputs = processor(images=s.image, text=prompt(s.question), return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == IMAGE_TOKENS
    assert inputs["pixel_values"].shape == (1, 3, 96, 96)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == prompt(s.question)


def test_patch_labels_name_the_object_at_its_centre():
    image, objects, masks, _ = data.scene("train", 3)
    labels = data.patch_labels(objects, masks, PATCH_SIZE)
    side = 96 // PATCH_SIZE
    for o in objects:
        at = (o.cy // PATCH_SIZE) * side + o.cx // PATCH_SIZE
        assert labels["colour"][at] == list(data.COLOURS).index(o.colour) + 1
        assert labels["shape"][at] == list(data.SHAPES).index(o.shape) + 1
        assert labels["digit"][at] == (0 if o.digit is None else int(o.digit) + 1)
        assert labels["centre"][at] == list(data.COLOURS).index(o.colour) + 1
    assert (labels["colour"] == 0).sum() > 0  # background exists


def test_patch_labels_carry_the_scene_facts_the_questions_ask_for():
    """left_shape / colour_count / shape_count at an object's centre patch must be the answers the question
    generator gives about that object (computed here from the objects, independently of patch_labels)."""
    side = 96 // PATCH_SIZE
    checked_left = 0
    for index in range(40):
        image, objects, masks, _ = data.scene("train", index)
        labels = data.patch_labels(objects, masks, PATCH_SIZE)
        for t in objects:
            at = (t.cy // PATCH_SIZE) * side + t.cx // PATCH_SIZE
            assert labels["size"][at] == list(data.SIZES).index(t.size) + 1
            assert labels["colour_count"][at] == sum(o.colour == t.colour for o in objects)
            assert labels["shape_count"][at] == sum(o.shape == t.shape for o in objects)
            left = [o for o in objects if o.cx < t.cx - t.radius and abs(o.cy - t.cy) <= t.radius + o.radius]
            left.sort(key=lambda o: o.cx)
            clear = left and (len(left) == 1 or left[-1].cx - left[-2].cx > 4)
            expected = list(data.SHAPES).index(left[-1].shape) + 1 if clear else 0
            assert labels["left_shape"][at] == expected
            checked_left += expected > 0
    assert checked_left > 10  # the scenes do have left neighbours
    assert set(labels) == set(data.PATCH_LABELS)
    assert all(int(v.max()) < data.PATCH_LABELS[k] for k, v in labels.items())


@pytest.mark.parametrize("per_type", [1, 2])
def test_shared_prefix_losses_equal_full_sequence_losses(per_type):
    """The trainer runs the image prefix once and repeats its cache per question: the answer loss must be
    the plain next-token loss of each full prompt + answer sequence, and both attention losses must use the
    attention probabilities the model itself computes (eager attention as the reference)."""
    torch.manual_seed(0)
    model = build_mini(seed=1, attn_implementation="eager").eval()
    init_decoder(model, 0.15, seed=2)  # sharper attention than the default init: a stronger check
    batcher = Batcher()
    batch = batcher.batch(0, 2, per_type=per_type)
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(model.config.text_config.hidden_size, c)
                                 for k, c in AUX_CLASSES.items()})
    with torch.no_grad():
        losses = forward_losses(model, heads, batch, questions_per_scene=5 * per_type, attn_layer=8, attn_heads=2)
        focused = forward_losses(model, heads, batch, questions_per_scene=5 * per_type, attn_layer=8, attn_heads=2,
                                 find_layer=5, attn_targets="focus", gather_layer=2)
        focus = focused["attention"]
        answer_losses, eos_losses, attention_losses, focus_losses, gather_losses = [], [], [], [], []
        words = set(batcher.tokenizer.convert_tokens_to_ids(
            list(data.COLOURS) + list(data.SHAPES) + [s + "s" for s in data.SHAPES] + list(data.SIZES)))
        for index in range(2):
            image, objects, masks, rng = data.scene("train", index)
            pixel_values = batcher.pixels([image])
            questions = data.scene_questions(rng, objects, masks, per_type)
            assert len(questions) == 5 * per_type
            for q in questions:
                inputs = batcher.processor(images=image, text=prompt(q.question), return_tensors="pt")
                ids = torch.cat([inputs["input_ids"][0], torch.tensor([batcher.answer_id(q.answer), EOS_ID])])[None]
                out = model(input_ids=ids, pixel_values=pixel_values, output_attentions=True)
                logits = out.logits[0]
                answer_losses.append(F.cross_entropy(logits[-3:-2], ids[0, -2:-1]))
                eos_losses.append(F.cross_entropy(logits[-2:-1], ids[0, -1:]))
                # layer 8's first two heads, from the position that predicts the answer, onto relevant patches
                row = out.attentions[7][0, :2, -3]
                image_cols = (ids[0] == IMAGE_ID).nonzero()[:, 0]
                relevant = torch.from_numpy(q.relevant.reshape(16, 6, 16, 6).any(axis=(1, 3)).reshape(-1))
                if relevant.any():
                    attention_losses.append(-torch.log(row[:, image_cols[relevant]].sum(-1) + 1e-6))
                # gather: layer 2's first two heads onto the question's colour / shape / size words
                row = out.attentions[1][0, :2, -3]
                named = [i for i, t in enumerate(ids[0].tolist()[:-2]) if t in words]
                assert named
                gather_losses.append(-torch.log(row[:, named].sum(-1) + 1e-6))
                # focus: layer 5 to the named objects, layer 8 to those read; <s> + patches; counts: exact shares
                for layer, objects_of in ((5, q.find), (8, q.read)):
                    row = out.attentions[layer - 1][0, :2, -3]
                    probs = torch.cat([row[:, :1], row[:, image_cols]], dim=1)
                    target = torch.zeros(257)
                    for i in objects_of:
                        if q.qtype == "count":  # the patch holding the object's centre
                            target[1 + objects[i].cy // 6 * 16 + objects[i].cx // 6] = 1
                        else:
                            target[1:] += torch.from_numpy(masks[i].reshape(16, 6, 16, 6).any(axis=(1, 3)).reshape(-1))
                    target = (target > 0).float()
                    if q.qtype in ("count", "exists"):
                        target[0] = 1
                        focus_losses.append(-(target / target.sum() * torch.log(probs + 1e-6)).sum(-1))
                    else:
                        focus_losses.append(-torch.log(probs[:, target > 0].sum(-1) + 1e-6))
    torch.testing.assert_close(losses["answer"], torch.stack(answer_losses).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["eos"], torch.stack(eos_losses).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["attention"], torch.cat(attention_losses).mean(), rtol=1e-4, atol=1e-5)
    # the mean over questions and heads of each layer's loss, summed over the two layers
    torch.testing.assert_close(focused["gather"], torch.cat(gather_losses).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(focus, torch.stack(focus_losses).view(-1, 2, 2).mean(dim=(0, 2)).sum(), rtol=1e-4, atol=1e-5)


def test_focus_targets_follow_the_question():
    """Counts: the sink plus one centre patch per counted object (a count of 0: all on the sink); "is there":
    the sink plus the matches' patches; two-object questions: the named object first, the answer's second."""
    seen = set()
    for index in range(40):
        image, objects, masks, rng = data.scene("train", index)
        for q in data.scene_questions(rng, objects, masks):
            target = focus_targets(q, objects, masks)
            assert target.shape == (2, 257) and np.allclose(target.sum(-1), 1)
            if q.qtype == "count":
                assert (target[1] > 0).sum() == 1 + int(q.answer) and target[1, 0] == pytest.approx(1 / (1 + int(q.answer)))
            elif q.qtype == "exists":
                assert (target[1, 0] == 1) == (q.answer == "no")
            else:
                assert target[1, 0] == 0
            if q.qtype == "shape_left":
                named = data.mask_patches(masks[q.find[0]], 6).reshape(-1)
                read = data.mask_patches(masks[q.read[0]], 6).reshape(-1)
                assert np.array_equal(target[0, 1:] > 0, named) and np.array_equal(target[1, 1:] > 0, read)
                assert objects[q.read[0]].shape == q.answer
            seen.add((q.qtype, q.answer if q.qtype in ("count", "exists") else ""))
    assert {("count", "0"), ("exists", "yes"), ("exists", "no"), ("shape_left", "")} <= seen


def test_training_is_deterministic_and_saves_a_loadable_checkpoint(tmp_path):
    cfg = TrainConfig(steps=2, scenes_per_step=2, warmup=1, eval_every=2, eval_n=5, threads=1, vision_steps=2,
                      vision_scenes=2, cycles=2)
    first = train(tmp_path / "a", cfg, progress=False, log=lambda *a, **k: None)
    train(tmp_path / "b", cfg, progress=False, log=lambda *a, **k: None)
    a = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a", local_files_only=True)
    b = LlavaForConditionalGeneration.from_pretrained(tmp_path / "b", local_files_only=True)
    untrained = build_mini(seed=0)
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), untrained.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, p0) for pa, p0 in zip(a.parameters(), untrained.parameters()))
    assert [(e["step"], e["cycle"]) for e in first["history"] if "step" in e] == [(2, 1), (4, 2)]
    assert set(first["history"][-1]["val"]) >= {"overall"}
    AutoProcessor.from_pretrained(tmp_path / "a", local_files_only=True)
    torch.set_num_threads(1)
    card = write_card(tmp_path / "a", n=10).read_text()
    assert "transprune train-mini --out DIR --steps 2 --seed 0 --threads 1" in card
    assert all(f"| {t} |" in card for t in ("colour", "shape_left", "count", "exists", "digit"))
    assert "(10 questions)" in card


def test_vision_stage_trains_only_the_vision_side_and_freezing_keeps_it(tmp_path):
    """Stage 1 must leave the decoder at its init; with freeze_vision, stage 2 must leave the vision tower and
    projector exactly as stage 1 left them while it trains the decoder."""
    quiet = dict(progress=False, log=lambda *a, **k: None)
    base = dict(scenes_per_step=2, warmup=1, eval_every=50, eval_n=5, vision_scenes=2,
                aux_labels=("colour", "left_shape", "colour_count"))
    train(tmp_path / "v", TrainConfig(steps=0, vision_steps=2, **base), **quiet)
    train(tmp_path / "f", TrainConfig(steps=2, vision_steps=2, freeze_vision=True, **base), **quiet)
    stage1 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "v", local_files_only=True)
    frozen = LlavaForConditionalGeneration.from_pretrained(tmp_path / "f", local_files_only=True)
    untrained = build_mini(seed=0)
    for (name, p1), pf, p0 in zip(stage1.named_parameters(), frozen.parameters(), untrained.parameters()):
        vision_side = name.startswith(("model.vision_tower.", "model.multi_modal_projector."))
        if vision_side:
            assert torch.equal(pf, p1), name
        else:
            assert torch.equal(p1, p0), name
    changed = [n for (n, p1), pf in zip(stage1.named_parameters(), frozen.parameters()) if not torch.equal(p1, pf)]
    assert changed and all(n.startswith(("model.language_model.", "lm_head.")) for n in changed)
    assert any(n.startswith("model.vision_tower.") for (n, p1), p0 in zip(stage1.named_parameters(), untrained.parameters())
               if not torch.equal(p1, p0))
    # --init: a run that starts from the stage-1 folder and freezes the vision side ends where "f" ended
    train(tmp_path / "i", TrainConfig(steps=2, vision_steps=0, freeze_vision=True, init=str(tmp_path / "v"), **base), **quiet)
    resumed = LlavaForConditionalGeneration.from_pretrained(tmp_path / "i", local_files_only=True)
    for (name, pi), pf in zip(resumed.named_parameters(), frozen.parameters()):
        assert torch.equal(pi, pf), name
    # cycles: a 2-cycle run ends exactly where a 1-cycle run plus an --init continuation of one cycle ends
    train(tmp_path / "f1", TrainConfig(steps=2, vision_steps=2, freeze_vision=True, cycles=1, **base), **quiet)
    train(tmp_path / "c", TrainConfig(steps=2, vision_steps=0, freeze_vision=True, cycles=1, init=str(tmp_path / "f1"),
                                      **base), **quiet)
    continued = LlavaForConditionalGeneration.from_pretrained(tmp_path / "c", local_files_only=True)
    once = LlavaForConditionalGeneration.from_pretrained(tmp_path / "f1", local_files_only=True)
    assert any(not torch.equal(pc, p1) for pc, p1 in zip(continued.parameters(), once.parameters()))
    for (name, pc), pf in zip(continued.named_parameters(), frozen.parameters()):
        assert torch.equal(pc, pf), name
    with pytest.raises(ValueError, match="cycles=0"):
        train(tmp_path / "x", TrainConfig(steps=1, cycles=0), **quiet)
    with pytest.raises(ValueError, match="device='tpu'"):
        train(tmp_path / "x", TrainConfig(steps=1, device="tpu"), **quiet)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train(tmp_path / "x", TrainConfig(steps=1, device="cuda"), **quiet)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="aux_labels"):
        train(tmp_path / "x", TrainConfig(steps=1, aux_labels=("colour", "hue")), **quiet)


def test_patch_accuracy_counts_only_object_patches():
    torch.manual_seed(0)
    model = build_mini(seed=0).eval()
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(96, AUX_CLASSES[k]) for k in ("shape", "digit", "centre")})
    pixels, labels = _patch_batch(Batcher(), "val", 0, 3)
    got = patch_accuracy(model, heads, pixels, labels)
    with torch.no_grad():
        features = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)
    for key, where in (("shape", labels["shape"] > 0), ("digit", labels["digit"] > 0), ("centre", labels["centre"] > 0)):
        pred = heads[key](features).argmax(-1)
        hits = [int(pred[i, j] == labels[key][i, j]) for i in range(3) for j in range(256) if where[i, j]]
        assert got[key] == round(sum(hits) / len(hits), 3)
    # a head that always answers "background" scores 0 on object patches
    with torch.no_grad():
        heads["shape"].weight.zero_()
        heads["shape"].bias.copy_(torch.tensor([5.0, 0, 0, 0]))
    assert patch_accuracy(model, heads, pixels, labels)["shape"] == 0.0


def test_decoder_reinit_touches_only_decoder_matrices_and_is_seeded():
    a, b, untouched = build_mini(seed=0), build_mini(seed=0), build_mini(seed=0)
    init_decoder(a, 0.15, seed=4)
    init_decoder(b, 0.15, seed=4)
    q = a.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, b.model.language_model.layers[0].self_attn.q_proj.weight)
    assert abs(float(q.std()) - 0.15) < 0.01
    for (name, pa), pu in zip(a.named_parameters(), untouched.parameters()):
        changed = not torch.equal(pa, pu)
        assert changed == (name.startswith("model.language_model.") and pa.dim() == 2), name


def test_card_command_reproduces_the_training_config():
    cfg = TrainConfig(steps=7, seed=3, lr=3e-4, decoder_init_std=0.15, attn_heads=2, attn_layer=9,
                      questions_per_type=2, scenes_per_step=4, deep_layer=0, aux_weight=0.0,
                      aux_labels=("colour", "left_shape"), vision_steps=5, vision_scenes=3, vision_lr=2e-3,
                      freeze_vision=False, device="cuda:1",
                      attn_targets="relevant" if TrainConfig().attn_targets == "focus" else "focus", find_layer=4,
                      gather_layer=3 if TrainConfig().gather_layer != 3 else 2)
    line = command(asdict(cfg))
    assert train_config(build_parser().parse_args(shlex.split(line)[1:])) == cfg
    assert "in code" not in line
    assert "TrainConfig(warmup=5)" in command(asdict(TrainConfig(warmup=5)))  # no option for it: said so


@pytest.mark.parametrize("field, value, message", [
    ("attn_targets", "objects", "attn_targets='objects'; choose 'relevant' or 'focus'"),
    ("find_layer", 13, "find_layer=13: the decoder has layers 1..12"),
    ("attn_layer", -1, "attn_layer=-1: the decoder has layers 1..12"),
    ("gather_layer", 20, "gather_layer=20: the decoder has layers 1..12"),
])
def test_training_rejects_bad_attention_settings_before_any_work(tmp_path, field, value, message):
    cfg = TrainConfig(steps=1, vision_steps=0, **{field: value})
    with pytest.raises(ValueError) as info:
        train(tmp_path / "out", cfg, progress=False, log=lambda *a, **k: None)
    assert message in str(info.value) and not (tmp_path / "out").exists()


def test_train_mini_rejects_an_unknown_device_at_parse_time(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train-mini", "--out", "x", "--device", "tpu"])
    assert exit_info.value.code == 2
    assert "device='tpu'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_train_mini_without_cuda_says_so_and_exits_2(tmp_path, capsys):
    from transprune.cli import main

    assert main(["train-mini", "--out", str(tmp_path / "m"), "--device", "cuda", "--steps", "1"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_train_mini_rejects_a_layer_beyond_the_decoder_with_exit_2(tmp_path, capsys):
    from transprune.cli import main

    assert main(["train-mini", "--out", str(tmp_path / "m"), "--gather-layer", "13", "--steps", "1"]) == 2
    assert "gather_layer=13: the decoder has layers 1..12" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
