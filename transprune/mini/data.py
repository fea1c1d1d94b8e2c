"""Generated visual questions with known answer regions: the testbed for the project's mini LLaVA.

A scene holds 3-6 coloured shapes (some large ones carry a digit) on a noisy background. Every
question's answer depends on one or two objects (or, for counts, every object it counts), and the
sample carries the pixel mask of those objects, hence which image patches matter. A sample is a pure
function of (split, index): splits draw from disjoint seed ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (215, 45, 40), "green": (45, 170, 70), "blue": (45, 85, 215),
    "yellow": (230, 205, 40), "purple": (145, 60, 175), "orange": (240, 135, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (6, 8), "large": (11, 14)}  # radius range in pixels
QUESTION_TYPES = ("colour", "shape_left", "count", "exists", "digit")
SPLITS = {"train": 0, "val": 10_000_000, "test": 20_000_000}
IMAGE_SIZE = 96
PATCH_SIZE = 6  # the mini model's patch: per-patch training labels use it


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    cx: int
    cy: int
    radius: int
    digit: str | None = None


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    qtype: str
    relevant: np.ndarray  # (H, W) bool: pixels of the objects the answer depends on
    objects: list[Obj] = field(default_factory=list)

    def relevant_patches(self, patch: int) -> np.ndarray:
        """(H/patch, W/patch) bool: patches that contain any relevant pixel."""
        return mask_patches(self.relevant, patch)


def mask_patches(mask: np.ndarray, patch: int) -> np.ndarray:
    """(H/patch, W/patch) bool: the patches that contain any pixel of the (H, W) ``mask``."""
    h, w = mask.shape
    return mask.reshape(h // patch, patch, w // patch, patch).any(axis=(1, 3))


def _place(rng, objects, radius, size):
    for _ in range(200):
        cx, cy = (int(v) for v in rng.integers(radius + 2, size - radius - 2, 2))
        if all((cx - o.cx) ** 2 + (cy - o.cy) ** 2 > (radius + o.radius + 4) ** 2 for o in objects):
            return cx, cy
    return None


def make_scene(rng: np.random.Generator, size: int = IMAGE_SIZE, count: tuple[int, int] = (3, 6)) -> list[Obj]:
    """Up to ``count`` = (fewest, most) objects (fewer if they do not fit)."""
    objects: list[Obj] = []
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        kind = str(rng.choice(list(SIZES)))
        radius = int(rng.integers(*SIZES[kind], endpoint=True))
        spot = _place(rng, objects, radius, size)
        if spot is None:
            continue
        digit = str(int(rng.integers(0, 10))) if kind == "large" else None
        objects.append(Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), kind, *spot, radius, digit))
    return objects


def _draw_shape(draw, o: Obj, fill):
    box = (o.cx - o.radius, o.cy - o.radius, o.cx + o.radius, o.cy + o.radius)
    if o.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif o.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(o.cx, o.cy - o.radius), (o.cx - o.radius, o.cy + o.radius), (o.cx + o.radius, o.cy + o.radius)],
                     fill=fill)


def render(objects: list[Obj], rng: np.random.Generator, size: int = IMAGE_SIZE):
    """The image and one pixel mask per object."""
    noise = rng.integers(225, 250, (size, size, 1)).repeat(3, axis=2).astype(np.uint8)
    image = Image.fromarray(noise)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    masks = []
    for o in objects:
        _draw_shape(draw, o, COLOURS[o.colour])
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), o, 255)
        masks.append(np.array(mask) > 0)
        if o.digit is not None:
            y = o.cy + (o.radius // 3 if o.shape == "triangle" else 0)
            # bold black: readable on every colour at 96 px (thin white digits were not learned in the budget)
            draw.text((o.cx, y), o.digit, fill=(0, 0, 0), font=font, anchor="mm", stroke_width=1, stroke_fill=(0, 0, 0))
    return image, masks


def _unique(o: Obj, objects: list[Obj], fields: tuple[str, ...]) -> bool:
    return sum(all(getattr(x, f) == getattr(o, f) for f in fields) for x in objects) == 1


def _describe(o: Obj, objects: list[Obj], avoid: str | None = None) -> str | None:
    """The shortest description naming only ``o`` in the scene (never using the field ``avoid``)."""
    for fields in (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")):
        if avoid not in fields and _unique(o, objects, fields):
            return " ".join(getattr(o, f) for f in fields)
    return None


def left_neighbour(t: Obj, objects: list[Obj]) -> int | None:
    """Index of the object a person would call "left of" ``t``: the nearest one on its left at roughly the
    same height, if it is clearly the nearest (else None)."""
    left = sorted((i for i, o in enumerate(objects) if o.cx < t.cx - t.radius and abs(o.cy - t.cy) <= t.radius + o.radius),
                  key=lambda i: objects[i].cx)
    if left and (len(left) == 1 or objects[left[-1]].cx - objects[left[-2]].cx > 4):
        return left[-1]
    return None


def _question(rng, qtype, objects, masks):
    """(question, answer, relevant mask, find, read) for one question type, or None if the scene has no such
    question. ``find``: indices of the objects the question names; ``read``: those the answer is read from
    (for counts and "is there", the objects that match; possibly none)."""
    empty = np.zeros_like(masks[0])
    if qtype == "colour":
        candidates = [i for i, o in enumerate(objects) if _describe(o, objects, avoid="colour")]
        if not candidates:
            return None
        i = candidates[int(rng.integers(len(candidates)))]
        return f"what colour is the {_describe(objects[i], objects, avoid='colour')} ?", objects[i].colour, masks[i], [i], [i]
    if qtype == "shape_left":
        pairs = []
        for t, o in enumerate(objects):
            name = _describe(o, objects)
            left = left_neighbour(o, objects)
            if name and left is not None:
                pairs.append((t, left, name))
        if not pairs:
            return None
        t, left, name = pairs[int(rng.integers(len(pairs)))]
        return f"what shape is left of the {name} ?", objects[left].shape, masks[t] | masks[left], [t], [left]
    if qtype == "count":
        if rng.random() < 0.5:
            key = str(rng.choice(list(COLOURS)))
            hits = [i for i, o in enumerate(objects) if o.colour == key]
            question = f"how many {key} objects are there ?"
        else:
            key = str(rng.choice(SHAPES))
            hits = [i for i, o in enumerate(objects) if o.shape == key]
            question = f"how many {key}s are there ?"
        return question, str(len(hits)), np.logical_or.reduce([masks[i] for i in hits]) if hits else empty, hits, hits
    if qtype == "exists":
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        if rng.random() < 0.5:  # balance yes / no: ask about a real object half of the time
            o = objects[int(rng.integers(len(objects)))]
            colour, shape = o.colour, o.shape
        hits = [i for i, o in enumerate(objects) if (o.colour, o.shape) == (colour, shape)]
        # For "no" the evidence is every object of that shape (the one it could have been).
        evidence = hits or [i for i, o in enumerate(objects) if o.shape == shape]
        return (f"is there a {colour} {shape} ?", "yes" if hits else "no",
                np.logical_or.reduce([masks[i] for i in evidence]) if evidence else empty, hits, hits)
    # digit
    candidates = [i for i, o in enumerate(objects) if o.digit is not None and _describe(o, objects)]
    if not candidates:
        return None
    i = candidates[int(rng.integers(len(candidates)))]
    return f"what digit is on the {_describe(objects[i], objects)} ?", objects[i].digit, masks[i], [i], [i]


def sample(split: str, index: int, qtype: str | None = None, size: int = IMAGE_SIZE) -> Sample:
    """The ``index``-th sample of ``split`` (``train``, ``val`` or ``test``); deterministic."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {', '.join(SPLITS)}")
    rng = np.random.default_rng(SPLITS[split] + index)
    wanted = qtype or QUESTION_TYPES[index % len(QUESTION_TYPES)]
    if wanted not in QUESTION_TYPES:
        raise ValueError(f"qtype={wanted!r}; choose one of {', '.join(QUESTION_TYPES)}")
    while True:  # redraw the scene until it supports the wanted question type
        objects = make_scene(rng, size)
        if not objects:
            continue
        image, masks = render(objects, rng, size)
        made = _question(rng, wanted, objects, masks)
        if made is not None:
            question, answer, relevant = made[:3]
            return Sample(image, question, answer, wanted, relevant, objects)


def scene(split: str, index: int, size: int = IMAGE_SIZE, count: tuple[int, int] = (3, 6)):
    """(image, objects, per-object masks, rng) of the ``index``-th training scene of ``split``.

    Training draws whole scenes and asks several questions about each (`scene_questions`); evaluation uses
    `sample`, one question per index.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {', '.join(SPLITS)}")
    rng = np.random.default_rng(SPLITS[split] + index)
    while True:
        objects = make_scene(rng, size, count)
        if objects:
            image, masks = render(objects, rng, size)
            return image, objects, masks, rng


class Question(NamedTuple):
    question: str
    answer: str
    qtype: str
    relevant: np.ndarray  # (H, W) bool, as `Sample.relevant`
    find: list[int]  # indices of the objects the question names
    read: list[int]  # indices of the objects the answer is read from (counts, "is there": the matches)


def scene_questions(rng: np.random.Generator, objects: list[Obj], masks: list[np.ndarray], per_type: int = 1):
    """``per_type`` `Question` per question type (drawn independently, so they may repeat); types the scene
    cannot support are replaced by a count / exists question (always possible), so every scene yields exactly
    ``5 * per_type``."""
    out = []
    for qtype in [q for q in QUESTION_TYPES for _ in range(per_type)]:
        made = _question(rng, qtype, objects, masks)
        if made is None:
            qtype = ("count", "exists")[int(rng.integers(2))]
            made = _question(rng, qtype, objects, masks)
        question, answer, relevant, find, read = made
        out.append(Question(question, answer, qtype, relevant, find, read))
    return out


def patch_labels(objects: list[Obj], masks: list[np.ndarray], patch: int) -> dict[str, np.ndarray]:
    """Per-patch targets (row-major, length (H/patch)^2) for an auxiliary training loss on the image tokens.

    Of the object covering most of the patch (a patch counts as covered from 1/6 of its pixels; 0 = background):
    ``colour``, ``shape``, ``size``, ``digit`` (0 also for no digit); scene facts about that object:
    ``left_shape`` (shape of its left neighbour as `left_neighbour` defines it, 0 for none),
    ``colour_count`` / ``shape_count`` (objects in the scene sharing its colour / shape); ``centre``: the
    colour of the object whose centre is in the patch; and, for every patch, its ``row`` and ``column`` (so the
    image tokens carry where they are as content: "left of" compares positions)."""
    h, w = masks[0].shape if masks else (IMAGE_SIZE, IMAGE_SIZE)
    grid = (h // patch, w // patch)
    cover = np.stack([m.reshape(grid[0], patch, grid[1], patch).sum(axis=(1, 3)) for m in masks])  # (O, gh, gw)
    best = cover.argmax(0)
    covered = cover.max(0) * 6 >= patch * patch
    colours, shapes, sizes = list(COLOURS), list(SHAPES), list(SIZES)
    labels = {k: np.zeros(grid, np.int64) for k in PATCH_LABELS}
    for i, o in enumerate(objects):
        here = covered & (best == i)
        left = left_neighbour(o, objects)
        labels["colour"][here] = colours.index(o.colour) + 1
        labels["shape"][here] = shapes.index(o.shape) + 1
        labels["size"][here] = sizes.index(o.size) + 1
        labels["digit"][here] = 0 if o.digit is None else int(o.digit) + 1
        labels["left_shape"][here] = 0 if left is None else shapes.index(objects[left].shape) + 1
        labels["colour_count"][here] = sum(x.colour == o.colour for x in objects)
        labels["shape_count"][here] = sum(x.shape == o.shape for x in objects)
        labels["centre"][min(o.cy // patch, grid[0] - 1), min(o.cx // patch, grid[1] - 1)] = colours.index(o.colour) + 1
    labels["row"], labels["column"] = np.indices(grid)
    return {k: v.reshape(-1) for k, v in labels.items()}


# Number of classes of each per-patch label (class 0 included).
PATCH_LABELS = {"colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1, "size": len(SIZES) + 1, "digit": 11,
                "left_shape": len(SHAPES) + 1, "colour_count": 7, "shape_count": 7, "centre": len(COLOURS) + 1,
                "row": IMAGE_SIZE // PATCH_SIZE, "column": IMAGE_SIZE // PATCH_SIZE}
