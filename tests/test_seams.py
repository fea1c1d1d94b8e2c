"""The two seams are enough on their own: a family and a method registered here, in the test only, run
through the whole runtime (prefill, selection, decode, stats) with no change anywhere else.

Copy these when adding a family or a method (docs/architecture.md)."""

from dataclasses import dataclass

import pytest
import torch

import transprune
from transprune import adapters, flops, methods
from transprune.adapters.llava import LlavaAdapter
from transprune.methods import InLLMMethod, StageView
from transprune.methods.base import OnEmbeddings, check_keep_ratios, check_layers
from transprune.surgery import Layout, drop_tokens
from transprune.testing import tiny_llava

from conftest import greedy, left_pad, make_prompt, pixels, tiny_config


class ThreeRowPositions(LlavaAdapter):
    """LLaVA with its 1-D positions held as three equal rows, (3, B, L), the layout mRoPE families use; RoPE
    reads row 0. Everything position-shaped goes through this adapter, so results must equal LLaVA's."""

    family = "llava-3row"
    model_types = ("llava_3row_test",)

    def prefill_positions(self, position_ids, batch, length, past, device):
        return self._three(super().prefill_positions(None if position_ids is None else self._one(position_ids),
                                                     batch, length, past, device))

    def continuation_positions(self, position_ids, next_position, length):
        one = None if position_ids is None else self._one(position_ids)
        return self._three(super().continuation_positions(one, next_position, length))

    def next_position(self, positions):
        assert positions.shape[0] == 3
        return positions[0, :, -1] + 1

    def close_up(self, positions, valid, dropped):
        assert positions.shape[0] == 3  # the rule sees the family's own layout
        return positions - dropped.long().cumsum(1)[None]

    def shift_positions(self, positions, shift):
        return positions - shift[None, :, None]

    def rope(self, h, positions):
        return super().rope(h, positions[0])

    def layer_position_ids(self, positions):
        return positions[0]

    @staticmethod
    def _one(positions):
        return positions[0] if positions.dim() == 3 else positions

    @staticmethod
    def _three(positions):
        return positions.expand(3, *positions.shape) if positions.dim() == 2 else positions


@pytest.fixture
def three_row_family():
    adapters.register_family(ThreeRowPositions)
    yield ThreeRowPositions
    adapters.unregister_family(ThreeRowPositions)


@pytest.mark.parametrize("config", [tiny_config(), tiny_config(positions="original"),
                                    transprune.FastVConfig(k=2, reference_depth=None),
                                    [transprune.VisionZipConfig(20, 6), tiny_config(keep_ratios=(0.5, 0.25, 0.125))]],
                         ids=["compact", "original", "fastv", "visionzip+transprune"])
def test_a_family_with_3d_positions_runs_unchanged_through_the_runtime(llava, three_row_family, config):
    prompts = [make_prompt(llava, 3, 6, seed=1), make_prompt(llava, 7, 4, seed=2)]
    ids, mask = left_pad(prompts)
    pix = pixels(llava, 2, seed=3)
    results = {}
    registry = list(adapters.FAMILIES)
    try:
        for family in ("llava", "llava-3row"):
            adapters.FAMILIES.sort(key=lambda a: a.family == family)  # the last registered match wins
            with transprune.pruned(llava, config) as handle, torch.no_grad():
                assert handle.adapter.family == family
                logits = llava(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
                results[family] = (logits, greedy(llava, ids, mask, pix, n=8),
                                   [s.kept_indices for s in handle.last_stats])
    finally:
        adapters.FAMILIES[:] = registry  # the registry's order, for the tests after this one
    (la, ta, ka), (lb, tb, kb) = results.values()
    assert torch.equal(la, lb) and torch.equal(ta, tb) and ka == kb


def test_surgery_gathers_3d_positions_along_the_token_axis():
    valid = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    image = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    positions = torch.stack([torch.arange(5).expand(2, 5), 10 + torch.arange(5).expand(2, 5),
                             20 + torch.arange(5).expand(2, 5)])  # (3, B, L): t, h, w rows
    layout = Layout.initial(valid, image, positions)
    keep = valid & ~(image & (layout.image_rank == 0))
    new, index = drop_tokens(layout, keep)
    assert new.positions.shape == (3, 2, 4)
    for row, offset in enumerate((0, 10, 20)):  # kept tokens keep their own (t, h, w) positions
        assert new.positions[row, 0, 1:].tolist() == [offset + c for c in (1, 3, 4)]
        assert new.positions[row, 1].tolist() == [offset + c for c in (0, 2, 3, 4)]
    assert new.orig_index[1].tolist() == [0, 2, 3, 4] and new.image_rank[1].tolist() == [-1, 1, 2, -1]  # original ranks


@dataclass(frozen=True)
class LowestNormConfig(InLLMMethod):
    """A method written in the test only: keep the image tokens whose hidden state after the layer is smallest."""

    pruning_layers: tuple = (3,)
    keep_ratios: tuple = (0.25,)
    positions: str = "original"
    reference_depth: int | None = None
    method = "lowest-norm"

    def __post_init__(self):
        check_layers("pruning_layers", self.pruning_layers, None)
        object.__setattr__(self, "keep_ratios", check_keep_ratios(self.keep_ratios, self.pruning_layers))

    def rank(self, view: StageView):
        return -view.h[:, view.image_at].float().norm(dim=-1), {}


@pytest.fixture
def lowest_norm():
    methods.register_method("lowest-norm", LowestNormConfig)
    yield LowestNormConfig
    methods.unregister_method("lowest-norm")


def test_a_method_registered_outside_the_package_runs_everywhere(llava, lowest_norm):
    prompt = make_prompt(llava, 3, 6, seed=4)
    ids, pix = prompt[None], pixels(llava, 1, seed=5)
    with torch.no_grad():  # reference: layer 3's output of the unpruned model, image tokens ranked by norm
        hidden = llava(input_ids=ids, pixel_values=pix, output_hidden_states=True).hidden_states[3][0]
    image = (ids[0] == llava.config.image_token_id).nonzero().squeeze(1)
    expected = sorted(torch.sort(hidden[image].norm(dim=-1), stable=True).indices[:16].tolist())
    config = methods.build("lowest-norm", params={"keep_ratios": "0.25,"})  # the CLI's grammar finds it by name
    assert config == LowestNormConfig()
    with transprune.pruned(llava, config) as handle:
        greedy(llava, ids, torch.ones_like(ids), pix, n=3)
    stats = handle.last_stats[0]
    assert stats.kept_indices == [expected] and stats.visual_tokens_per_layer == [64] * 3 + [16] * 5
    report = flops.estimate(config, "llava-1.5-7b")
    assert report.visual_tokens_per_layer[:4] == (576, 576, 576, 144) and report.tflops_scoring == 0
    # a batch of different prompts equals each alone
    prompts = [prompt, make_prompt(llava, 8, 2, seed=6)]
    ids2, mask2 = left_pad(prompts)
    pix2 = torch.cat([pix, pixels(llava, 1, seed=7)])
    with transprune.pruned(llava, config) as handle:
        batch = greedy(llava, ids2, mask2, pix2, n=4)
        for b, p in enumerate(prompts):
            assert torch.equal(greedy(llava, p[None], torch.ones(1, len(p), dtype=torch.long), pix2[b:b + 1], n=4)[0],
                               batch[b])
    with pytest.raises(ValueError, match="already registered"):
        methods.register_method("lowest-norm", type("Other", (LowestNormConfig,), {}))


def test_a_family_whose_classes_the_installed_transformers_lacks_is_unavailable_not_a_crash(tmp_path, monkeypatch):
    """Loading a family module that imports a class the installed transformers does not have records the family as
    unavailable, with the release it needs, and tools name that instead of 'not supported'."""
    import json
    import sys
    from pathlib import Path

    import transformers

    import transprune.adapters as adapters
    from transprune.loading import load_config

    # every family of the registry is available on the installed release (the tested range has them all)
    assert not {t for a in adapters.FAMILIES for t in a.model_types} & set(adapters.UNAVAILABLE)
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "data"))
    monkeypatch.setattr(adapters, "UNAVAILABLE", {})
    before = list(adapters.FAMILIES)
    assert adapters.load_family("family_from_the_future", "FutureAdapter", ("qwen9_vl",), "9.0") is None
    assert adapters.FAMILIES == before and "family_from_the_future" not in sys.modules
    reason = adapters.UNAVAILABLE["qwen9_vl"]
    assert reason.startswith(f"needs transformers >= 9.0, and {transformers.__version__} is installed")
    assert "Qwen9VLForConditionalGeneration" in reason
    with pytest.raises(ValueError, match=r"model_type 'qwen9_vl' needs transformers >= 9.0"):
        adapters.family_for("qwen9_vl")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen9_vl"}))
    with pytest.raises(ValueError, match=r"a 'qwen9_vl' checkpoint, whose family needs transformers >= 9.0"):
        load_config(tmp_path)


@dataclass(frozen=True)
class FirstTokensConfig(OnEmbeddings):
    """A pre-LLM method written in the test only, with presets declared as field values: keep the first tokens."""

    keep_ratio: float = 0.5
    method = "first-tokens"
    presets = {"half": {"keep_ratio": 0.5}, "quarter": {"keep_ratio": 0.25}}

    @staticmethod
    def order(image, text, k):
        return torch.arange(k, device=image.device)


@pytest.fixture
def first_tokens():
    methods.register_method("first-tokens", FirstTokensConfig)
    yield FirstTokensConfig
    methods.unregister_method("first-tokens")


def test_a_pre_llm_method_declares_its_presets_and_every_tool_reads_them(llava, first_tokens):
    """Its presets reach the grammar (`first-tokens-quarter`), `--preset` (alone and composed: it applies to the
    method that has it), bench's names and the FLOPs tool, with nothing but the declared contract."""
    from transprune.bench import method_names

    assert methods.build("first-tokens-quarter") == FirstTokensConfig(0.25)
    assert methods.build("first-tokens", "quarter") == FirstTokensConfig(0.25)
    assert methods.build("first-tokens") == FirstTokensConfig(0.5)  # a bare name: the first preset
    composed = methods.build("first-tokens+transprune", "quarter")  # TransPrune has no "quarter": its default
    assert composed == [FirstTokensConfig(0.25), methods.TransPruneConfig.preset("high")]
    assert "quarter" in methods.all_presets() and "first-tokens-quarter" in method_names()
    with pytest.raises(ValueError, match="no preset of first-tokens; theirs: .*'half', 'quarter'"):
        methods.build("first-tokens", "high")
    assert flops.estimate(FirstTokensConfig(0.25), "llava-1.5-7b").visual_tokens_per_layer[0] == 144
    prompt = make_prompt(llava, 3, 6, seed=4)
    with transprune.pruned(llava, FirstTokensConfig(0.25)) as handle, torch.no_grad():
        llava(input_ids=prompt[None], pixel_values=pixels(llava, 1, seed=5))
    assert handle.last_stats[0].kept_indices == [list(range(16))]


def test_the_registry_takes_only_declared_kinds_and_needs():
    @dataclass(frozen=True)
    class Undeclared:  # the old duck-typed shape: a stage attribute, no kind
        stage = "in"
        method = "undeclared"

    with pytest.raises(TypeError, match="must subclass one kind of method"):
        methods.register_method("undeclared", Undeclared)

    @dataclass(frozen=True)
    class NeedsTheMoon(FirstTokensConfig):
        needs = frozenset({"the_moon"})

    with pytest.raises(TypeError, match=r"needs \['the_moon'\]: each one of vision_hooks"):
        methods.register_method("needs-the-moon", NeedsTheMoon)
    assert "undeclared" not in methods.METHODS and "needs-the-moon" not in methods.METHODS


def test_a_method_that_needs_vision_hooks_is_refused_where_the_family_has_none(monkeypatch, first_tokens):
    """`needs` is checked by one path, for a model (`apply`, before any change) and for an arch (the FLOPs tool)."""
    monkeypatch.setattr(LlavaAdapter, "vision_hooks_missing", "its tower is a test's")
    with pytest.raises(ValueError, match="VisionZipConfig needs vision-tower hooks that the llava adapter does not "
                                         "have: its tower is a test's"):
        flops.estimate(methods.VisionZipConfig(), "llava-1.5-7b")
    model = tiny_llava(seed=0)
    with pytest.raises(ValueError, match="needs vision-tower hooks"):
        transprune.apply(model, methods.VisionZipConfig())
    assert transprune.handle_of(model) is None
    assert flops.estimate(FirstTokensConfig(0.25), "llava-1.5-7b").visual_tokens_per_layer[0] == 144  # needs none


class Reduced3Row(ThreeRowPositions):
    """A family defined in this test that declares its facts the way a family file does: a named full-size arch, a
    reduced bench arch and (through `testing.register_tiny`, as its testing file's ``TINY`` would) a tiny model."""

    family = "llava-3row-declared"
    model_types = ("llava_3row_declared",)
    archs = {"llava-3row-7b": LlavaAdapter.archs["llava-1.5-7b"]}
    reduced_archs = {"llava-3row-reduced": LlavaAdapter.reduced_archs["llava-1.5-reduced"]}


def test_a_family_declares_its_archs_and_tiny_model_and_every_tool_reads_them():
    from transprune import testing
    from transprune.bench.archs import CONFIGS, REDUCED, arch_config

    assert "llava-3row-7b" not in flops.ARCHS
    try:
        adapters.register_family(Reduced3Row)
        testing.register_tiny("llava_3row_declared", tiny_llava, lambda: testing.tiny_processor("llava"))
        arch = flops.ARCHS["llava-3row-7b"]
        assert (arch.name, arch.num_layers, arch.image_tokens) == ("llava-3row-7b", 32, 576)
        assert flops.estimate(tiny_config(reference_depth=8), "llava-3row-7b").depth == 32  # the FLOPs tool names it
        assert "llava-3row-reduced" in list(REDUCED) and arch_config("llava-3row-reduced").text_config.hidden_size == 128
        assert list(CONFIGS).count("llava-3row-7b") == 1
        model = testing.tiny_model("llava_3row_declared", seed=0)
        assert type(model).__name__ == "LlavaForConditionalGeneration"
        with pytest.raises(ValueError, match="already declared"):
            testing.register_tiny("llava_3row_declared", tiny_llava, None)
    finally:
        if "llava_3row_declared" in testing.TINY_MODELS:
            testing.unregister_tiny("llava_3row_declared")
        if Reduced3Row in adapters.FAMILIES:
            adapters.unregister_family(Reduced3Row)
    assert "llava-3row-7b" not in flops.ARCHS and "llava-3row-reduced" not in CONFIGS  # the views follow the registry


def test_every_family_module_is_found_by_its_declaration_and_it_matches_the_adapter():
    """`adapters.discover` reads each family file's FAMILY without importing it; what it declares is what the adapter
    class says, and every declared family is registered, in the declared order."""
    import importlib

    import pkgutil

    found = adapters.discover()
    declared = {m for m, _ in found}
    for info in pkgutil.iter_modules(adapters.__path__):  # a module defining an adapter must declare it
        module = importlib.import_module(f".{info.name}", "transprune.adapters")
        own = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, adapters.ModelAdapter)
               and c.__module__ == module.__name__ and c.model_classes]
        assert not own or f".{info.name}" in declared, f"{info.name}.py defines {own} but no FAMILY"
    for module, facts in found:
        adapter = getattr(importlib.import_module(module, "transprune.adapters"), facts["adapter"])
        assert adapter in adapters.FAMILIES and tuple(facts["model_types"]) == adapter.model_types, module
