"""FLOPs accounting for TransPrune schedules (../shared/method.md §10).

Two numbers are reported, and kept apart on purpose:

* **Paper convention** (`tflops`): the first term of the paper's Eq. 7 summed over the decoder,
  ``4nd² + 2n²d + 3ndm`` per layer with n = *visual tokens only*, prefill only, counted as
  multiply-accumulates (FastV/PDrop convention, not 2·MACs). This reproduces every TFLOPs number in
  the paper's tables (1.56 / 1.19 / 3.82 for LLaVA-1.5-7B, 8.33 / 6.41 / 20.83 for LLaVA-NeXT-7B).
* **Full prefill** (`tflops_full`): the same MAC convention over *all* tokens (visual + text), with
  GQA-aware k/v projections, plus the cost of TransPrune's own scoring (TTV and IGA). Still prefill
  only; the LM head, embeddings, norms and softmax are left out as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from .accounting import ArchSpec, paper_tflops_of
from .schedule import Schedule


def _arch_table():
    from .adapters import ArchTable

    # the nominal N is the family's (LLaVA-NeXT's 2880 = 5 x 576 without newline tokens, the paper's number; Qwen's
    # 256 for a 448 x 448 image; see each `arch_spec`)
    return ArchTable(lambda family, build, name: family.arch_spec(build(), name), "full")


# name -> ArchSpec of every registered family's named full-size archs (`ModelAdapter.archs`), a live view
ARCHS: Mapping[str, ArchSpec] = _arch_table()


def arch_from_config(path) -> ArchSpec:
    """Read an ArchSpec from a checkpoint folder or its ``config.json`` (any supported family; the family's
    adapter says how its image tokens are counted)."""
    from transformers import AutoConfig  # imported here so the paper arithmetic needs no transformers

    from .loading import read_config_json

    path = Path(path)
    # AutoConfig fills the defaults a saved config.json leaves out; it wants the folder for config.json.
    source = path.parent if path.is_file() and path.name == "config.json" else path
    if not (source / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: give a checkpoint folder (or its config.json), or one of "
                         f"{', '.join(ARCHS)}")
    read_config_json(source / "config.json")  # a readable JSON object, else an error naming the file
    cfg = AutoConfig.from_pretrained(str(source))
    return arch_from_hf_config(cfg, source.name if source.is_dir() else source.stem, where=str(path))


def arch_from_hf_config(cfg, name: str, where: str | None = None) -> ArchSpec:
    """`arch_from_config` for a config object already in memory (e.g. a `LlavaConfig` built in code)."""
    from .adapters import family_for

    return family_for(cfg.model_type, where or name).arch_spec(cfg, name)


def with_image_size(arch: ArchSpec, image_size) -> ArchSpec:
    """``arch`` with the visual-token count of one image of ``image_size`` (h, w) pixels, for a dynamic-resolution
    family (each side a multiple of ``arch.pixels_per_token``, as the image processor resizes to)."""
    import dataclasses

    arch = resolve_arch(arch)
    if arch.pixels_per_token is None:
        raise ValueError(f"--image-size does not apply to {arch.name}: its vision tower gives a fixed "
                         f"{arch.image_tokens} image tokens (N) whatever the image size")
    factor = arch.pixels_per_token
    height, width = image_size
    if height % factor or width % factor:
        raise ValueError(f"--image-size {height}x{width}: on {arch.name} each side must be a multiple of {factor} "
                         f"pixels (one visual token per {factor}x{factor}), e.g. "
                         f"{max(factor, round(height / factor) * factor)}x{max(factor, round(width / factor) * factor)}")
    return dataclasses.replace(arch, image_tokens=(height // factor) * (width // factor), nominal_image_size=(height, width))


def resolve_arch(name_or_path) -> ArchSpec:
    """A name from `ARCHS`, or an existing checkpoint folder / config.json."""
    if isinstance(name_or_path, ArchSpec):
        return name_or_path
    if str(name_or_path) in ARCHS:
        return ARCHS[str(name_or_path)]
    if Path(name_or_path).exists():
        return arch_from_config(name_or_path)
    raise ValueError(
        f"unknown arch {str(name_or_path)!r}: use one of {', '.join(ARCHS)} or a path to a checkpoint "
        f"folder or its config.json"
    )


def paper_tflops(arch: ArchSpec, tokens_per_layer) -> float:
    """Paper-convention TFLOPs for a list of visual-token counts, one per decoder layer."""
    tokens_per_layer = list(tokens_per_layer)
    if len(tokens_per_layer) != arch.num_layers:
        raise ValueError(f"{arch.name} has {arch.num_layers} layers, got {len(tokens_per_layer)} token counts")
    return paper_tflops_of(tokens_per_layer, arch.hidden_size, arch.intermediate_size)


def full_layer_macs(n: int, arch: ArchSpec) -> int:
    """One decoder layer over n tokens (visual + text) with GQA-sized k/v projections (MACs)."""
    d = arch.hidden_size
    return 2 * n * d * d + 2 * n * d * arch.kv_dim + 2 * n * n * d + 3 * n * d * arch.intermediate_size


# TTV per (module input, module output) pair and token: ||x||, ||y|| and <x, y> are 3d MACs; the
# magnitude ratio, cosine and softmax add O(1) per token. Rounded up to 4d; two pairs per layer.
TTV_MACS_PER_PAIR = 4


def scoring_macs(arch: ArchSpec, schedule: Schedule, tokens_per_layer, text_tokens: int, query_tokens: int) -> int:
    """TransPrune's own scoring cost during prefill (MACs); zero when the schedule never prunes.

    TTV runs at each accumulation layer up to the last pruning layer, over the whole sequence.
    IGA runs at each pruning layer p with layer p+1's weights on the un-pruned sequence: input
    RMSNorm (n·d), K for all n tokens, Q for the query rows after the image, and the Q·Kᵀ scores.
    """
    if not schedule.pruning_layers:
        return 0
    d, last = arch.hidden_size, schedule.pruning_layers[-1]
    total = 0
    for layer in schedule.accumulation_layers:
        if layer <= last:
            n = tokens_per_layer[layer - 1] + text_tokens
            total += 2 * TTV_MACS_PER_PAIR * n * d
    for layer in schedule.pruning_layers:
        n = tokens_per_layer[layer - 1] + text_tokens  # sequence length before this stage's prune
        total += n * d + n * d * arch.kv_dim + query_tokens * d * d + query_tokens * n * d
    return total


@dataclass(frozen=True)
class FlopsReport:
    arch: str
    preset: str
    depth: int
    accumulation_layers: tuple[int, ...]  # as resolved for this depth (schedule actually used)
    pruning_layers: tuple[int, ...]
    keep_ratios: tuple[float, ...]
    image_tokens: int
    visual_tokens_per_layer: tuple[int, ...]
    tflops: float  # paper convention
    tflops_unpruned: float
    ratio: float  # tflops / tflops_unpruned (the paper rounds the TFLOPs before dividing)
    # Visual tokens summed over the layers / N x depth: a cost linear in the tokens, the convention the paper's
    # Qwen2.5-VL-7B numbers follow (45.1% TransPrune-High, 53.6% FastV; ../shared/method.md 6.1).
    ratio_token_linear: float
    tflops_full: float  # full prefill: text + visual tokens, GQA k/v, scoring overhead
    tflops_full_unpruned: float
    tflops_scoring: float  # the scoring part of tflops_full
    text_tokens: int
    query_tokens: int
    # The in-LLM method's position rule on this arch's family (as `apply` resolves it); None: no in-LLM
    # method, or an arch whose family is unknown. It does not change the FLOPs.
    positions: str | None = None
    image_size: tuple[int, int] | None = None  # (h, w) the count N is for, on dynamic-resolution archs
    # The KV cache a prefill leaves, per sample, in bf16: 2 (k, v) x kv_dim x (text + visual tokens) per layer.
    kv_cache_bytes: int = 0
    kv_cache_bytes_unpruned: int = 0
    ffn: str | None = None  # how the FFN width was counted, where not dense (`ArchSpec.ffn`)

    def to_dict(self) -> dict:
        return {**asdict(self), "positions": None if self.positions is None else str(self.positions)}


def resolved_for_arch(config, arch):
    """``config`` as `apply` would run it on ``arch``'s family (its position rule; see `methods.Plan.resolved_for`),
    in the shape given; unchanged for an arch of unknown family."""
    return plan_for_arch(config, arch).config


def plan_for_arch(config, arch):
    """The `methods.Plan` of ``config`` as `apply` would run it on ``arch``'s family: what its methods need of the
    family checked, positions resolved; unchecked for an arch of unknown family."""
    from .adapters import family_for
    from .methods import Plan

    plan = Plan.of(config)
    arch = resolve_arch(arch)
    if arch.model_type is None:
        return plan
    family = family_for(arch.model_type)
    if plan.pre is not None:
        plan.pre.check_family(family)  # as `apply`
    return plan.resolved_for(family)


def estimate(config, arch, text_tokens: int = 64, query_tokens: int | None = None) -> FlopsReport:
    """Paper-convention and full-prefill TFLOPs of ``config`` on ``arch`` (an ArchSpec, name or path).

    ``config`` is any method config or a composition list (see `transprune.methods`). ``text_tokens``
    counts every non-image token of the prompt; ``query_tokens`` (TransPrune's IGA query rows, the text
    after the image) defaults to all of them; FastV and PDrop score from the last token only, the random
    and uniform baselines cost nothing to score. A pre-LLM method (VisionZip) sets the image-token count
    that reaches the LLM, and the in-LLM ratios apply to that count.
    """
    arch = resolve_arch(arch)
    plan = plan_for_arch(config, arch)
    query_tokens = text_tokens if query_tokens is None else query_tokens
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 0:
        raise ValueError(f"text_tokens must be an int >= 0, got {text_tokens!r}")
    if isinstance(query_tokens, bool) or not isinstance(query_tokens, int) or not 0 <= query_tokens <= text_tokens:
        raise ValueError(f"query_tokens must be an int in [0, text_tokens={text_tokens}], got {query_tokens!r}")

    pre, llm = plan.pre, plan.llm
    schedule = llm.layers_for_depth(arch.num_layers) if llm is not None else Schedule.none(arch.num_layers)
    n_llm = arch.image_tokens if pre is None else pre.llm_tokens(arch)
    visual = schedule.tokens_per_layer(n_llm)
    unpruned = [arch.image_tokens] * arch.num_layers
    tflops, tflops_unpruned = paper_tflops(arch, visual), paper_tflops(arch, unpruned)
    rows = llm.scoring_query_rows(query_tokens) if llm is not None else None  # None: scoring is free
    if rows is not None:
        query_tokens = rows
    scoring = 0.0 if rows is None else scoring_macs(arch, schedule, visual, text_tokens, query_tokens) / 1e12
    # the methods' own selection work (DART's pivots, DivPrune's and CDPruner's similarity matrices, ...)
    selection = 0
    if pre is not None:
        selection += pre.selection_macs(arch.image_tokens, arch.hidden_size, text_tokens)
    if llm is not None:
        selection += sum(llm.selection_macs(visual[p - 1], arch.hidden_size, text_tokens) for p in schedule.pruning_layers)
    scoring += selection / 1e12

    def full(counts):
        return sum(full_layer_macs(n + text_tokens, arch) for n in counts) / 1e12

    return FlopsReport(
        arch=arch.name,
        preset=llm.name if llm is not None and llm.name != "custom" else plan.names or "none",
        depth=schedule.depth,
        accumulation_layers=schedule.accumulation_layers,
        pruning_layers=schedule.pruning_layers,
        keep_ratios=schedule.keep_ratios,
        image_tokens=arch.image_tokens,
        visual_tokens_per_layer=tuple(visual),
        tflops=tflops,
        tflops_unpruned=tflops_unpruned,
        ratio=tflops / tflops_unpruned,
        ratio_token_linear=sum(visual) / sum(unpruned),
        tflops_full=full(visual) + scoring,
        tflops_full_unpruned=full(unpruned),
        tflops_scoring=scoring,
        text_tokens=text_tokens,
        query_tokens=query_tokens,
        positions=llm.positions if llm is not None else None,
        image_size=arch.nominal_image_size,
        kv_cache_bytes=kv_bytes(arch, visual, text_tokens),
        kv_cache_bytes_unpruned=kv_bytes(arch, unpruned, text_tokens),
        ffn=arch.ffn,
    )


def kv_bytes(arch: ArchSpec, visual_per_layer, text_tokens: int, bytes_per_value: int = 2) -> int:
    """Bytes of the KV cache one sample's prefill leaves: k and v of every token each layer keeps (bf16 by default)."""
    return sum(2 * arch.kv_dim * (n + text_tokens) * bytes_per_value for n in visual_per_layer)


def compress_runs(values) -> str:
    """[576]*7 + [504]*2 -> '7x576, 2x504'."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][1] == v:
            runs[-1][0] += 1
        else:
            runs.append([1, v])
    return ", ".join(f"{count}x{value}" for count, value in runs)
