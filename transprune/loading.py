"""Local checkpoints for the tools: the supported model classes, the dtype names, loading a folder (never
downloads) and wrapping a question in the checkpoint's prompt format. Used by `cli`, `bench` and `mini.demo`."""

from __future__ import annotations

import json
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str):
    """The torch dtype of a name in `DTYPES`."""
    import torch

    return getattr(torch, DTYPES[name])


def model_class(config):
    """The transformers model class of a supported config (the family registry's)."""
    from .adapters import family_for

    return family_for(config.model_type).model_class_for(config.model_type)


def read_config_json(path: Path) -> dict:
    """The JSON object of a checkpoint's ``config.json``; ValueError naming the file when it is not one."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not the object of a model config")
    return value


def load_config(folder: str, option: str = "--model"):
    """The Hugging Face config of a local folder with a config.json of a supported model_type; ``option`` names
    the command-line option in the errors."""
    import transformers

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ValueError(f"{option} must be a local checkpoint folder with a config.json, got {folder!r}")
    from .adapters import UNAVAILABLE, supported_model_types

    model_type = read_config_json(path / "config.json").get("model_type")
    if model_type in UNAVAILABLE:
        raise ValueError(f"{option} is a {model_type!r} checkpoint, whose family {UNAVAILABLE[model_type]}")
    if model_type not in supported_model_types():
        raise ValueError(f"{option} is a {model_type!r} checkpoint; supported: {', '.join(supported_model_types())}")
    return transformers.AutoConfig.from_pretrained(path, local_files_only=True)


def load_processor(folder):
    """The processor of a local checkpoint folder of a supported family (never downloads). Where transformers'
    `AutoProcessor` cannot build a family's video processor (Qwen2-VL / 2.5-VL / 3-VL's need torchvision, which
    this library's install leaves out), the same processor for images only; install torchvision for videos."""
    from .adapters import family_for

    config = load_config(str(folder), option="folder")
    return family_for(config.model_type).load_processor(Path(folder), config.model_type)


def load_checkpoint(folder: str, dtype: str = "fp32"):
    """A local checkpoint folder of a supported family and its processor (never downloads)."""
    from .adapters import family_for

    config = load_config(folder)
    model = model_class(config).from_pretrained(Path(folder), dtype=torch_dtype(dtype), local_files_only=True).eval()
    return model, family_for(config.model_type).load_processor(Path(folder), config.model_type)


def image_prompt(processor, text: str, n_images: int = 1) -> str:
    """``text`` after ``n_images`` image slots, in the checkpoint's chat template (else LLaVA-1.5's format)."""
    if not getattr(processor, "chat_template", None):
        return "USER: " + "<image>\n" * n_images + f"{text} ASSISTANT:"
    def render(content):
        conversation = [{"role": "user", "content": content}]
        if hasattr(processor, "video_processor") and processor.video_processor is None:
            # an image-only processor (`adapters.base.image_only_processor`): some processors' own
            # apply_chat_template reads video settings, so render the template through the tokenizer
            return processor.tokenizer.apply_chat_template(conversation, chat_template=processor.chat_template,
                                                           tokenize=False, add_generation_prompt=True)
        return processor.apply_chat_template(conversation, add_generation_prompt=True)

    prompt = render([{"type": "image"}] * n_images + [{"type": "text", "text": text}])
    if n_images and prompt == render([{"type": "text", "text": text}]):
        # A base model's template (Qwen2-VL-2B's renders a list of content parts, not role messages) drops the
        # images: every method would then fail later on "0 image tokens and 1 images".
        raise ValueError(f"the checkpoint's chat template renders a user message with {n_images} image(s) to "
                         f"{prompt!r}, with no image placeholder: it is not a chat model's template (a base model's?). "
                         "Write the prompt with the model's image placeholder yourself (for Qwen-VL: "
                         "'<|vision_start|><|image_pad|><|vision_end|>' before the question), or give the folder a "
                         "chat template that renders role messages (its instruct model's chat_template.json)")
    return prompt


def build_prompt(processor, question: str) -> str:
    """The question wrapped in the checkpoint's chat template (or LLaVA-1.5's), with one image slot."""
    if "<image>" in question or "<|image_pad|>" in question:  # the placeholder written by the caller
        return question
    if getattr(processor, "chat_template", None):
        return image_prompt(processor, question)
    return f"USER: <image>\n{question} ASSISTANT:"
