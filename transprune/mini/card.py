"""Write the model card of a trained mini checkpoint from its training log and a held-out evaluation.

    python -m transprune.mini.card DIR [--n 500]

Every figure in the card comes from ``DIR/training_log.json`` (written by `transprune train-mini`) or from
the unpruned evaluation this command runs on the test split.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from .evaluate import evaluate, questions
from .model import IMAGE_TOKENS, load_mini
from .train import TrainConfig, machine


def _machine() -> str:
    return f"{machine()}, {torch.get_num_threads()} torch thread(s) at evaluation, torch {torch.__version__}"


# TrainConfig fields that `transprune train-mini` takes as options (a field's option is --field-with-dashes).
OPTIONS = ("cycles", "lr", "decoder_init_std", "scenes_per_step", "questions_per_type", "attn_heads", "attn_layer",
           "attn_targets", "find_layer", "gather_layer", "deep_layer", "aux_weight", "aux_labels", "vision_steps", "vision_scenes", "vision_lr", "freeze_vision", "init", "device")


def _option(key: str, value) -> str:
    flag = f"--{key.replace('_', '-')}"
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    if isinstance(value, (list, tuple)):
        return f"{flag} {','.join(map(str, value))}"
    return f"{flag} {value}"


def command(cfg: dict) -> str:
    """The `train-mini` command that reproduces a logged config (options only where it differs from the
    defaults; a field without an option that differs is reported, as it cannot be set from the command line)."""
    default = asdict(TrainConfig())
    parts = [f"transprune train-mini --out DIR --steps {cfg['steps']} --seed {cfg['seed']} --threads {cfg['threads']}"]
    parts += [_option(k, cfg[k]) for k in OPTIONS
              if k in cfg and json.loads(json.dumps(cfg[k])) != json.loads(json.dumps(default[k]))]
    fixed = [k for k in default if k not in OPTIONS + ("steps", "seed", "threads") and k in cfg
             and json.loads(json.dumps(cfg[k])) != json.loads(json.dumps(default[k]))]
    if fixed:
        parts.append(f"  # and TrainConfig({', '.join(f'{k}={cfg[k]!r}' for k in fixed)}) in code")
    return " ".join(parts)


def _recipe(cfg: dict) -> list[str]:
    """The training recipe in words, from a logged config."""
    labels = " / ".join(cfg.get("aux_labels", ()))
    lines = []
    if cfg.get("vision_steps", 0) > 0:
        lines.append(f"Stage 1: {cfg['vision_steps']} steps of {cfg['vision_scenes']} fresh scenes train the vision tower and "
                     f"projector alone to predict per-patch labels from the image tokens ({labels}; linear heads, "
                     "discarded after training)" + (", then they are frozen." if cfg.get("freeze_vision") else "."))
    stage = "Stage 2: " if lines else ""
    per_scene = 5 * cfg.get("questions_per_type", 1)
    cycles = cfg.get("cycles", 1)
    repeat = (f", run {cycles} times over the same scenes (each cycle a fresh AdamW, warm-up and cosine decay)"
              if cycles > 1 else "")
    text = (f"{stage}{cfg['steps']} steps{repeat} of {cfg['scenes_per_step']} fresh scenes (no epochs), {per_scene} questions per "
            "scene sharing one image prefix; loss on the answer word and `</s>`")
    if cfg.get("deep_layer", 0) > 0:
        text += f", plus the answer read out after layer {cfg['deep_layer']}"
    if cfg.get("aux_weight", 0) > 0 and not cfg.get("freeze_vision"):
        text += f", plus the per-patch auxiliary loss ({labels}) at weight {cfg['aux_weight']}"
    if cfg.get("attn_heads", 0) > 0 and cfg.get("attn_targets", "relevant") == "focus":
        named = f"layer {cfg['find_layer']} to the objects the question names and of " if cfg.get("find_layer") else ""
        text += (f", plus attention supervision from the answer position: {cfg['attn_heads']} heads of {named}"
                 f"layer {cfg['attn_layer']} to the objects the answer is read from (for counts and \"is there\" also "
                 "to `<s>`, whose share tells how many)")
    elif cfg.get("attn_heads", 0) > 0:
        text += (f", plus attention supervision of {cfg['attn_heads']} heads of layer {cfg['attn_layer']} to the "
                 "question's relevant patches")
    if cfg.get("attn_heads", 0) > 0 and cfg.get("gather_layer", 0) > 0:
        text += f" and of layer {cfg['gather_layer']} to the question's object words"
    if cfg.get("curriculum"):
        text += "; an object-count curriculum at the start"
    return lines + [text + "."]


def majority_priors(samples) -> dict[str, tuple[str, float]]:
    """Per question type, its most common answer among ``samples`` and that answer's share: the accuracy of
    a model that ignores the image and always gives it."""
    answers: dict[str, list[str]] = {}
    for s in samples:
        answers.setdefault(s.qtype, []).append(s.answer)
    out = {}
    for qtype, given in answers.items():
        top = max(sorted(set(given)), key=given.count)
        out[qtype] = (top, given.count(top) / len(given))
    return out


FIRST = "Answered right among the first {k} test questions"  # the test suite re-checks this line


def write_card(folder: str | Path, n: int = 500) -> Path:
    folder = Path(folder)
    record = json.loads((folder / "training_log.json").read_text())
    model, processor = load_mini(folder)
    samples = questions(n)
    result = evaluate(model, processor, ["none"], progress=False, samples=samples)[0]
    head = samples[:100]
    first = evaluate(model, processor, ["none"], progress=False, samples=head)[0]
    priors = majority_priors(samples)
    params = sum(p.numel() for p in model.parameters())
    cfg = record["config"]
    last = next((e for e in reversed(record["history"]) if "val" in e), {})
    text = model.config.text_config
    vision = model.config.vision_config
    lines = [
        "# transprune mini LLaVA",
        "",
        "The testbed model of the `transprune` library: a plain `LlavaForConditionalGeneration`, trained from",
        "scratch on generated visual questions with known answer regions (`transprune/mini/data.py`).",
        "",
        "## Architecture",
        "",
        f"- CLIP vision tower: {vision.image_size}x{vision.image_size} px, patch {vision.patch_size}, "
        f"hidden {vision.hidden_size}, {vision.num_hidden_layers} layers; features of the last layer, CLS dropped: "
        f"{IMAGE_TOKENS} image tokens.",
        f"- Projector: LLaVA's two-layer MLP. Decoder: Llama, hidden {text.hidden_size}, MLP {text.intermediate_size}, "
        f"{text.num_hidden_layers} layers, {text.num_attention_heads} heads / {text.num_key_value_heads} KV heads.",
        f"- {params:,} parameters; word-level tokenizer ({text.vocab_size} ids) and `LlavaProcessor` "
        "(`AutoProcessor.from_pretrained` loads them).",
        "- Prompt: `USER: <image>\\n{question} ASSISTANT:`; answers are one word followed by `</s>`.",
        "",
        "## Training",
        "",
        f"Command (deterministic: fixed seed, fixed step count, {cfg.get('threads', 1)} torch thread(s), deterministic algorithms):",
        "",
        "```bash",
        command(cfg),
        "```",
        "",
        "Recipe (`transprune/mini/train.py`, `TrainConfig`): " + ", ".join(f"`{k}={v}`" for k, v in cfg.items()) + ".",
        *_recipe(cfg),
        "",
        f"Wall time: {record['minutes']} min on the machine that trained it ({record.get('machine', 'not recorded')}).",
        "",
        "## Held-out accuracy (test split, unpruned)",
        "",
        f"`transprune eval --suite mini --methods none --n {n} --model DIR` (greedy first token == answer), on "
        f"{_machine()}:",
        "",
        "| question type | accuracy | majority-answer prior (always answering it) |",
        "|---|---|---|",
        *(f"| {t} | {100 * a:.1f}% | {100 * priors[t][1]:.1f}% (\"{priors[t][0]}\") |"
          for t, a in result.accuracy_by_type.items()),
        f"| **overall** | **{100 * result.accuracy:.1f}%** ({n} questions) | |",
        "",
        f"{FIRST.format(k=len(head))}: {round(first.accuracy * len(head))}.",
        "",
        f"Validation accuracy logged at the last step ({last.get('step', '?')}): "
        f"{json.dumps(last.get('val', {}))}.",
        "",
        "## Intended use",
        "",
        "Measuring what visual-token pruning does to a real trained model where it is known which tokens",
        "matter (`transprune eval --suite mini`). It knows nothing beyond its generated scenes.",
    ]
    path = folder / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transprune.mini.card", description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args(argv)
    print(write_card(args.folder, args.n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
