"""Train the mini LLaVA from scratch on generated questions: deterministic, CPU-sized.

Recipe (why each piece is here):
- Every step draws fresh scenes (no epochs, no overfitting) and asks five questions about each scene. The
  image comes first in the prompt, so under causal attention the 259-token prefix (``<s> USER :`` + 256
  image tokens) is the same for all five questions: it runs once, its KV cache is repeated five times and
  only the short question suffixes run per question. Same loss as five full sequences, ~4x cheaper.
- The answer loss covers the answer word and ``</s>``.
- An auxiliary per-patch loss on the image tokens entering the LLM (colour / shape / digit of the object
  under each patch, and object centres) gives the vision tower dense supervision; its small heads are
  dropped after training, the checkpoint is a plain ``LlavaForConditionalGeneration``.
- AdamW, linear warm-up then cosine decay, gradient clipping; fixed seed, fixed step count.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

from ..compat import cache_kwargs, cache_of

from . import data
from .model import (BOS_ID, EOS_ID, IMAGE_TOKENS, PAD_ID, PATCH_SIZE, build_mini, load_mini, mini_config,
                    mini_processor, prompt)

AUX_CLASSES = data.PATCH_LABELS
IMAGE_TOKENS_SIDE = math.isqrt(IMAGE_TOKENS)


@dataclass
class TrainConfig:
    # Defaults: the best recipe measured (docs/mini-benchmark.md: 78.4% on the test split when it was run as a
    # 3000-step run plus a 3000-step `--init` continuation); stage 1 trains the vision tower alone, stage 2
    # the decoder, `cycles` times.
    steps: int = 3000
    # Stage 2 runs this many times over the same scene stream, each cycle with a fresh AdamW, warm-up and cosine
    # decay over `steps` (a warm restart): the second cycle is exactly what the `--init` continuation did.
    cycles: int = 2
    scenes_per_step: int = 8
    # Questions of each type per scene: they all share the scene's image prefix (computed once), so more
    # questions add answer signal for little extra compute.
    questions_per_type: int = 1
    # Stage 2's peak lr. In one-stage training (vision tower learning too) 1e-3 and above stalled at the
    # answer priors; with the frozen stage-1 tower 8e-4 trains.
    lr: float = 8e-4
    warmup: int = 100
    weight_decay: float = 0.01
    aux_weight: float = 0.5
    # Per-patch labels of the auxiliary loss (names of `data.PATCH_LABELS`).
    aux_labels: tuple = ("colour", "shape", "size", "digit")
    # Stage 1 (0 steps: off): before the answer training, the vision tower + projector alone learn the
    # per-patch labels (`vision_scenes` scenes per step, peak lr `vision_lr`); no decoder runs, so a step is
    # cheap. With `freeze_vision` stage 2 then keeps them fixed and trains only the decoder.
    # Without stage 1 the tower never learned shapes or digits from the answer loss in the budget.
    vision_steps: int = 2500
    vision_scenes: int = 32
    vision_lr: float = 3e-3
    freeze_vision: bool = True
    # Start from this checkpoint folder instead of a fresh model (e.g. the output of a stage-1-only run:
    # steps=0), so recipes can be compared from the same vision tower.
    init: str | None = None
    deep_layer: int = 9  # also read the answer from this layer's output (0: off)
    deep_weight: float = 0.5
    # Attention supervision: the first `attn_heads` heads of decoder layer `attn_layer` (1-indexed) are pushed
    # to look, from the answer position, at the question's relevant patches (0 heads: off). It attacks the
    # slowest part of learning (where to look). A layer after every pruning stage of the presets (3/4/5 of
    # 12) leaves the layers where scores are computed unsupervised.
    attn_layer: int = 8
    attn_heads: int = 2
    attn_weight: float = 1.0
    # What those heads are pushed to look at: "relevant" (every relevant patch of the question, at attn_layer)
    # or "focus" (`focus_targets`: at find_layer the objects the question names, at attn_layer those the
    # answer is read from, and for counts / "is there" the sink token as well, so "none" and "how many" can
    # be read from the attention itself).
    attn_targets: str = "relevant"
    find_layer: int = 0
    # Also push the same heads of this layer (0: off) to look from the answer position at the question's
    # object words: the heads that find the named objects need those words in their query. In a full run it
    # made the climb faster but not the end point (docs/mini-benchmark.md).
    gather_layer: int = 2
    # Curriculum: (share of the steps, fewest objects, most objects) for the first phases, then scenes as
    # in evaluation (3-6 objects). With one or two objects the answer is in *any* object token, so the
    # decoder learns to read image tokens before it must learn to pick the right ones.
    curriculum: tuple = ((0.1, 1, 2), (0.25, 1, 4))
    # None: transformers' init (std 0.02). Probes on one-object colour questions learned ~3x faster with
    # the decoder's matrices drawn at std 0.15 (lr 3e-4); not yet validated on a full run.
    decoder_init_std: float | None = None
    seed: int = 0
    # "cpu" or a CUDA device ("cuda", "cuda:0"). Only the CPU path has been run: on CUDA the run is seeded
    # but bitwise reproducibility is not guaranteed (deterministic algorithms only warn there).
    device: str = "cpu"
    # One thread: on 2 cores, OpenMP with 2 threads stalls badly if anything else runs (a run beside other work
    # went from 0.28 to 3.8 s per stage-1 step).
    threads: int = 1
    eval_every: int = 250
    eval_n: int = 250


class Batcher:
    """Tokenised training batches: pixels, prefix/suffix ids, answer targets and per-patch labels."""

    def __init__(self):
        self.processor = mini_processor()
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor
        # the words that pick out objects (colours, shapes, sizes): what the answer position has to gather
        words = list(data.COLOURS) + list(data.SHAPES) + [shape + "s" for shape in data.SHAPES] + list(data.SIZES)
        self.content_ids = set(self.tokenizer.convert_tokens_to_ids(words))

    def pixels(self, images) -> torch.Tensor:
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    def split_prompt(self, question: str) -> tuple[list[int], list[int]]:
        """(ids before the image, ids after it) of the question's prompt."""
        ids = self.tokenizer(prompt(question))["input_ids"]
        at = ids.index(self.tokenizer.convert_tokens_to_ids("<image>"))
        return ids[:at], ids[at + 1:]

    def answer_id(self, answer: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(answer)

    def batch(self, first_scene: int, n: int, split: str = "train", count: tuple[int, int] = (3, 6),
              per_type: int = 1) -> dict:
        images, labels, suffixes, targets, relevant = [], {k: [] for k in AUX_CLASSES}, [], [], []
        focus, content, qtypes = [], [], []
        for index in range(first_scene, first_scene + n):
            image, objects, masks, rng = data.scene(split, index, count=count)
            images.append(image)
            for key, value in data.patch_labels(objects, masks, PATCH_SIZE).items():
                labels[key].append(value)
            for q in data.scene_questions(rng, objects, masks, per_type):
                relevant.append(data.mask_patches(q.relevant, PATCH_SIZE).reshape(-1))
                focus.append(focus_targets(q, objects, masks))
                qtypes.append(q.qtype)
                head, tail = self.split_prompt(q.question)
                content.append([token in self.content_ids for token in tail])
                suffixes.append(tail + [self.answer_id(q.answer), EOS_ID])
                targets.append(len(tail))  # the logit at suffix position len(tail) - 1 predicts the answer
        width = max(map(len, suffixes))
        suffix = torch.full((len(suffixes), width), PAD_ID)
        valid = torch.zeros((len(suffixes), width), dtype=torch.long)
        words = torch.zeros((len(suffixes), width), dtype=torch.bool)
        for i, ids in enumerate(suffixes):
            suffix[i, :len(ids)] = torch.tensor(ids)
            valid[i, :len(ids)] = 1
            words[i, :len(content[i])] = torch.tensor(content[i])
        return dict(pixel_values=self.pixels(images), head=torch.tensor(head), suffix=suffix, suffix_valid=valid,
                    answer_at=torch.tensor(targets), relevant=torch.from_numpy(np.stack(relevant)),
                    focus=torch.from_numpy(np.stack(focus)), content_words=words,
                    qtypes=qtypes,
                    labels={k: torch.from_numpy(np.stack(v)) for k, v in labels.items()})


# Question types whose answer is a count of matches (0 included): their attention target spreads over the
# matches *and* the sequence's first token, so the share left on that "sink" tells how many matched.
SINK_TYPES = ("count", "exists")


def focus_targets(q: data.Question, objects: list[data.Obj], masks: list[np.ndarray]) -> np.ndarray:
    """(2, 1 + image tokens) attention targets of the answer position, each row summing to 1: row 0 for the
    "find" heads (the objects the question names), row 1 for the "read" heads (the objects the answer is read
    from); column 0 is the sink (``<s>``), the rest the image patches in row-major order.

    For counts the target is uniform over the sink and the *centre* patch of each counted object (one token
    per object, so the sink's share is 1 / (1 + count)); for "is there" over the sink and every patch of the
    matching objects; otherwise uniform over the patches of the objects."""
    grid = IMAGE_TOKENS_SIDE
    out = np.zeros((2, 1 + grid * grid), np.float32)
    for row, indices in enumerate((q.find, q.read)):
        if q.qtype == "count":
            for i in indices:
                o = objects[i]
                out[row, 1 + min(o.cy // PATCH_SIZE, grid - 1) * grid + min(o.cx // PATCH_SIZE, grid - 1)] = 1
        elif indices:
            out[row, 1:] = data.mask_patches(np.logical_or.reduce([masks[i] for i in indices]), PATCH_SIZE).reshape(-1)
        if q.qtype in SINK_TYPES:
            out[row, 0] = 1
        out[row] /= max(out[row].sum(), 1)
    return out


def forward_losses(model, aux_heads, batch: dict, questions_per_scene: int = 5, deep_layer: int = 0,
                   attn_layer: int = 0, attn_heads: int = 0, find_layer: int = 0,
                   attn_targets: str = "relevant", gather_layer: int = 0,
                   image_tokens: torch.Tensor | None = None, predictions: list | None = None) -> dict[str, torch.Tensor]:
    """Answer loss (prefix once, cache repeated per question) and the auxiliary per-patch losses.

    With ``deep_layer`` > 0 also ``deep``: the answer loss read out (final norm + lm_head) from that layer's
    output; the shorter gradient path helps the 12-layer decoder learn to look at the image tokens early in
    training. With ``attn_heads`` > 0 also ``attention``, on the first ``attn_heads`` heads' attention from the
    position that predicts the answer: with ``attn_targets="relevant"``, -log of the mass that layer
    ``attn_layer`` (1-indexed) puts on the question's relevant image patches (questions with none are left
    out); with ``"focus"``, `focus_loss` against `focus_targets`: layer ``find_layer`` (0: none) to the
    objects the question names, layer ``attn_layer`` to those the answer is read from. With ``gather_layer``
    > 0 also ``gather``: -log of the mass the first ``attn_heads`` heads of that layer put, from the same
    position, on the question's object words (colours, shapes, sizes), which the later heads need in their
    query to find the objects. ``image_tokens`` (B, 256, d) replace the vision tower's output (`probe`); a
    ``predictions`` list receives the greedy answer ids."""
    lm = model.model.language_model
    if image_tokens is None:
        features = torch.stack(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
    else:
        features = image_tokens
    b = features.shape[0]
    head = lm.embed_tokens(batch["head"]).unsqueeze(0).expand(b, -1, -1)
    prefix = torch.cat([head, features], dim=1)
    out = lm(inputs_embeds=prefix, use_cache=True)
    cache = cache_of(out)
    cache.batch_repeat_interleave(questions_per_scene)
    p = prefix.shape[1]
    suffix, valid = batch["suffix"], batch["suffix_valid"]
    mask = torch.cat([torch.ones(suffix.shape[0], p, dtype=torch.long, device=suffix.device), valid], dim=1)
    positions = (p + torch.arange(suffix.shape[1], device=suffix.device)).unsqueeze(0).expand(suffix.shape[0], -1)
    out = lm(input_ids=suffix, **cache_kwargs(cache), attention_mask=mask, position_ids=positions,
             output_hidden_states=deep_layer > 0 or attn_heads > 0)
    hidden = out.last_hidden_state
    rows = torch.arange(suffix.shape[0], device=suffix.device)
    at = batch["answer_at"]
    # The answer word is predicted at position at-1 and </s> at position at.
    logits = model.lm_head(torch.cat([hidden[rows, at - 1], hidden[rows, at]]))
    target = torch.cat([suffix[rows, at], suffix[rows, at + 1]])
    if predictions is not None:
        predictions.append(logits[:len(rows)].argmax(-1).detach())
    losses = {"answer": F.cross_entropy(logits[:len(rows)], target[:len(rows)]),
              "eos": F.cross_entropy(logits[len(rows):], target[len(rows):])}
    if deep_layer > 0:
        early = model.lm_head(lm.norm(out.hidden_states[deep_layer][rows, at - 1]))
        losses["deep"] = F.cross_entropy(early, target[:len(rows)])
    if attn_heads > 0:
        def attention(layer):  # (N, attn_heads, prefix + suffix) from the position that predicts the answer
            return answer_attention(lm, layer, out.hidden_states[layer - 1][rows, at - 1],
                                    cache.layers[layer - 1].keys, p + at - 1)[:, :attn_heads]

        n_head = batch["head"].shape[0]
        if gather_layer > 0:
            probs = attention(gather_layer)[..., p:]
            losses["gather"] = -torch.log((probs * batch["content_words"][:, None]).sum(-1) + 1e-6).mean()
        if attn_targets == "relevant":
            probs = attention(attn_layer)[..., n_head:p]
            relevant = batch["relevant"]
            keep = relevant.any(-1)
            mass = (probs * relevant[:, None]).sum(-1)[keep]
            losses["attention"] = -torch.log(mass + 1e-6).mean()
        else:  # "focus": find heads at find_layer, read heads at attn_layer; columns: the sink, then the patches
            columns = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(n_head, p)]).to(suffix.device)
            sink = torch.tensor([qtype in SINK_TYPES for qtype in batch["qtypes"]], device=suffix.device)
            losses["attention"] = sum(focus_loss(attention(layer)[..., columns], batch["focus"][:, row], sink)
                                      for row, layer in enumerate((find_layer, attn_layer)) if layer > 0)
    for key, head_layer in aux_heads.items():
        losses[key] = F.cross_entropy(head_layer(features).flatten(0, 1), batch["labels"][key].flatten())
    return losses


def focus_loss(probs: torch.Tensor, target: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Attention supervision against `focus_targets`. probs: (N, heads, S) attention rows; target: (N, S);
    sink: (N,) bool. Sink questions (counts, "is there") need the exact shares, so cross-entropy to the target;
    the others only need the mass on the target's support (any of an object's patches will do): -log(mass)."""
    cross_entropy = -(target[:, None] * torch.log(probs + 1e-6)).sum(-1)
    mass = -torch.log((probs * (target[:, None] > 0)).sum(-1) + 1e-6)
    return torch.where(sink[:, None], cross_entropy, mass).mean()


def answer_attention(lm, layer: int, h: torch.Tensor, keys: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (N, heads, S) of one query row per sequence in ``lm.layers[layer - 1]``.

    h: (N, d) the rows' input to that layer; keys: (N, kv_heads, S, head_dim) its cached (rotated) keys;
    position: (N,) the rows' positions. Keys after a row's position (later tokens, padding) get no mass.
    Computed from q and k so the model keeps its own attention backend."""
    block = lm.layers[layer - 1]
    attn = block.self_attn
    x = block.input_layernorm(h)
    q = attn.q_proj(x).view(x.shape[0], -1, attn.head_dim)  # (N, H, hd)
    cos, sin = lm.rotary_emb(x[:, None], position[:, None])  # (N, 1, hd)
    q = q * cos + rotate_half(q) * sin
    k = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)  # GQA: kv head j serves heads j*rep ...
    scores = torch.einsum("nhd,nhsd->nhs", q, k) * attn.scaling
    late = torch.arange(k.shape[2], device=k.device) > position[:, None]
    return scores.masked_fill(late[:, None], float("-inf")).softmax(-1)


def loss_options(cfg: TrainConfig) -> dict:
    """`forward_losses` keyword arguments of a stage-2 step under ``cfg``."""
    return dict(questions_per_scene=5 * cfg.questions_per_type, deep_layer=cfg.deep_layer, attn_layer=cfg.attn_layer,
                attn_heads=cfg.attn_heads, find_layer=cfg.find_layer, attn_targets=cfg.attn_targets,
                gather_layer=cfg.gather_layer)


def _update(optim, params: list, loss: torch.Tensor) -> None:
    """One optimiser step on ``loss``, gradients clipped to norm 1."""
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()


def stage2_step(model, aux_heads, batcher: Batcher, optim, params: list, cfg: TrainConfig, step: int,
                image_tokens=None) -> tuple[dict, torch.Tensor]:
    """Stage-2 step ``step`` under ``cfg`` (lr schedule, curriculum, fresh scenes, update); returns (losses, loss).
    ``image_tokens``: a module mapping the batch's per-patch labels to image tokens, in place of the tower."""
    for group in optim.param_groups:
        group["lr"] = _cosine(cfg.lr, cfg.warmup, cfg.steps, step)
    count = next(((lo, hi) for share, lo, hi in cfg.curriculum if step < share * cfg.steps), (3, 6))
    batch = _to(batcher.batch(step * cfg.scenes_per_step, cfg.scenes_per_step, count=count,
                              per_type=cfg.questions_per_type), model.device)
    tokens = None if image_tokens is None else image_tokens(batch["labels"])
    losses = forward_losses(model, aux_heads, batch, **loss_options(cfg), image_tokens=tokens)
    loss = objective(losses, cfg, aux_heads)
    _update(optim, params, loss)
    return losses, loss


def objective(losses: dict, cfg: TrainConfig, aux_heads) -> torch.Tensor:
    """The weighted sum of `forward_losses` that stage 2 minimises."""
    aux = sum(losses[k] for k in aux_heads)
    return (losses["answer"] + losses["eos"] + cfg.aux_weight * aux + cfg.deep_weight * losses.get("deep", 0.0)
            + cfg.attn_weight * (losses.get("attention", 0.0) + losses.get("gather", 0.0)))


def init_decoder(model, std: float, seed: int) -> None:
    """Redraw every matrix of the text decoder (not norms, not the vision side) from N(0, std), seeded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.model.language_model.named_parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


@torch.no_grad()
def answer_accuracy(model, batcher: Batcher, split: str, n: int, first: int = 0) -> dict[str, float]:
    """Greedy next-token accuracy of the answer word on ``n`` questions of ``split`` (sample(split, i))."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    tokenizer = batcher.tokenizer
    for start in range(first, first + n, 50):
        samples = [data.sample(split, i) for i in range(start, min(start + 50, first + n))]
        inputs = batcher.processor(images=[s.image for s in samples], text=[prompt(s.question) for s in samples],
                                   padding=True, return_tensors="pt").to(model.device)
        logits = model(**inputs).logits[:, -1]
        for s, token in zip(samples, logits.argmax(-1).tolist()):
            hits.setdefault(s.qtype, []).append(tokenizer.convert_ids_to_tokens(token) == s.answer)
    model.train()
    acc = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
    acc["overall"] = float(np.mean([h for v in hits.values() for h in v]))
    return acc


def machine() -> str:
    """The CPU model and core count, for training and evaluation records."""
    import os
    import platform

    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def check_config(cfg: TrainConfig) -> None:
    """Raise ValueError naming the field and its allowed values for a config `train` cannot run; nothing else
    is touched (the CLI calls it to exit 2 before any work)."""
    _device(cfg.device)
    for name in ("lr", "vision_lr"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: a learning rate must be > 0")
    for name in ("weight_decay", "aux_weight", "deep_weight", "attn_weight"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: a weight must be >= 0")
    if cfg.init is not None and not (Path(cfg.init) / "config.json").is_file():
        raise ValueError(f"init={cfg.init!r}: no checkpoint there (a folder written by `transprune train-mini`)")
    if not (isinstance(cfg.cycles, int) and cfg.cycles >= 1):
        raise ValueError(f"cycles={cfg.cycles!r}: a whole number of stage-2 cycles, 1 or more")
    unknown = sorted(set(cfg.aux_labels) - set(AUX_CLASSES))
    if unknown:
        raise ValueError(f"aux_labels: unknown {unknown}; choose from {', '.join(AUX_CLASSES)}")
    if cfg.attn_targets not in ("relevant", "focus"):
        raise ValueError(f"attn_targets={cfg.attn_targets!r}; choose 'relevant' or 'focus'")
    depth = mini_config().text_config.num_hidden_layers  # --init checkpoints are mini models too
    for name in ("attn_layer", "find_layer", "deep_layer", "gather_layer"):
        if not 0 <= getattr(cfg, name) <= depth:
            raise ValueError(f"{name}={getattr(cfg, name)}: the decoder has layers 1..{depth} (0: off)")
    if cfg.attn_heads > 0 and cfg.attn_layer == 0:
        raise ValueError(f"attn_heads={cfg.attn_heads} needs attn_layer in 1..{depth}")


def train(out: str | Path, cfg: TrainConfig = TrainConfig(), progress: bool = True, log=print) -> dict:
    """Train, save the model + processor to ``out`` (``from_pretrained`` loads it), return the log."""
    check_config(cfg)
    device = torch.device(cfg.device)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic mode
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    try:
        return _train(out, cfg, progress, log)
    finally:  # process-wide settings go back to what the caller had
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _device(name: str, check_available: bool = True) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r}: use 'cpu' or a CUDA device such as 'cuda' or 'cuda:0'") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: use 'cpu' or a CUDA device such as 'cuda' or 'cuda:0'")
    if check_available and device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}, but this torch has no CUDA device (torch.cuda.is_available() is False)")
    return device


def _to(batch, device):
    """A batch (tensors, nested dicts of tensors) on ``device``."""
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_to(v, device) for v in batch)
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def _adamw(params: list, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def _cosine(peak: float, warmup: int, steps: int, step: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _train_vision(model, aux_heads, batcher: Batcher, cfg: TrainConfig, progress: bool, log, started) -> list:
    """Stage 1: the vision tower + projector learn the per-patch labels; the decoder does not run."""
    from tqdm import tqdm

    modules = [model.model.vision_tower, model.model.multi_modal_projector, aux_heads]
    params = [p for m in modules for p in m.parameters()]
    optim = _adamw(params, cfg.vision_lr, cfg.weight_decay)
    history = []
    first = 10_000_000 - 1_000_000  # train scenes of their own, far from stage 2's
    val_pixels, val_labels = _to(_patch_batch(batcher, "val", 0, 64), model.device)
    for step in tqdm(range(cfg.vision_steps), desc="train-mini vision", disable=not progress, mininterval=2):
        for group in optim.param_groups:
            group["lr"] = _cosine(cfg.vision_lr, cfg.warmup, cfg.vision_steps, step)
        pixels, labels = _to(_patch_batch(batcher, "train", first + step * cfg.vision_scenes, cfg.vision_scenes),
                             model.device)
        features = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)
        losses = {k: F.cross_entropy(head(features).flatten(0, 1), labels[k].flatten()) for k, head in aux_heads.items()}
        _update(optim, params, sum(losses.values()))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.vision_steps:
            entry = {"vision_step": step + 1, "minutes": round((time.perf_counter() - started) / 60, 2),
                     **{k: round(v.item(), 4) for k, v in losses.items()},
                     "val_object_patch_accuracy": patch_accuracy(model, aux_heads, val_pixels, val_labels)}
            history.append(entry)
            log(json.dumps(entry), flush=True)
    return history


def _patch_batch(batcher: Batcher, split: str, first: int, n: int):
    """(pixel values, {label: (n, 256) tensor} for every label of `data.PATCH_LABELS`) of scenes first ..
    first + n - 1 of ``split``."""
    images, labels = [], {k: [] for k in AUX_CLASSES}
    for index in range(first, first + n):
        image, objects, masks, _ = data.scene(split, index)
        images.append(image)
        for key, value in data.patch_labels(objects, masks, PATCH_SIZE).items():
            labels[key].append(value)
    return batcher.pixels(images), {k: torch.from_numpy(np.stack(v)) for k, v in labels.items()}


@torch.no_grad()
def patch_accuracy(model, aux_heads, pixels: torch.Tensor, labels: dict) -> dict[str, float]:
    """Per auxiliary head, its accuracy on the image tokens whose patch shows an object (``digit``: an object
    that carries a digit; ``centre``: an object's centre), where "background" is never the answer."""
    features = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)
    out = {}
    for key, head in aux_heads.items():
        where = labels[key if key in ("digit", "centre") else "colour"] > 0
        hit = head(features).argmax(-1) == labels[key]
        out[key] = round(float(hit[where].float().mean()), 3)
    return out


def _train(out, cfg: TrainConfig, progress: bool, log) -> dict:
    from tqdm import tqdm

    if cfg.init is not None:
        model = load_mini(cfg.init, attn_implementation="sdpa")[0].train()
    else:
        model = build_mini(seed=cfg.seed, attn_implementation="sdpa").train()
    if cfg.decoder_init_std is not None:
        init_decoder(model, cfg.decoder_init_std, cfg.seed)
    model.to(cfg.device)
    width = model.config.text_config.hidden_size
    aux_heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, AUX_CLASSES[k]) for k in cfg.aux_labels}).to(cfg.device)
    batcher = Batcher()
    history, started = [], time.perf_counter()
    if cfg.vision_steps > 0:
        history += _train_vision(model, aux_heads, batcher, cfg, progress, log, started)
    if cfg.freeze_vision:
        for module in (model.model.vision_tower, model.model.multi_modal_projector):
            module.requires_grad_(False)
        aux_heads = torch.nn.ModuleDict()  # nothing left for them to shape
    params = [p for p in model.parameters() if p.requires_grad] + list(aux_heads.parameters())

    bar = tqdm(total=cfg.steps * cfg.cycles, desc="train-mini", disable=not progress, mininterval=2)
    running = None
    for cycle in range(cfg.cycles):
        optim = _adamw(params, cfg.lr, cfg.weight_decay)  # a fresh optimiser per cycle, as a continuation had
        for step in range(cfg.steps):
            losses, loss = stage2_step(model, aux_heads, batcher, optim, params, cfg, step)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", answer=f"{losses['answer'].item():.3f}")
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                acc = answer_accuracy(model, batcher, "val", cfg.eval_n)
                entry = {"step": cycle * cfg.steps + step + 1, "cycle": cycle + 1,
                         "minutes": round((time.perf_counter() - started) / 60, 2), "loss": round(running, 4),
                         **{k: round(v.item(), 4) for k, v in losses.items() if k != "answer"},
                         "answer_loss": round(losses["answer"].item(), 4), "val": acc}
                history.append(entry)
                log(json.dumps(entry), flush=True)
    bar.close()
    out = Path(out)
    model.requires_grad_(True)
    model.to("cpu").eval().save_pretrained(out)
    batcher.processor.save_pretrained(out)
    record = {"config": asdict(cfg), "minutes": round((time.perf_counter() - started) / 60, 2),
              "threads": cfg.threads, "torch": torch.__version__, "machine": machine(), "history": history}
    (out / "training_log.json").write_text(json.dumps(record, indent=1))
    return record
