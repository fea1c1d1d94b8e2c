"""DivPrune and CDPruner against their official code's rule, each rewritten here (plain torch, float64) on the
official layout: LLaVA-1.5, 576 image tokens at columns 35..610 of the prompt, the choice made on the LLM's input
embeddings before the first layer. Checked: the kept image tokens (count, members, sequence order), the order in
which the greedy takes them, and the logits of the LLM run by hand on the official pruned sequence.

DivPrune, vbdi/divprune @ 799e2d950aa01ba7860907f5a6d86061f885dca6, `LLaVA/llava/model/llava_arch.py`
(`pairwise_cosine_similarity`, `DivPrune`, and its call in `prepare_inputs_labels_for_multimodal`; CC BY-NC 4.0:
read for the rule, not copied). The rule:
- the tokens: the LLM's input embeddings at columns 35 .. 35 + 576 (its ``SYS_TOKEN_LEN = 35``), in the model dtype;
- the count: ``int(round(ratio * 576))`` (Python's round), the paper's ratio 0.098 -> 56 (``run_Divprune.sh``);
- distance ``1 - cos``, cos from rows divided by their L2 norms;
- the first token: the argmax over columns of each column's second-smallest distance (the smallest is the token
  itself), i.e. the token whose nearest other token is farthest;
- each next token: the argmax over ALL columns (the chosen ones are not masked: their distance to themselves, 0,
  keeps them out) of the distance to the nearest chosen token; ties to the first index (argmax);
- the kept tokens go to the LLM in their sequence order (the kept columns are sorted), positions compact.

CDPruner, Theia-4869/CDPruner @ 9541616c40fcd5625de1cdb8ea6c33c129eb7864, `llava/model/llava_arch.py`
(`LlavaMetaForCausalLM.encode_images`, the LLaVA-1.5 path; Apache-2.0). The rule:
- similarity: cosine of the projector outputs (= the LLM's input embeddings of the image tokens), in float32;
- relevance: minus the mean cosine of each image token with the instruction's tokens, then
  ``(r - r.min() + 1e-6) / (r.max() - r.min())`` (min/max over the batch: one sample here). The official code takes
  both sides from CLIP (image embeds after post-layernorm and visual projection, its text tower on the question);
  HF checkpoints carry no text tower, so, as transprune's docstring says, both sides are the LLM's input embeddings
  here: the image tokens and the text after the last image token. Only these inputs are transprune's reading;
- kernel ``L = diag(r) S diag(r)``;
- the fast greedy MAP (Chen et al. 2018): ``d2 = diag(L)``; for exactly ``visual_token_num`` steps (no stopping
  rule): ``j = argmax d2``; ``e = (L[j] - C[:i, j] @ C[:i]) / sqrt(d2[j])``; ``C[i] = e``; ``d2 -= e**2``;
  ``d2[j] = -inf``;
- the count: ``visual_token_num`` itself (64, 128, 192 of 576 in its scripts); kept tokens sorted, positions compact.

CDPruner runs on `llava_576`'s layout with a 640-wide LLM instead of its 64: LLaVA-1.5's LLM (4096) is wider than
its 576 tokens, so the kernel is full rank and the official greedy always has volume to take. At width 64 the kernel
has rank 64, and from the 65th pick the official greedy takes the square root of rounding noise (then of a negative
number: NaN, after which argmax keeps returning one index): 128 and 192 are outside the official rule there.

Every step of each greedy is checked to be decided by more than rounding: the two best candidates differ (no exact
tie, which argmax would break by index), and the same rule in float32 (the official arithmetic on this model)
chooses the same tokens in the same order as in float64.
"""

from functools import lru_cache

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import transprune
from official_layout import IMAGE_END, IMAGE_START, IMAGE_TOKENS, layout_inputs, llava_576
from transprune.testing import _build, tiny_llava_config

SEEDS = range(3)
EXACT_TIE = 1e-12  # a float64 gap this small between the two best candidates is a tie in exact arithmetic


def llava_576_wide(seed: int, hidden_size: int = 640):
    """`llava_576`'s model (576 patches of 2 px on 48-px images, random weights) with a ``hidden_size``-wide LLM."""
    config = tiny_llava_config(num_hidden_layers=4, hidden_size=hidden_size)
    config.vision_config.image_size, config.vision_config.patch_size = 48, 2
    config.image_seq_length = IMAGE_TOKENS
    return _build(config, LlavaForConditionalGeneration, seed, "sdpa", torch.float32)


@lru_cache(maxsize=None)
def case(seed: int, wide: bool):
    """The model, its inputs, and the LLM's unpruned input embeddings (read by a pre-hook on the decoder)."""
    model = llava_576_wide(seed) if wide else llava_576(seed, num_hidden_layers=4)
    inputs = layout_inputs(seed)
    assert (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1).tolist() == \
        list(range(IMAGE_START, IMAGE_END)) and IMAGE_START == 35  # the official code's fixed SYS_TOKEN_LEN
    seen = {}
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return model, inputs, seen["embeds"][0]


def best_two_gap(score: torch.Tensor) -> float:
    top = score.topk(2).values
    return float(top[0] - top[1])


# -- the official rules, rewritten ------------------------------------------------------------------------------

def divprune_official(tokens: torch.Tensor, ratio: float, dtype=torch.float64) -> tuple[list[int], list[float]]:
    """DivPrune's choice order on the (576, d) image tokens, and at each step the gap between the two best scores."""
    n = tokens.shape[0]
    k = int(round(ratio * n))
    x = tokens.to(dtype)
    unit = x / x.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    score = distance.kthvalue(2, dim=0).values  # per column: the distance to the nearest other token
    chosen, gaps = [], []
    for _ in range(k):
        j = int(score.argmax())
        assert j not in chosen, "the official greedy would take a token twice (and keep fewer than its count)"
        chosen.append(j)
        gaps.append(best_two_gap(score))
        # every column's distance to its nearest chosen token (the chosen themselves at 0: not masked, as the code)
        score = distance[j] if len(chosen) == 1 else torch.minimum(score, distance[j])
    return chosen, gaps


def cdpruner_official(image: torch.Tensor, text: torch.Tensor, k: int, dtype=torch.float64) -> tuple[list[int], list[float]]:
    """CDPruner's choice order on the (576, d) image tokens given the (t, d) instruction tokens, and at each step
    the gap between the two largest residuals."""
    x, t = image.to(dtype), text.to(dtype)
    unit = x / x.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.T
    t_unit = t / t.norm(dim=-1, keepdim=True)
    relevance = -(unit @ t_unit.T).mean(-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    n = kernel.shape[0]
    rows = torch.zeros(k, n, dtype=dtype)  # the incremental Cholesky rows
    residual = kernel.diagonal().clone()  # each token's marginal gain d_i^2
    chosen, gaps = [], []
    for i in range(k):
        j = int(residual.argmax())
        assert float(residual[j]) > 0, f"step {i}: no volume left (the official code would take sqrt of {residual[j]})"
        chosen.append(j)
        gaps.append(best_two_gap(residual))
        e = (kernel[j] - rows[:i, j] @ rows[:i]) / residual[j].sqrt()
        rows[i] = e
        residual = residual - e * e
        residual[j] = float("-inf")
    return chosen, gaps


def check_decided(name, chosen, gaps, chosen_float32):
    """Each step of the official greedy is decided by more than rounding (see the module's docstring)."""
    step = min(range(len(gaps)), key=gaps.__getitem__)
    assert gaps[step] > EXACT_TIE, f"{name}: step {step} is an exact tie (gap {gaps[step]:.1e}): rounding decides it"
    assert chosen_float32 == chosen, (
        f"{name}: the official rule in float32 chooses otherwise from step "
        f"{next(i for i, (a, b) in enumerate(zip(chosen, chosen_float32)) if a != b)} (smallest gap {gaps[step]:.1e} "
        f"at step {step}): rounding decides it")


def official_logits(model, embeds, kept):
    """The LLM on the official pruned sequence: the text, the kept image tokens in order, the text; compact
    positions (the official code passes no position ids at prefill)."""
    keep = list(range(IMAGE_START)) + [IMAGE_START + i for i in kept] + list(range(IMAGE_END, embeds.shape[0]))
    out = model.model.language_model(inputs_embeds=embeds[keep][None])
    return model.lm_head(out.last_hidden_state[:, -1])


def run_pruned(model, inputs, config):
    with transprune.pruned(model, config) as handle, torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    stats = handle.last_stats
    assert len(stats) == 1 and stats[0].kept_after_layer == [0] and len(stats[0].kept_indices) == 1
    return stats[0].kept_indices[0], logits


# -- the tests ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ratio,count", [(0.098, 56), (0.1, 58), (0.25, 144)])
def test_divprune_keeps_the_official_tokens_on_llava(seed, ratio, count):
    """0.098: the paper's ratio (56 of 576); 0.1 (57.6 -> 58: rounds, not truncates); 0.25: a deeper greedy."""
    model, inputs, embeds = case(seed, wide=False)
    image, text = embeds[IMAGE_START:IMAGE_END], embeds[IMAGE_END:]
    chosen, gaps = divprune_official(image, ratio)
    check_decided(f"DivPrune seed {seed} ratio {ratio}", chosen, gaps, divprune_official(image, ratio, torch.float32)[0])
    assert len(chosen) == count
    kept, logits = run_pruned(model, inputs, transprune.DivPruneConfig(ratio))
    assert kept == sorted(chosen)  # count, members, sequence order
    assert transprune.DivPruneConfig.order(image.float(), text.float(), count).tolist() == chosen  # choice order
    with torch.no_grad():
        want = official_logits(model, embeds, kept)
    assert torch.allclose(logits, want, atol=1e-4), (logits - want).abs().max()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("count", [64, 128, 192])
def test_cdpruner_keeps_the_official_tokens_on_llava(seed, count):
    model, inputs, embeds = case(seed, wide=True)
    image, text = embeds[IMAGE_START:IMAGE_END], embeds[IMAGE_END:]
    chosen, gaps = cdpruner_official(image, text, count)
    check_decided(f"CDPruner seed {seed} count {count}", chosen, gaps,
                  cdpruner_official(image, text, count, torch.float32)[0])
    config = transprune.CDPrunerConfig.preset(str(count))
    kept, logits = run_pruned(model, inputs, config)
    assert len(kept) == count and kept == sorted(chosen)  # count, members, sequence order
    assert config.order(image.float(), text.float(), count).tolist() == chosen  # choice order
    with torch.no_grad():
        want = official_logits(model, embeds, kept)
    assert torch.allclose(logits, want, atol=1e-4), (logits - want).abs().max()
