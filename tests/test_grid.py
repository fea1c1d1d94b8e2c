"""Every family x every registered method: what must hold whatever the model and the method.

- A prompt that ends with its image (``"USER: what is this ? <image>"``; on LLaVA, NeXT and OneVision, where the
  image is the prompt's last token, the others close it with a marker): the prompt's last token predicts the next
  token, so no stage drops it; its logits are the model's, not the zeros of a dropped row; the batch gives each
  sample what it gives alone.
- Four threads calling one pruned model at once get what each gets alone.
- A method at its keep-everything setting is the unpruned model (declared opt-outs, with their reasons).
- Each sample keeps exactly its share at every stage; sdpa and eager keep the same tokens; a prompt without an
  image is the unpruned model; bfloat16 keeps the counts of float32; a saved and loaded model prunes as the one
  in memory. Every check runs through `generate` with its cache.
"""

import dataclasses
import threading

import pytest
import torch

import transprune
from transprune import VisionZipConfig
from transprune.adapters import adapter_for
from transprune.methods import METHODS
from transprune.testing import TINY_MODELS, prompt_inputs, random_image, tiny_model, tiny_processor

KINDS = sorted(TINY_MODELS)


def method_config(name: str):
    """The registered method as the 8-layer tiny models take it: layer numbers mapped from the papers' 32 layers;
    VisionZip at 6 + 2 tokens per unit (the crop / tile families have 16 per tile)."""
    if name == "visionzip":
        return VisionZipConfig(dominant=6, contextual=2)
    cls = METHODS[name]
    fields = getattr(cls, "__dataclass_fields__", {})
    return cls(reference_depth=32) if "reference_depth" in fields else cls()


NAMES = sorted(METHODS)
PROMPTS = ["USER: what is this ? <image>", "USER: <image>\nwhat colour is the big car ? ASSISTANT:"]
SIZES = [(64, 64), (128, 64)]


@pytest.fixture(scope="module", params=KINDS)
def family(request):
    kind = request.param
    return kind, tiny_model(kind, seed=0), tiny_processor(kind)


def _inputs(processor, indices):
    images = [random_image(40 + i, SIZES[i]) for i in indices]
    return dict(prompt_inputs(processor, [PROMPTS[i] for i in indices], images))


def _run(model, inputs, n=3):
    """(the prompt's next-token logits, ``n`` greedy tokens) from generate, which numbers each sample's positions
    from its first real token (a plain forward numbers a left-padded row's from the padding: DART's key norms,
    rotated, would then see other positions than alone)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    return out.logits[0], out.sequences[:, -n:]


@pytest.mark.parametrize("name", NAMES)
def test_the_prompts_last_token_is_never_dropped(family, name):
    kind, model, processor = family
    config = method_config(name)
    batch = _inputs(processor, [0, 1])
    ends_with_image = adapter_for(model).image_token_mask(batch["input_ids"], None)[:, -1].tolist()
    with transprune.pruned(model, config) as handle:
        logits, tokens = _run(model, batch)
        stats = handle.last_stats
        for b, last_is_image in enumerate(ends_with_image):
            if last_is_image:  # the last image token, in every stage's kept set
                assert all(stats[b].n_image_tokens - 1 in kept for kept in stats[b].kept_indices), (kind, name)
            assert logits[b].abs().sum() > 0 and logits[b].std() > 0, (kind, name, b)
        for b in range(2):  # alone, as in the batch
            alone_logits, alone_tokens = _run(model, _inputs(processor, [b]))
            assert torch.equal(alone_tokens[0], tokens[b]), (kind, name, b)
            assert torch.allclose(alone_logits[0], logits[b], atol=1e-4, rtol=1e-4), (kind, name, b)
    if kind in ("llava", "llava_next", "llava_onevision"):
        assert ends_with_image[0], "the first prompt's last token is an image token on these families"


def _concurrently(model, config, inputs: list[dict], rounds: int = 2) -> list:
    """Each input run by its own thread, all started together, ``rounds`` times; every thread's own results."""
    barrier = threading.Barrier(len(inputs))
    results, errors = [[] for _ in inputs], []

    def work(i):
        try:
            barrier.wait()
            for _ in range(rounds):
                logits, tokens = _run(model, inputs[i])
                results[i].append((logits, tokens, [s.kept_indices for s in handle.last_stats]))
        except Exception as error:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(error)

    with transprune.pruned(model, config) as handle:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return results


def _four_inputs(processor):
    prompts = ["USER: <image>\nwhat is it ? ASSISTANT:", "USER: <image>\nhow many dogs are there ? ASSISTANT:",
               "USER: what colour is this ? <image>", "USER: <image>\nis the car red ? ASSISTANT:"]
    sizes = [(64, 64), (128, 64), (64, 128), (128, 128)]
    return [dict(prompt_inputs(processor, [p], [random_image(60 + i, s)])) for i, (p, s) in
            enumerate(zip(prompts, sizes))]


def _check_threads_equal_one_by_one(model, processor, config):
    inputs = _four_inputs(processor)
    with transprune.pruned(model, config) as handle:
        alone = []
        for x in inputs:
            logits, tokens = _run(model, x)
            alone.append((logits, tokens, [s.kept_indices for s in handle.last_stats]))
    for i, runs in enumerate(_concurrently(model, config, inputs)):
        for logits, tokens, kept in runs:
            assert kept == alone[i][2] and torch.equal(tokens, alone[i][1])
            assert torch.allclose(logits, alone[i][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("name", NAMES)
def test_four_threads_equal_one_by_one_for_every_method(kind, name):
    _check_threads_equal_one_by_one(tiny_model(kind, seed=0), tiny_processor(kind), method_config(name))


def test_four_threads_equal_one_by_one_for_visionzip_on_every_family(family):
    kind, model, processor = family
    _check_threads_equal_one_by_one(model, processor, VisionZipConfig(dominant=6, contextual=2))


# Declared opt-outs of the keep-everything check, each with its reason: (kind, method) -> why it cannot hold.
KEEP_ALL_OPT_OUTS = {
    ("llava_next", "visionzip"): "the official VisionZip writes NeXT's kept tokens in its own anyres order (base tile, "
                                 "then every tile's patches over the whole grid, no newline rows): not the model's order",
    ("llava_onevision", "visionzip"): "VisionZip drops the anyres grid's newline rows (they are no patch it can score; "
                                      "the official code has none), so even at every patch it is not the model",
}


def keep_everything(name: str, model):
    """The registered method at the setting that keeps every token, through its declared contract: `scaled` past 1
    (every keep ratio 1, FastV's r 0); VisionZip at every patch of the family's unit, no CLS, no contextual token."""
    if name == "visionzip":
        per_tile = adapter_for(model).vision_hooks().patches_per_tile()
        return VisionZipConfig(dominant=per_tile or 10 ** 6, contextual=0, keep_cls=False)
    config = method_config(name)
    if name == "v2drop":  # its default's last stage is ratio 0 (one token kept), which no scale lifts
        config = dataclasses.replace(config, keep_ratios=(0.5, 0.25, 0.125))
    return config.scaled(10 ** 6)


@pytest.mark.parametrize("name", NAMES)
def test_keeping_everything_equals_the_unpruned_model(family, name):
    """Every method that keeps every token gives the unpruned model's greedy tokens and (up to rounding) its logits,
    on a batch of two prompts, and says that it pruned nothing."""
    kind, model, processor = family
    assert set(KEEP_ALL_OPT_OUTS) <= {(k, n) for k in KINDS for n in NAMES}  # no stale opt-out
    batch = _inputs(processor, [0, 1])
    if (kind, name) in KEEP_ALL_OPT_OUTS:  # it still runs; only the equality cannot hold (the reason above)
        with pytest.warns(UserWarning, match="prune"), transprune.pruned(model, keep_everything(name, model)):
            assert _run(model, batch)[1].shape == (2, 3)
        return
    ref_logits, ref_tokens = _run(model, batch)
    with pytest.warns(UserWarning, match="prune"):  # "prunes nothing" / "pruned none": said, not silent
        with transprune.pruned(model, keep_everything(name, model)) as handle:
            logits, tokens = _run(model, batch)
            assert all(s.pruned_nothing for s in handle.last_stats), (kind, name)
    assert torch.equal(tokens, ref_tokens), (kind, name)
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4), (kind, name)


def _expected_counts(config, n: int, depth: int) -> list[int]:
    """What each stage keeps of a sample's ``n`` visual tokens, from the method's declared settings alone: an
    embeddings method ``round(n * keep_ratio)`` (at least 1) before the LLM; an in-LLM method ``int`` (or, where it
    declares so, ``round``) of ``n * ratio`` per stage, at least its ``min_keep`` and at least one."""
    if config.stage == "pre":
        return [max(1, min(n, round(n * config.keep_ratio)))]
    schedule = config.layers_for_depth(depth)
    counts = []
    for ratio in schedule.keep_ratios:
        share = n * ratio
        kept = round(share) if config.keep_rounding == "round" else int(share)
        counts.append(max(1, config.min_keep, min(n, kept)))
    return counts


# Counts worked out by hand for LLaVA's second prompt (64 image tokens, the image not last): the methods' defaults as
# `method_config` builds them (the papers' layers mapped to 8), so `_expected_counts` is checked against numbers too.
HAND_COUNTS = {"fastv": [32], "pdrop": [32, 16, 8], "transprune": [56, 40, 8], "random": [56, 40, 8],
               "uniform": [56, 40, 8], "v2drop": [32, 16, 1], "dart": [14], "divprune": [6], "cdpruner": [14]}


@pytest.mark.parametrize("name", [n for n in NAMES if n != "visionzip"])  # VisionZip: per unit, in each family's tests
def test_each_sample_keeps_exactly_its_share(family, name):
    kind, model, processor = family
    config = method_config(name)
    batch = _inputs(processor, [0, 1])
    image = adapter_for(model).image_token_mask(batch["input_ids"], None)
    with transprune.pruned(model, config) as handle:
        _run(model, batch, n=1)
        for n, ends_with_image, stats in zip(image.sum(1).tolist(), image[:, -1].tolist(), handle.last_stats):
            assert stats.n_image_tokens == n
            expected = _expected_counts(config, n, adapter_for(model).depth)
            got = [len(k) for k in stats.kept_indices]
            if ends_with_image and config.stage == "pre":  # the prompt's last token stays beside the method's choice
                assert got[0] in (expected[0], expected[0] + 1) and n - 1 in stats.kept_indices[0], (kind, name)
            else:
                assert got == expected, (kind, name)
                if kind == "llava" and name in HAND_COUNTS:
                    assert got == HAND_COUNTS[name], (kind, name)
            assert all(k == sorted(set(k)) for k in stats.kept_indices)  # original order, no repeats


@pytest.mark.parametrize("name", NAMES)
def test_sdpa_and_eager_keep_the_same_tokens(family, name):
    """The attention backend changes nothing transprune chooses: the scores are computed from q and k."""
    kind, model, processor = family
    eager = tiny_model(kind, seed=0, attn_implementation="eager")
    batch = _inputs(processor, [0, 1])
    runs = []
    for m in (model, eager):
        with transprune.pruned(m, method_config(name)) as handle:
            _, tokens = _run(m, batch)
            runs.append((tokens, [s.kept_indices for s in handle.last_stats]))
    assert runs[0][1] == runs[1][1], (kind, name)
    assert torch.equal(runs[0][0], runs[1][0]), (kind, name)


@pytest.mark.parametrize("name", NAMES)
def test_a_prompt_without_an_image_is_the_unpruned_model(family, name):
    kind, model, processor = family
    processor.tokenizer.padding_side = "left"
    text = dict(processor(text=["USER: what is the colour ? ASSISTANT:", "USER: how many ? ASSISTANT:"], padding=True,
                          return_tensors="pt"))
    ref_logits, ref_tokens = _run(model, text)
    with transprune.pruned(model, method_config(name)) as handle:
        logits, tokens = _run(model, text)
        assert [s.n_image_tokens for s in handle.last_stats] == [0, 0]
    assert torch.equal(tokens, ref_tokens) and torch.allclose(logits, ref_logits, atol=1e-5, rtol=1e-5), (kind, name)


def _as(inputs: dict, dtype) -> dict:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_prunes_as_declared(family, name):
    """In bfloat16 every method runs on every family: finite logits, and (but VisionZip's per-unit counts, which
    its family tests check) each stage keeps the same number of tokens as in float32."""
    kind, model, processor = family
    half = tiny_model(kind, seed=0, dtype=torch.bfloat16)
    batch = _inputs(processor, [0, 1])
    counts = []
    for m, inputs in ((model, batch), (half, _as(batch, torch.bfloat16))):
        with transprune.pruned(m, method_config(name)) as handle:
            logits, _ = _run(m, inputs, n=2)
            counts.append([[len(k) for k in s.kept_indices] for s in handle.last_stats])
        assert torch.isfinite(logits.float()).all(), (kind, name, m.dtype)
    assert counts[0] == counts[1], (kind, name)


@pytest.fixture(scope="module")
def saved(family, tmp_path_factory):
    """The family's tiny model saved with `save_pretrained` and loaded back from the folder (never the hub)."""
    from transprune.loading import load_checkpoint
    from transprune.testing import save_tiny_checkpoint

    kind = family[0]
    return load_checkpoint(str(save_tiny_checkpoint(tmp_path_factory.mktemp(kind), kind, seed=0)))


@pytest.mark.parametrize("name", NAMES)
def test_a_saved_and_loaded_model_prunes_as_the_one_in_memory(family, saved, name):
    kind, model, processor = family
    loaded, loaded_processor = saved
    runs = []
    for m, p in ((model, processor), (loaded, loaded_processor)):
        with transprune.pruned(m, method_config(name)) as handle:
            _, tokens = _run(m, _inputs(p, [0, 1]))
            runs.append((tokens, [s.kept_indices for s in handle.last_stats]))
    assert runs[0][1] == runs[1][1] and torch.equal(runs[0][0], runs[1][0]), (kind, name)
