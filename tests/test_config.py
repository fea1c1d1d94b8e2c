import re

import pytest

from transprune.config import Schedule, TransPruneConfig


def test_defaults_are_the_high_preset():
    high = TransPruneConfig.preset("high")
    assert high == TransPruneConfig()
    assert high.accumulation_layers == (7, 8, 9, 10, 11, 12)
    assert high.pruning_layers == (7, 9, 12)
    assert high.keep_ratios == (0.875, 0.625, 0.125)
    assert (high.alpha, high.direction, high.positions, high.score) == (0.5, "1-cos", "compact", "transprune")


def test_low_and_off_presets():
    assert TransPruneConfig.preset("low").keep_ratios == (0.625, 0.1875, 0.0625)
    off = TransPruneConfig.preset("off")
    assert not off.enabled and off.pruning_layers == ()


def test_preset_overrides_and_unknown_name():
    cfg = TransPruneConfig.preset("low", direction="1-abs-cos")
    assert cfg.direction == "1-abs-cos" and cfg.keep_ratios == (0.625, 0.1875, 0.0625)
    with pytest.raises(ValueError, match="'high', 'low', 'off'"):
        TransPruneConfig.preset("medium")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep_ratios=(0.9, 0.95, 0.1)), "keep_ratios must not increase"),
        (dict(keep_ratios=(0.0, 0.0, 0.0)), r"keep_ratios must lie in \(0, 1\]"),
        (dict(keep_ratios=(1.5, 0.5, 0.1)), r"keep_ratios must lie in \(0, 1\]"),
        (dict(keep_ratios=(0.5, 0.25)), "one ratio per pruning layer"),
        (dict(pruning_layers=(9, 7, 12)), "pruning_layers must be strictly increasing"),
        (dict(pruning_layers=(7, 9, 32), reference_depth=32), "pruning_layers must be < reference_depth=32"),
        (dict(pruning_layers=(0, 9, 12)), "1-indexed"),
        (dict(accumulation_layers=(7, 40), reference_depth=32), "accumulation_layers must be <= reference_depth=32"),
        (dict(direction="cos"), "direction='cos' is not allowed; choose one of '1-cos', '1-abs-cos'"),
        (dict(positions="rope"), "positions='rope' is not allowed; choose one of 'compact', 'original'"),
        (dict(score="attention"), "score='attention' is not allowed; choose one of 'transprune', 'ttv', 'iga'"),
        (dict(alpha=1.5), r"alpha must be a number in \[0, 1\]"),
        (dict(reference_depth=1), "reference_depth"),
    ],
)
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransPruneConfig(**kwargs)


def test_bad_types_name_the_field():
    with pytest.raises(TypeError, match="pruning_layers must hold ints"):
        TransPruneConfig(pruning_layers=(7.0, 9, 12))
    with pytest.raises(TypeError, match="keep_ratios"):
        TransPruneConfig(keep_ratios=("a", "b", "c"))


def test_schedule_at_reference_depth_is_unchanged():
    s = TransPruneConfig().layers_for_depth(32)
    assert (s.accumulation_layers, s.pruning_layers) == ((7, 8, 9, 10, 11, 12), (7, 9, 12))
    assert s.tokens_per_layer(576) == [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20


@pytest.mark.parametrize(
    "depth, pruning, accumulation",
    [(40, (9, 11, 15), tuple(range(9, 16))), (16, (4, 5, 6), (4, 5, 6)), (12, (3, 4, 5), (3, 4, 5))],
)
def test_schedule_maps_proportionally(depth, pruning, accumulation):
    s = TransPruneConfig(reference_depth=32).layers_for_depth(depth)
    assert s.pruning_layers == pruning and s.accumulation_layers == accumulation
    assert all(p < depth for p in s.pruning_layers)


def test_absolute_layers_must_fit_the_model():
    cfg = TransPruneConfig(accumulation_layers=(2, 3), pruning_layers=(2, 8), keep_ratios=(0.5, 0.25), reference_depth=None)
    assert cfg.layers_for_depth(9).pruning_layers == (2, 8)
    with pytest.raises(ValueError, match="do not fit a 8-layer decoder"):
        cfg.layers_for_depth(8)


def test_tokens_per_layer_uses_int_of_original_count():
    s = Schedule(depth=6, accumulation_layers=(1, 2), pruning_layers=(1, 3), keep_ratios=(0.7, 0.29))
    # int() truncation on fractions of the ORIGINAL count, as the official code does
    assert s.tokens_per_layer(100) == [100, 70, 70, int(100 * 0.29), int(100 * 0.29), int(100 * 0.29)]


def test_layer_numbers_are_used_as_written_on_every_depth_they_fit():
    from transprune import FastVConfig, PDropConfig, RandomConfig, UniformConfig

    for depth in (13, 28, 32, 40):  # the paper ran 7/9/12 unmapped on Qwen2.5-VL-7B's 28 layers
        s = TransPruneConfig.preset("high").layers_for_depth(depth)
        assert (s.pruning_layers, s.accumulation_layers) == ((7, 9, 12), (7, 8, 9, 10, 11, 12))
    assert TransPruneConfig(accumulation_layers=(3, 4, 5, 6), pruning_layers=(3, 4, 6)).layers_for_depth(12).pruning_layers == (3, 4, 6)
    assert TransPruneConfig.preset("high", reference_depth=32).layers_for_depth(12).pruning_layers == (3, 4, 5)
    # every method's layer fields follow the same rule, and a schedule that does not fit names layers and depth
    with pytest.warns(UserWarning, match=r"preset 'low'.*mapped from the paper's 32-layer decoder"):  # a named preset
        assert TransPruneConfig.preset("low").layers_for_depth(12) == \
            TransPruneConfig.preset("low", reference_depth=32).layers_for_depth(12)
    for config, written in [(TransPruneConfig(), "pruning_layers=(7, 9, 12)"), (FastVConfig(k=12), "k=12"),
                            (PDropConfig(), "layers=(8, 16, 24)"), (RandomConfig(), "pruning_layers=(7, 9, 12)"),
                            (UniformConfig(), "pruning_layers=(7, 9, 12)")]:
        with pytest.raises(ValueError, match=rf"{re.escape(written)} \(as written\) do not fit a 12-layer decoder.*reference_depth"):
            config.layers_for_depth(12)
        mapped = type(config)(**{**{f: getattr(config, f) for f in config.__dataclass_fields__}, "reference_depth": 32})
        assert max(mapped.layers_for_depth(12).pruning_layers) < 12
    assert FastVConfig(k=2).layers_for_depth(12).pruning_layers == (2,)
    assert PDropConfig().layers_for_depth(28).pruning_layers == (8, 16, 24)


@pytest.mark.parametrize("score", ["transprune", "ttv"])
def test_a_schedule_whose_ttv_cannot_be_computed_is_a_config_error(score):
    with pytest.raises(ValueError, match=r"accumulation_layers=\(9, 10\) has no layer at or before the first pruning layer 7"):
        TransPruneConfig(accumulation_layers=(9, 10), pruning_layers=(7, 9, 12), score=score)
    with pytest.raises(ValueError, match="accumulation_layers=()"):
        TransPruneConfig(accumulation_layers=(), score=score)
    TransPruneConfig(accumulation_layers=(9, 10), score="iga")  # IGA alone needs no TTV
    TransPruneConfig.preset("off", accumulation_layers=())  # nothing pruned, nothing scored
