"""The tiny offline model / processor factory in transprune.testing."""

import socket

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from transprune.testing import (
    GRID_PINPOINTS,
    IMAGE_ID,
    PAD_ID,
    random_image,
    sample_inputs,
    sample_inputs_unbatched,
    sample_prompts,
    save_tiny_checkpoint,
    tiny_llava,
    tiny_llava_config,
    tiny_llava_next,
    tiny_llava_next_config,
    tiny_processor,
)

PROMPT = "USER: <image>\nwhat is the colour ? ASSISTANT:"


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def llava_next():
    return tiny_llava_next(seed=0)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, and any socket connection fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def test_configs():
    cfg = tiny_llava_config()
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (64, 128, 8)
    assert (t.num_attention_heads, t.num_key_value_heads, t.max_position_embeddings) == (4, 2, 512)
    assert not t.tie_word_embeddings and not cfg.tie_word_embeddings
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size) == (32, 2, 64, 8)
    assert cfg.image_token_id == IMAGE_ID and t.pad_token_id == PAD_ID
    assert cfg.vision_feature_select_strategy == "default" and cfg.vision_feature_layer == -2
    tokenizer = tiny_processor().tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID and t.vocab_size == len(tokenizer)
    assert tiny_llava_config(num_hidden_layers=32).text_config.num_hidden_layers == 32
    nxt = tiny_llava_next_config(num_hidden_layers=3)
    assert nxt.text_config.num_hidden_layers == 3 and nxt.image_grid_pinpoints == GRID_PINPOINTS


def test_tokenizer():
    tokenizer = tiny_processor().tokenizer
    ids = tokenizer(PROMPT).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids)[:5] == ["<s>", "USER", ":", "<image>", "\n"]
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == PAD_ID


def test_deterministic_and_overrides():
    a, b = tiny_llava(seed=0, num_hidden_layers=2), tiny_llava(seed=0, num_hidden_layers=2)
    c = tiny_llava(seed=1, num_hidden_layers=2)
    assert len(a.model.language_model.layers) == 2
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert tiny_llava(num_hidden_layers=1, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
    assert tiny_llava(num_hidden_layers=1, attn_implementation="eager").config._attn_implementation == "eager"


def test_llava_image_tokens_and_batch(llava):
    processor = tiny_processor("llava")
    batch = sample_inputs(processor, n=3, seed=0)
    assert (batch.input_ids == IMAGE_ID).sum(1).tolist() == [64, 64, 64]
    lengths = batch.attention_mask.sum(1).tolist()
    assert len(set(lengths)) == 3
    # left padding: each row is pads then ones only
    for row, n in zip(batch.attention_mask, lengths):
        assert row[-n:].all() and not row[:-n].any()
    assert (batch.input_ids[batch.attention_mask == 0] == PAD_ID).all()
    assert not torch.equal(batch.pixel_values[0], batch.pixel_values[1])
    singles = sample_inputs_unbatched(processor, n=3, seed=0)
    for b, single in enumerate(singles):
        assert torch.equal(single.input_ids[0], batch.input_ids[b, -lengths[b]:])
        assert torch.equal(single.pixel_values[0], batch.pixel_values[b])
    with torch.no_grad():
        logits = llava(**batch).logits
    assert logits.shape == (*batch.input_ids.shape, llava.config.text_config.vocab_size)
    # non-degenerate: the next-token distribution is far from uniform
    assert logits[:, -1].softmax(-1).max(-1).values.min() > 5 / logits.shape[-1]


def test_llava_next_image_tokens_match_model(llava_next):
    processor = tiny_processor("llava_next")
    sizes = [(64, 64), (128, 64), (64, 128)]  # (width, height)
    singles = sample_inputs_unbatched(processor, n=3, seed=0, sizes=sizes)
    counts = []
    with torch.no_grad():
        for single in singles:
            n = int((single.input_ids == IMAGE_ID).sum())
            feats = llava_next.model.get_image_features(single.pixel_values, single.image_sizes).pooler_output
            assert len(feats) == 1 and feats[0].shape == (n, llava_next.config.text_config.hidden_size)
            counts.append(n)
        assert counts == [136, 200, 208]  # 64 base + unpadded grid features + one newline per grid row
        batch = sample_inputs(processor, n=3, seed=0, sizes=sizes)
        assert (batch.input_ids == IMAGE_ID).sum(1).tolist() == counts
        assert len(set(batch.attention_mask.sum(1).tolist())) == 3
        logits = llava_next(**batch).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_generate_not_degenerate(kind, llava, llava_next):
    model, processor = (llava if kind == "llava" else llava_next), tiny_processor(kind)
    inputs = processor(images=random_image(0), text=PROMPT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    new = out[0, inputs.input_ids.shape[1]:]
    assert len(new) == 20 and len(set(new.tolist())) > 1
    assert (new > IMAGE_ID).all()  # special tokens (eos, pad, image, ...) are never generated
    batch = sample_inputs(processor, n=3, seed=1)
    with torch.no_grad():
        logits = model(**batch).logits[batch.attention_mask.bool()]
    assert (logits.argmax(-1) > IMAGE_ID).all() and (logits.max(-1).values > 1.0).all()


@pytest.mark.parametrize("kind, model_cls", [("llava", LlavaForConditionalGeneration),
                                             ("llava_next", LlavaNextForConditionalGeneration)])
def test_save_load_offline(tmp_path, offline, kind, model_cls):
    path = save_tiny_checkpoint(tmp_path / kind, kind=kind, seed=0, num_hidden_layers=2)
    model = model_cls.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert type(processor) is type(tiny_processor(kind))
    reference = tiny_llava(seed=0, num_hidden_layers=2) if kind == "llava" else \
        tiny_llava_next(seed=0, num_hidden_layers=2)
    batch = sample_inputs(processor, n=2, seed=3)
    expected = sample_inputs(tiny_processor(kind), n=2, seed=3)
    assert torch.equal(batch.input_ids, expected.input_ids)
    assert torch.equal(batch.pixel_values, expected.pixel_values)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


def test_random_image_and_prompts():
    a, b = random_image(0), random_image(1, size=(96, 48))
    assert a.size == (64, 64) and a.mode == "RGB" and b.size == (96, 48)
    assert a.tobytes() == random_image(0).tobytes() and a.tobytes() != random_image(1).tobytes()
    prompts = sample_prompts(4, seed=0)
    assert len({len(p.split()) for p in prompts}) == 4 and all(p.count("<image>") == 1 for p in prompts)


def test_every_registered_family_has_a_tiny_model_and_processor(tmp_path):
    from transprune.adapters import adapter_for, family_for, supported_model_types
    from transprune.testing import TINY_MODELS, tiny_model

    assert sorted(TINY_MODELS) == sorted(supported_model_types())
    for model_type in supported_model_types():
        model = tiny_model(model_type, seed=0)
        assert type(model) is family_for(model_type).model_class_for(model_type)
        assert adapter_for(model).family == family_for(model_type).family



@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_checkpoint_round_trip(tmp_path, kind):
    """A saved tiny Qwen checkpoint loads back through the tools' loader (its processor without the video
    processor, which needs torchvision) and gives the same inputs and logits."""
    from transprune.loading import load_checkpoint
    from transprune.testing import qwen_sample_inputs, save_tiny_checkpoint, tiny_model, tiny_qwen_processor

    model, processor = load_checkpoint(str(save_tiny_checkpoint(tmp_path / kind, kind=kind)))
    assert type(processor).__name__ == type(tiny_qwen_processor(kind)).__name__
    loaded = qwen_sample_inputs(processor, 2, seed=3, sizes=[(128, 96), (64, 64)])
    built = qwen_sample_inputs(tiny_qwen_processor(kind), 2, seed=3, sizes=[(128, 96), (64, 64)])
    assert all(torch.equal(loaded[k], built[k]) for k in built) and set(loaded) == set(built)
    with torch.no_grad():
        assert torch.equal(model(**loaded).logits, tiny_model(kind, seed=0)(**built).logits)
