import pytest
import torch

import transprune

from transprune import TransPruneConfig
from transprune.testing import PAD_ID, tiny_llava

# Tiny models run thousands of small ops: one thread avoids OpenMP contention on a 2-core machine.
torch.set_num_threads(1)

# Absolute layers for the 8-layer tiny decoder: prune after layers 2, 3, 5 (1-indexed), accumulate 2..5.
TINY_SCHEDULE = dict(accumulation_layers=(2, 3, 4, 5), pruning_layers=(2, 3, 5), keep_ratios=(0.875, 0.5, 0.25),
                     reference_depth=None)


def tiny_config(**overrides) -> TransPruneConfig:
    return TransPruneConfig(**{**TINY_SCHEDULE, **overrides})


def make_prompt(model, n_before: int, n_after: int, seed: int, n_image: int | None = None) -> torch.Tensor:
    """input_ids: text, the image placeholders, text (ids avoid the image and pad ids)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    low, high = 5, cfg.text_config.vocab_size
    reserved = {cfg.image_token_id, cfg.text_config.pad_token_id, getattr(cfg, "pad_token_id", None)}

    def text(n):
        ids = torch.randint(low, high, (n,), generator=gen)
        for r in reserved:
            if r is not None:
                ids[ids == r] = low
        return ids

    n_image = n_image if n_image is not None else n_image_tokens(model)
    return torch.cat([text(n_before), torch.full((n_image,), cfg.image_token_id), text(n_after)])


def n_image_tokens(model) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, length - len(p):] = p
        mask[b, length - len(p):] = 1
    return ids, mask


def pixels(model, n: int, seed: int) -> torch.Tensor:
    v = model.config.vision_config
    return torch.randn(n, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, mask, pix, n=20, **kw):
    """``n`` greedy tokens of LLaVA-style inputs given as tensors (the suite's one greedy, with `greedy_on`)."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=n, do_sample=False, **kw)
    return out[:, ids.shape[1]:]


def greedy_on(model, inputs, n=20):
    """``n`` greedy tokens of a processor's inputs (any family)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def assert_batch_matches_single(model, config, prompts, pix, n=20):
    """Greedy tokens and kept indices of a padded batch equal each prompt run alone; returns the batch stats."""
    ids, mask = left_pad(prompts)
    with transprune.pruned(model, config) as handle:
        tokens = greedy(model, ids, mask, pix, n)
        stats = handle.last_stats
        for b, p in enumerate(prompts):
            alone = greedy(model, p[None], torch.ones(1, len(p), dtype=torch.long), pix[b:b + 1], n)
            assert torch.equal(alone[0], tokens[b])
            assert handle.last_stats[0].kept_indices == stats[b].kept_indices
    return stats


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def llava_eager():
    return tiny_llava(seed=0, attn_implementation="eager")


@pytest.fixture(scope="module")
def random_mini(tmp_path_factory):
    """An untrained mini model saved like the shipped one: for mechanics (not accuracy)."""
    from transprune.mini.model import build_mini, mini_processor

    folder = tmp_path_factory.mktemp("mini")
    build_mini(seed=3).save_pretrained(folder)
    mini_processor().save_pretrained(folder)
    return folder


TOKEN_KEYS = {"input_ids": PAD_ID, "attention_mask": 0, "mm_token_type_ids": 0}  # per-token inputs, their pad value


def mixed_batch(*samples) -> dict:
    """One left-padded batch of single-sample inputs of different kinds (e.g. an image prompt and a video prompt):
    per-token inputs are padded and stacked, every other input (pixels, grids) comes from the sample that has it."""
    length = max(s["input_ids"].shape[1] for s in samples)

    def pad(x, value):
        x = x.long() if x.dtype == torch.int32 else x
        return torch.cat([torch.full((1, length - x.shape[1]), value, dtype=x.dtype), x], dim=1)

    batch = {key: torch.cat([pad(s[key], value) for s in samples]) for key, value in TOKEN_KEYS.items()
             if all(key in s for s in samples)}
    for s in samples:
        batch.update({k: v for k, v in s.items() if k not in TOKEN_KEYS})
    return batch


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true",
                     help="also run the speed benchmarks (tests/test_speed_goal.py: minutes per case)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="a benchmark: run it with pytest --benchmark tests/test_speed_goal.py")
    for item in items:
        if "benchmark" in item.keywords:
            item.add_marker(skip)
