"""V2Drop against the official code's rule (xuyang-liu16/V2Drop at 219e03ede8cf6a70d1534903fa238b13dd900bbb:
`llava/model/language_model/V2Drop.py`, `V2DropLlamaModel.forward`, the LLaVA-1.5 decoder), rewritten here on its
layout: LLaVA-1.5 with 576 image tokens at columns 35..610 and a 32-layer decoder.

The rule, as the code runs its decoder loop: before each 0-based layer l in {3, 17, 22} (the prefill only), the
candidates are the image tokens left, at columns 35 .. 35 + n - 1 (the code hard-codes the start 35 and n = 576 for
a sequence longer than 576); a candidate's variation is ``||x_l - x_{l-1}||_2``, the L2 norm of the difference of its
hidden state between the input of layer l and the input of layer l - 1 (the update of layer l - 1: 1-based layer
3, 17, 22); the ``k = max(1, int(n * r))`` largest stay, with r = 0.5, 0.5, 0 of the tokens left (576 -> 288 -> 144
-> 1); the kept columns are sorted (sequence order) and ``position_ids`` gathered with them (original positions), the
causal mask restricted to them. Checked: the kept image tokens of every stage (count, members, order) and the
final-position logits of the decoder run here by hand, layer by layer, on the kept tokens."""

import pytest
import torch

import transprune
from transprune import V2DropConfig
from official_layout import IMAGE_END, IMAGE_START, IMAGE_TOKENS, layout_inputs, llava_576
from transprune.testing import IMAGE_ID

# The code's `target_layer_indices` with the `keep_ratio` it sets at each: the 0-based layer it prunes before, and
# the fraction of the image tokens left that stay.
OFFICIAL_STAGES = {3: 0.5, 17: 0.5, 22: 0}
OFFICIAL_START = 35  # the code's hard-coded first image column (`torch.arange(35, ...)`)


def decoder_embeds(model, inputs):
    """The language model's input embeddings (text with the projected image features), from an unpruned forward."""
    seen = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.update(embeds=k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen["embeds"]


def causal_mask(length, dtype):
    """(1, 1, S, S) additive causal mask over the tokens in the order they stand (the code's 4-D mask, restricted to
    the kept rows and columns, is this over the kept tokens)."""
    blocked = torch.ones(length, length, dtype=torch.bool).triu(1)
    return torch.zeros(length, length, dtype=dtype).masked_fill(blocked, torch.finfo(dtype).min)[None, None]


@torch.no_grad()
def official_v2drop(model, embeds):
    """The official decoder loop on one sample's (1, L, d) ``embeds``: the kept image tokens of every stage (numbered
    0..575 by their order among the image tokens, in sequence order) and the final-position logits."""
    lm = model.model.language_model
    hidden = embeds
    position_ids = torch.arange(hidden.shape[1])[None]
    left = IMAGE_TOKENS if hidden.shape[1] > IMAGE_TOKENS else 0  # the code's `image_token_amount`
    image_number = torch.arange(left)  # which original image token stands at each candidate column, in order
    previous, kept = None, []
    for layer_idx, layer in enumerate(lm.layers):
        current = hidden  # this layer's input: the previous layer's output
        if layer_idx in OFFICIAL_STAGES and current.shape[1] > 1 and left > 0:
            candidates = torch.arange(OFFICIAL_START, OFFICIAL_START + left)
            variation = (current[:, candidates] - previous[:, candidates]).norm(p=2, dim=-1)[0]
            k = max(1, int(left * OFFICIAL_STAGES[layer_idx]))
            chosen = torch.topk(variation, k=k, largest=True).indices
            order = chosen.sort().values  # the code sorts the kept columns: sequence order
            keep = torch.cat([torch.arange(OFFICIAL_START), candidates[order],
                              torch.arange(OFFICIAL_START + left, current.shape[1])]).sort().values
            current, position_ids = current[:, keep], position_ids[:, keep]
            image_number = image_number[order]
            kept.append(image_number.tolist())
            left = k
        previous = current
        out = layer(current, attention_mask=causal_mask(current.shape[1], current.dtype), position_ids=position_ids,
                    position_embeddings=lm.rotary_emb(current, position_ids))
        hidden = out[0] if isinstance(out, tuple) else out
    return kept, model.lm_head(lm.norm(hidden))[:, -1]


@pytest.mark.parametrize("seed", range(3))
def test_v2drop_keeps_the_official_tokens_on_llava(seed):
    model = llava_576(seed, num_hidden_layers=32)
    inputs = layout_inputs(seed)
    image_cols = (inputs["input_ids"][0] == IMAGE_ID).nonzero().squeeze(1)
    # the span the official code reads is where the image tokens are
    assert image_cols.tolist() == list(range(OFFICIAL_START, OFFICIAL_START + IMAGE_TOKENS))
    assert (IMAGE_START, IMAGE_END) == (OFFICIAL_START, OFFICIAL_START + IMAGE_TOKENS)

    want_kept, want_logits = official_v2drop(model, decoder_embeds(model, inputs))
    assert [len(k) for k in want_kept] == [288, 144, 1]

    with transprune.pruned(model, V2DropConfig.preset("llava")) as handle, torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    stats = handle.last_stats[0]
    # the code's 0-based "before layer l" is the 1-indexed "after layer l"
    assert stats.kept_after_layer == sorted(OFFICIAL_STAGES)
    assert [len(k) for k in stats.kept_indices] == [len(k) for k in want_kept]
    for stage, (got, want) in enumerate(zip(stats.kept_indices, want_kept)):  # members and order, every stage
        same = got == want  # (a plain bool: pytest's diff of two long lists takes a minute)
        assert same, f"stage {stage}: first difference at {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)}"
    assert torch.allclose(logits, want_logits, atol=1e-4, rtol=0), (logits - want_logits).abs().max()
