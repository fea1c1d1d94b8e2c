"""What every family's tiny model shares: the offline word-level tokenizer, the seeded re-init, and the sample
inputs (random images, prompts of different lengths) the tests feed to any family's tiny processor."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import BatchFeature, PreTrainedTokenizerFast

from ..bench.inputs import random_image  # the bench's synthetic images: the same pictures in tests

IMAGE_SIZE = 64
PATCH_SIZE = 8
GRID_PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128]]  # (height, width) candidates for LLaVA-NeXT
INIT_STD = 0.2  # std of every weight matrix / embedding; large enough for peaked attention and logits

# ---------------------------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))
PUNCTUATION = [":", "?", ".", ",", "!", "'", "\n"]
WORDS = (
    "USER ASSISTANT SYSTEM what is the colour color of this that a an image picture photo in on at and or it "
    "there how many describe shape size left right top bottom middle red green blue yellow black white orange "
    "purple big small large cat dog car tree house sky person man woman please answer question yes no one two "
    "three four five which where who why do does are there"
).split()
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
DIGITS = [str(d) for d in range(10)]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _vocab() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + PUNCTUATION + WORDS + LETTERS + DIGITS:
        vocab.setdefault(token, len(vocab))
    return vocab


def word_level_tokenizer(vocab: dict[str, int], padding_side: str = "left") -> PreTrainedTokenizerFast:
    """Offline word-level tokenizer over ``vocab`` whose first five ids are ``SPECIAL_TOKENS``.

    Whitespace separates words, ``\\n`` and punctuation are tokens of their own, digits are split,
    unknown words map to ``<unk>`` and ``<s>`` is prepended to every sequence.
    """
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[ \t\r]+"), behavior="removed"),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side=padding_side, model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID and len(tokenizer) == len(vocab)
    return tokenizer


def tiny_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """Word-level tokenizer (~150 ids) over a fixed word list (see `word_level_tokenizer`).

    Ids: ``<unk>`` 0, ``<s>`` 1 (prepended to every sequence), ``</s>`` 2, ``<pad>`` 3, ``<image>`` 4.
    """
    return word_level_tokenizer(_vocab(), padding_side)



@torch.no_grad()
def _reinit(model: torch.nn.Module, seed: int, std: float = INIT_STD) -> None:
    """Seeded, order-deterministic init: norms 1, biases 0, every other parameter N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1 and "norm" in name:
            param.fill_(1.0)
        else:
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def _build(config, model_cls, seed: int, attn_implementation: str, dtype: torch.dtype):
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    _reinit(model, seed)
    with torch.no_grad():  # special tokens get logit exactly 0, far below the max: greedy never emits them
        model.lm_head.weight[:len(SPECIAL_TOKENS)] = 0.0
    return model.to(dtype).eval()



# ---------------------------------------------------------------------------------------------- inputs

_QUESTION_WORDS = ("what is the colour of the big red car on the left of this picture and how many "
                   "dogs are there in the image").split()


def sample_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` LLaVA-style prompts with one ``<image>`` each; prompt ``i`` has ``3 + 2 * i`` question words."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), 3 + 2 * i)]
        prompts.append(f"USER: <image>\n{' '.join(words)} ? ASSISTANT:")
    return prompts


def sample_images(n: int, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> list[Image.Image]:
    """``n`` different random images; ``sizes`` is an optional (width, height) per image (default 64x64)."""
    sizes = sizes or [(IMAGE_SIZE, IMAGE_SIZE)] * n
    return [random_image(seed * 1000 + i, sizes[i]) for i in range(n)]


def sample_inputs(processor, n: int = 3, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> BatchFeature:
    """Left-padded batch of ``n`` prompts of different lengths, each with its own image.

    Returns the processor's ``BatchFeature`` (``input_ids``, ``attention_mask``, ``pixel_values`` and, for
    LLaVA-NeXT, ``image_sizes``). ``sizes`` as in ``sample_images``.
    """
    processor.tokenizer.padding_side = "left"
    return processor(images=_per_sample(processor, sample_images(n, seed, sizes)),
                     text=_placeholders(processor, sample_prompts(n, seed)), padding=True, return_tensors="pt")


def sample_inputs_unbatched(processor, n: int = 3, seed: int = 0,
                            sizes: list[tuple[int, int]] | None = None) -> list[BatchFeature]:
    """The same prompts and images as ``sample_inputs``, one unpadded ``BatchFeature`` (batch size 1) each."""
    images, prompts = sample_images(n, seed, sizes), _placeholders(processor, sample_prompts(n, seed))
    return [processor(images=_per_sample(processor, [image]), text=[prompt], return_tensors="pt")
            for image, prompt in zip(images, prompts)]


def prompt_inputs(processor, prompts: list[str], images: list, padding_side: str = "left") -> BatchFeature:
    """One batch (padded on ``padding_side``) of LLaVA-style ``prompts``, ``<image>`` where each sample's image goes,
    for the tiny processor of any family (Qwen's and Gemma 3's placeholders are written for them)."""
    processor.tokenizer.padding_side = padding_side
    if "<|vision_start|>" in processor.tokenizer.get_vocab():  # Qwen: the image between its markers
        prompts = [p.replace("<image>\n", "<image>").replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
                   for p in prompts]
        return processor(images=images, text=prompts, padding=True, return_tensors="pt")
    return processor(images=_per_sample(processor, images), text=_placeholders(processor, prompts), padding=True,
                     return_tensors="pt")


def _per_sample(processor, images: list) -> list:
    """The images as the processor wants them: SmolVLM's and Gemma 3's take one list of images per prompt."""
    nested = type(processor).__name__ in ("SmolVLMProcessor", "Idefics3Processor", "Gemma3Processor")
    return [[image] for image in images] if nested else images


def _placeholders(processor, prompts: list[str]) -> list[str]:
    """The prompts with the processor's own image placeholder (Gemma 3's is ``<start_of_image>``)."""
    token = getattr(processor, "image_token", "<image>")
    return [p.replace("<image>", token) for p in prompts]




def narrowed_folder(real, folder, narrow) -> "Path":
    """A random-weight model folder in ``folder`` from a real one's text files (``real``: config, processor and
    tokenizer, no weights): ``narrow(config)`` edits the config.json dict in place (fewer, narrower layers), then the
    model is built from it with seed 0 and saved. Returns ``folder``."""
    import json
    import shutil
    from pathlib import Path

    import transformers

    real, folder = Path(real), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in real.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    narrow(config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model_class = getattr(transformers, config["architectures"][0])
    model_class(transformers.AutoConfig.from_pretrained(folder)).save_pretrained(folder)
    return folder
