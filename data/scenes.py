"""Deterministic procedural scenes: coloured shapes on a plain or lightly noisy background.

A scene is laid out on a 3×3 grid of cells; each shape fills (part of) one cell, so shapes never
touch. A scene holds one or two groups; a group is 1–3 shapes of one colour, one shape kind and
one size, optionally tied to a region of the grid (left column, right column, top row or bottom
row). Two groups never share both colour and shape kind, so a caption never mixes them up.

Captions paraphrase: 16 sentence templates, and group phrases that vary the article/count word
("a"/"one"), the size word ("small"/"little", "large"/"big") and the region phrase ("on the left",
"in the left column", ...). When a scene has two groups whose cells lie wholly to one side of each
other (every column of the first left of every column of the second, or right of; or the same by
rows: above, below), a share of its captions (`RELATION_SHARE`) states that relation instead of the
regions: "a red circle to the left of two blue squares", "a green star above a small yellow triangle".

Held-out templates: the last quarter of a template list (`template_pool`) is used only by val/test
rows, the rest only by train rows, so a val/test caption is never verbatim a train caption. The
split comes from the caller (`split`, default "train").

Everything comes from `numpy.random.default_rng([seed, index])`: the same (seed, index, split) gives
the same scene spec, caption and pixels; the split changes only the caption. Layout and caption use
separate streams, so captions can be made without drawing (`caption_corpus`).

`label` is the class of the dominant group (most shapes; the first group on a tie):
`SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)`, named in `LABEL_NAMES`
("red circle", ...): 24 classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {  # shape colours: saturated and far from every background
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 180),
    "orange": (245, 135, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.28, "large": 0.44}  # shape radius as a fraction of the cell side
REGIONS = {  # grid cells (row, col) of each region
    "left": [(0, 0), (1, 0), (2, 0)],
    "right": [(0, 2), (1, 2), (2, 2)],
    "top": [(0, 0), (0, 1), (0, 2)],
    "bottom": [(2, 0), (2, 1), (2, 2)],
    None: [(r, c) for r in range(3) for c in range(3)],
}
REGION_PHRASES = {
    "left": ("on the left", "on the left side", "in the left column"),
    "right": ("on the right", "on the right side", "in the right column"),
    "top": ("at the top", "along the top", "in the top row"),
    "bottom": ("at the bottom", "along the bottom", "in the bottom row"),
}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
RELATION_WORDS = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
RELATION_SHARE = 0.6  # of the two-group scenes where a relation holds
LABEL_NAMES = [f"{c} {s}" for s in SHAPES for c in COLOURS]

TEMPLATES = [
    "{groups}.",
    "a picture of {groups}.",
    "an image showing {groups}.",
    "{groups} on a {background} background.",
    "a {background} background with {groups}.",
    "a simple drawing of {groups}.",
    "here we see {groups}.",
    "a synthetic scene with {groups}.",
    "a flat illustration of {groups}.",
    "the image contains {groups}.",
    "a plain {background} canvas showing {groups}.",
    "in this picture: {groups}.",
    # held out: val/test rows only (template_pool)
    "a computer-generated picture of {groups}.",
    "this scene shows {groups}.",
    "{groups}, drawn on a {background} background.",
    "a graphic with {groups} against a {background} backdrop.",
]
HELD_OUT_SHARE = 0.25


def template_pool(templates: list[str], split: str = "train") -> list[str]:
    """The templates a row of `split` may use: train rows the first three quarters of the list,
    val and test rows only the held-out last quarter (so their captions are never train captions)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    cut = len(templates) - round(len(templates) * HELD_OUT_SHARE)
    return templates[:cut] if split == "train" else templates[cut:]


@dataclass(frozen=True)
class Group:
    colour: str
    shape: str
    size: str
    region: str | None
    cells: tuple[tuple[int, int], ...]  # one cell per shape

    @property
    def count(self) -> int:
        return len(self.cells)


@dataclass(frozen=True)
class Scene:
    background: str
    noise: int  # max amplitude of the uniform background noise, 0 = plain
    groups: tuple[Group, ...]
    offsets: tuple[tuple[float, float], ...]  # per shape, in [-1, 1]: where in its cell it sits

    @property
    def label(self) -> int:
        top = max(self.groups, key=lambda g: g.count)  # max keeps the first on a tie
        return SHAPES.index(top.shape) * len(COLOURS) + list(COLOURS).index(top.colour)


def sample_scene(seed: int, index: int, max_noise: int = 6) -> Scene:
    """The scene spec of sample `index` for `seed` (no pixels)."""
    rng = np.random.default_rng([seed, index, 0])
    used: set[tuple[int, int]] = set()
    groups: list[Group] = []
    for _ in range(int(rng.integers(1, 3))):
        regions = [r for r, cells in REGIONS.items() if any(c not in used for c in cells)]
        region = regions[int(rng.integers(len(regions)))]
        free = [c for c in REGIONS[region] if c not in used]
        count = int(rng.integers(1, min(3, len(free)) + 1))
        picked = [free[i] for i in sorted(rng.choice(len(free), size=count, replace=False))]
        while True:
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            if all((g.colour, g.shape) != (colour, shape) for g in groups):
                break
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        groups.append(Group(colour, shape, size, region, tuple(picked)))
        used.update(picked)
    n_shapes = sum(g.count for g in groups)
    offsets = tuple((float(x), float(y)) for x, y in rng.uniform(-1, 1, size=(n_shapes, 2)))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    noise = int(rng.integers(0, max_noise + 1)) if max_noise > 0 else 0
    return Scene(background, noise, tuple(groups), offsets)


def _group_phrase(g: Group, rng: np.random.Generator, region: bool = True) -> tuple[str, list[str]]:
    words, grounded = [], []
    if g.count == 1 and rng.random() < 0.5:
        words.append("a")  # an article, not grounded; the singular noun carries the count
    else:
        words.append(NUMBER_WORDS[g.count])
        grounded.append(NUMBER_WORDS[g.count])
    if rng.random() < 0.5:
        size = SIZE_WORDS[g.size][int(rng.integers(2))]
        words.append(size)
        grounded.append(size)
    noun = g.shape + ("s" if g.count > 1 else "")
    words += [g.colour, noun]
    grounded += [g.colour, noun]
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"  # "an orange star"
    if region and g.region is not None and rng.random() < 0.7:
        options = REGION_PHRASES[g.region]
        words.append(options[int(rng.integers(len(options)))])
        grounded.append(g.region)
    return " ".join(words), grounded


def relations(a: Group, b: Group) -> list[str]:
    """The relation phrases true of "a <phrase> b": every cell of `a` lies strictly on that side of
    every cell of `b`. Shapes stay inside their cells, so this holds of the drawn pixels too."""
    rows_a, cols_a = [r for r, _ in a.cells], [c for _, c in a.cells]
    rows_b, cols_b = [r for r, _ in b.cells], [c for _, c in b.cells]
    out = []
    if max(cols_a) < min(cols_b):
        out.append("to the left of")
    if min(cols_a) > max(cols_b):
        out.append("to the right of")
    if max(rows_a) < min(rows_b):
        out.append("above")
    if min(rows_a) > max(rows_b):
        out.append("below")
    return out


def caption_scene(scene: Scene, seed: int, index: int, split: str = "train") -> tuple[str, list[str]]:
    """A caption that states only what was drawn, and its grounded words (in caption order, deduplicated).

    `split` picks the template pool (`template_pool`); without it the caption is a train caption.
    """
    rng = np.random.default_rng([seed, index, 1])
    # groups keep their order (their order is random already); a region beside a relation reads badly
    options = relations(*scene.groups) if len(scene.groups) == 2 else []
    if options and rng.random() < RELATION_SHARE:
        rel = options[int(rng.integers(len(options)))]
        (p1, w1), (p2, w2) = (_group_phrase(g, rng, region=False) for g in scene.groups)
        groups, grounded = f"{p1} {rel} {p2}", w1 + [RELATION_WORDS[rel]] + w2
    else:
        phrases, grounded = [], []
        for g in scene.groups:
            p, w = _group_phrase(g, rng)
            phrases.append(p)
            grounded += w
        groups = " and ".join(phrases)
    pool = template_pool(TEMPLATES, split)
    template = pool[int(rng.integers(len(pool)))]
    if "{background}" in template:
        grounded.append(scene.background)
    caption = template.format(groups=groups, background=scene.background)
    return caption, list(dict.fromkeys(grounded))


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
    if shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles, strict=True)]
    raise ValueError(f"unknown polygon shape {shape!r}")


def shape_centres(scene: Scene, image_size: int) -> list[tuple[Group, float, float, float]]:
    """(group, centre x, centre y, radius) in pixels for every shape, in drawing order."""
    cell = image_size / 3
    out, i = [], 0
    for g in scene.groups:
        r = SIZES[g.size] * cell
        slack = 0.5 * cell - r - 1  # keep a 1 px gap to the cell border
        for row, col in g.cells:
            dx, dy = scene.offsets[i]
            i += 1
            out.append((g, (col + 0.5) * cell + dx * slack, (row + 0.5) * cell + dy * slack, r))
    return out


def draw_scene(scene: Scene, image_size: int, seed: int, index: int) -> Image.Image:
    """Render the scene as an RGB image; shapes use their exact palette colour (no anti-aliasing)."""
    rng = np.random.default_rng([seed, index, 2])
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
    pixels = np.broadcast_to(bg, (image_size, image_size, 3)).copy()
    if scene.noise > 0:
        pixels += rng.integers(-scene.noise, scene.noise + 1, size=(image_size, image_size, 1), dtype=np.int16)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for g, cx, cy, r in shape_centres(scene, image_size):
        colour = COLOURS[g.colour]
        if g.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif g.shape == "square":
            s = 0.85 * r  # a square of half-side r would look bigger than the other shapes
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
        else:
            draw.polygon(_shape_points(g.shape, cx, cy, r), fill=colour)
    return img


def make_scene(seed: int, index: int, image_size: int = 112, max_noise: int = 6, split: str = "train"):
    """(scene, image, caption, grounded) for sample `index` of `seed`; `split` picks the caption templates."""
    scene = sample_scene(seed, index, max_noise)
    caption, grounded = caption_scene(scene, seed, index, split)
    return scene, draw_scene(scene, image_size, seed, index), caption, grounded
