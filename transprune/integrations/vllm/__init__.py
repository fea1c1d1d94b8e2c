"""transprune inside vLLM: the pre-LLM methods (VisionZip, DivPrune, CDPruner) served by vLLM, through its
``vllm.general_plugins`` entry point (no fork of vLLM, no change to its own architectures).

`pip install "transprune[vllm]"` installs vLLM and registers the entry point ``transprune =
transprune.integrations.vllm:register``; vLLM runs it in every process it starts. It registers, under names of
their own (`ARCHS`), subclasses of vLLM's model classes that prune the visual tokens between the vision tower and
the LLM. A server opts in per model with ``hf_overrides``::

    vllm serve DIR --hf-overrides '{"architectures": ["TransPruneQwen2_5_VLForConditionalGeneration"],
                                    "transprune": {"method": "visionzip"}}'

(`hf_overrides` builds the dict), and a request may choose its own setting with ``mm_processor_kwargs=
{"transprune": ...}``. A setting is what `settings` reads: a method in the grammar every transprune tool takes
(``"divprune"``, ``"cdpruner-64"``, ``"none"``) or ``{"method": ..., "preset": ..., "params": {field: value}}``.
In-LLM methods are refused with the reason (vLLM's KV cache holds one token count per sequence for all layers).

The count an image keeps is a function of its grid and the setting alone (`ServedMethod.kept_of`), so the prompt
holds that many placeholders before the encoder runs; the selection itself is the library's code
(`VisionZipConfig.plan` on the scored block's q and k, `order` of the embedding methods), run on vLLM's encoder
output, and kept tokens keep their own mRoPE positions. This module imports vLLM only in `register`; the model
classes live in `qwen2_5_vl`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from typing import NamedTuple

from ... import methods as _methods

class Arch(NamedTuple):
    """One vLLM architecture this plugin serves: the name it registers for it, where its class is, and whether
    VisionZip runs there (it reads the vision tower; the embedding methods run on every family)."""

    name: str
    where: str
    visionzip: bool

    @property
    def default(self) -> str:
        """What a server of this architecture runs with no setting: VisionZip where it runs, else DivPrune."""
        return DEFAULT if self.visionzip else "divprune"


# vLLM's architecture -> the one this plugin registers for it.
ARCHS = {
    "Qwen2_5_VLForConditionalGeneration": Arch("TransPruneQwen2_5_VLForConditionalGeneration",
                                               "transprune.integrations.vllm.qwen2_5_vl:PrunedQwen2_5_VL", True),
    "Qwen3VLForConditionalGeneration": Arch("TransPruneQwen3VLForConditionalGeneration",
                                            "transprune.integrations.vllm.qwen3_vl:PrunedQwen3_VL", True),
    "LlavaForConditionalGeneration": Arch("TransPruneLlavaForConditionalGeneration",
                                          "transprune.integrations.vllm.llava:PrunedLlava", False),
    "LlavaNextForConditionalGeneration": Arch("TransPruneLlavaNextForConditionalGeneration",
                                              "transprune.integrations.vllm.llava:PrunedLlavaNext", False),
    "LlavaOnevisionForConditionalGeneration": Arch("TransPruneLlavaOnevisionForConditionalGeneration",
                                                   "transprune.integrations.vllm.llava:PrunedLlavaOnevision", False),
}
KEY = "transprune"  # the hf_overrides / mm_processor_kwargs key of the setting
DEFAULT = "visionzip"  # what a model registered under our architecture serves with no setting given
_SETTING_KEYS = ("method", "preset", "params")


@dataclass(frozen=True)
class ServedMethod:
    """A validated setting: the pre-LLM method (None: no pruning) and its canonical spelling (`key`, what the
    multimodal caches hash with each image)."""

    config: object | None
    key: str

    @property
    def name(self) -> str:
        return "none" if self.config is None else self.config.method

    @property
    def scores_tower(self) -> bool:
        """Whether the selection reads the vision tower's attention (VisionZip), so the encoder must capture it."""
        return isinstance(self.config, _methods.VisionZipConfig)

    @property
    def reads_instruction(self) -> bool:
        """Whether the selection reads the text after the image (CDPruner), which then joins the image's hash."""
        return getattr(self.config, "reads_instruction", False)

    def kept_of(self, units: list[int]) -> int:
        """Placeholders of an item cut into ``units`` (token counts of its frames): the grid and the setting alone."""
        return sum(units) if self.config is None else self.config.kept_of(units)


def hf_overrides(method=DEFAULT, preset: str | None = None, architecture: str = "Qwen2_5_VLForConditionalGeneration",
                 **params) -> dict:
    """The ``hf_overrides`` that serve ``architecture``'s model with this setting (checked here): for
    ``vllm.LLM(DIR, hf_overrides=...)`` or, as JSON, ``vllm serve DIR --hf-overrides``."""
    if architecture not in ARCHS:
        raise ValueError(f"architecture={architecture!r}: the vLLM plugin serves {', '.join(ARCHS)}")
    setting = {"method": method, "preset": preset, "params": params}
    check_arch(settings(setting), ARCHS[architecture].name)
    return {"architectures": [ARCHS[architecture].name], KEY: setting}


def check_arch(served: ServedMethod, registered: str) -> None:
    """Raise where the setting's method does not run on this architecture (VisionZip on the LLaVA families)."""
    arch = next((a for a in ARCHS.values() if a.name == registered), None)
    if served.scores_tower and arch is not None and not arch.visionzip:
        theirs = [a.name for a in ARCHS.values() if a.visionzip]
        raise ValueError(f"transprune: VisionZip reads the vision tower, which the vLLM plugin wires on "
                         f"{', '.join(theirs)} only, not on {registered}; serve divprune or cdpruner there")


def settings(setting, base=None) -> ServedMethod:
    """The `ServedMethod` of a setting: None (``base``, or the default), a method string, or a dict with keys
    ``method``, ``preset``, ``params``. A request's dict without ``method`` refines ``base`` (the server's); one
    with ``method`` stands alone. Raises ValueError naming what is wrong and what is allowed."""
    return from_key(_canonical(_merged(setting, base)))


def _merged(setting, base) -> str:
    base = _as_dict(base if base is not None else DEFAULT, "the server's setting")
    if setting is None:
        return json.dumps(base, sort_keys=True)
    mine = _as_dict(setting, "setting")
    if "method" not in mine:
        mine = {**base, **mine, "params": {**base.get("params", {}), **mine.get("params", {})}}
    return json.dumps(mine, sort_keys=True)


def _as_dict(setting, what: str) -> dict:
    if isinstance(setting, str):
        return {"method": setting}
    if not isinstance(setting, dict):
        raise ValueError(f"transprune: {what} must be a method string or a dict with keys {', '.join(_SETTING_KEYS)}, "
                         f"got {type(setting).__name__}")
    unknown = sorted(set(setting) - set(_SETTING_KEYS))
    if unknown:
        raise ValueError(f"transprune: unknown key(s) {unknown} in {what}; allowed: {', '.join(_SETTING_KEYS)} "
                         "(method fields go under 'params')")
    if "method" in setting and not isinstance(setting["method"], str):
        raise ValueError(f"transprune: 'method' must be a string in the method grammar, got {setting['method']!r}")
    params = setting.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"transprune: 'params' must be a dict of field: value, got {params!r}")
    return {**{k: v for k, v in setting.items() if v is not None}, "params": params}


@functools.lru_cache(maxsize=256)
def _canonical(merged: str) -> str:
    """The canonical key of a merged setting (JSON): the built config's fields, so equal settings hash equal."""
    setting = json.loads(merged)
    method = setting.get("method", DEFAULT)
    if method == "none":
        if setting.get("preset") or setting.get("params"):
            raise ValueError("transprune: method 'none' takes no preset or params")
        return "none"
    params = {k: _text(v) for k, v in setting.get("params", {}).items()}
    try:
        plan = _methods.Plan.of(_methods.build(method, setting.get("preset"), params))
    except (ValueError, TypeError) as err:
        raise ValueError(f"transprune: {err}; the vLLM plugin serves {', '.join(served_methods())} or 'none'") from None
    if plan.llm is not None:
        pre = f"; serve its pre-LLM stage alone with method={plan.pre.method!r}" if plan.pre else ""
        raise ValueError(f"transprune: {plan.llm.method} prunes inside the LLM, which vLLM cannot serve: its paged KV "
                         "cache keeps one token count per sequence for every layer (docs/serving.md, section 2)" + pre
                         + f"; served methods: {', '.join(served_methods())}, or 'none'")
    if not (isinstance(plan.pre, (_methods.VisionZipConfig, _methods.OnEmbeddings))):
        raise ValueError(f"transprune: {plan.pre.method} has no vLLM path; served methods: "
                         f"{', '.join(served_methods())}, or 'none'")
    values = {f.name: getattr(plan.pre, f.name) for f in fields(plan.pre)}
    return json.dumps({"method": plan.pre.method, **values}, sort_keys=True)


@functools.lru_cache(maxsize=256)
def from_key(key: str) -> ServedMethod:
    """The `ServedMethod` of a canonical key (what the processor ships with each image to the model)."""
    if key == "none":
        return ServedMethod(None, key)
    values = json.loads(key)
    cls = _methods.METHODS[values.pop("method")]
    return ServedMethod(cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}), key)


def served_methods() -> list[str]:
    """The registered methods the plugin serves: VisionZip and every method that chooses from the embeddings."""
    return [name for name, cls in _methods.METHODS.items()
            if issubclass(cls, (_methods.VisionZipConfig, _methods.OnEmbeddings))]


def _text(value) -> str:
    """A params value in the CLI's ``--set`` spelling, which `methods.build` parses."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(_text, value)) + ("," if len(value) == 1 else "")
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return str(value)


def check_engine(vllm_config) -> None:
    """What vLLM calls before it starts an engine for one of our architectures (`StartupCheck`): the server's
    setting and the engine options it needs, each a ValueError naming the field."""
    model_config = vllm_config.model_config
    served = check_model(model_config)
    parallel = vllm_config.parallel_config
    if served.scores_tower and parallel.tensor_parallel_size > 1:
        raise ValueError("transprune: VisionZip scores every head of one vision block together, and with "
                         f"tensor_parallel_size={parallel.tensor_parallel_size} each process holds a share of "
                         "them; serve it with tensor_parallel_size=1 or use divprune / cdpruner")
    mm = model_config.multimodal_config
    if served.scores_tower and mm is not None and mm.mm_encoder_tp_mode == "data":
        raise ValueError("transprune: VisionZip reads each image's rows of the scored vision block in order, and "
                         "mm_encoder_tp_mode='data' reorders the images between processes; use 'weights' (the default)")
    if served.scores_tower and getattr(vllm_config.compilation_config, "compile_mm_encoder", False):
        raise ValueError("transprune: VisionZip reads the vision tower's attention inputs, which a compiled encoder "
                         "(compilation_config.compile_mm_encoder=True) does not run eagerly; turn it off")


class StartupCheck:
    """Registered for our architectures in vLLM's per-architecture config hooks (``MODELS_CONFIG_MAP``): vLLM calls
    it when it builds the engine's config, in the process that starts the engine, so a wrong setting is one error
    before any engine process runs."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        check_engine(vllm_config)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        check_model(model_config)


def check_model(model_config) -> ServedMethod:
    """The server's setting for this model config, checked against its architecture."""
    served = settings(server_setting(model_config.hf_config, model_config.architecture))
    check_arch(served, model_config.architecture)
    return served


def server_setting(hf_config, registered: str):
    """The server's setting: the config's ``transprune`` entry, else the architecture's default."""
    arch = next((a for a in ARCHS.values() if a.name == registered), None)
    given = getattr(hf_config, KEY, None)
    return given if given is not None else (arch.default if arch is not None else DEFAULT)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register our architectures (lazily: vLLM imports the model module
    only where a model is built) and their start-up check."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for arch in ARCHS.values():
        if arch.name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch.name, arch.where)
        MODELS_CONFIG_MAP.setdefault(arch.name, StartupCheck)
    from .runner import enable_pruning_path_on_cpu

    enable_pruning_path_on_cpu()
