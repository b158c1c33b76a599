"""The synthetic offline world: scenes of coloured shapes, their images, their captions and a caption metric.

A *scene* holds one or two *groups*; a group is ``count`` (1-3) identical objects of one ``size`` (small/large),
``colour`` (6 colours) and ``shape`` (circle/square/triangle). The two groups of a scene differ in (colour, shape).
Objects sit in distinct cells of a 3x3 grid (so they never overlap), with a little jitter, on a dark gray
background. Everything is pure and seeded: a scene carries its own ``layout_seed``, so ``render(scene)`` always
draws the same picture, and split ``s`` item ``i`` is always the same scene.

Captions name every group as ``<count> <size> <colour> <shape>`` ("two small red circles"), joined by "and" /
"with" / "together with", inside varied templates ("a photo of ...", "there are ..."), with synonyms for sizes
("small"/"little"/"tiny", "large"/"big"), shapes ("square"/"box", "circle"/"disc") and the number one ("a", "one",
"a single"). :func:`attribute_accuracy` parses a (generated) caption back into groups and scores it.

Seeds (each split is a different stream; scene ``i`` of split ``s`` uses ``scene_seed(s, i)``, a 64-bit hash, so
items of different splits never share a seed -- ``tests/test_world.py`` checks the sizes we ship):

- ``CORPUS_SEED = 0``: the text corpus (``corpus.txt.gz``, the memory bank and decoder training text);
- ``CLIP_TRAIN_SEED = 1``: the image/caption pairs the tiny CLIP is trained on;
- ``HELDOUT_SEED = 2``: held-out pairs for the CLIP's retrieval numbers in ``corpora/world/REPORT.md``;
- ``TEST_SEED = 3``: test and demo images (``write_image_set``), captioned and scored end to end;
- ``VIDEO_SEED = 4``: the world videos (``corpora/world_video.py``);
- ``UNLABELLED_SEED = 5``: images of the domain without captions, whose mean embedding the ``ms`` and ``rerank``
  strategies need (``decapflow memory image-mean``; the demo records it from 500 of them).

The world has ~6k distinct attribute combinations, so test scenes repeat combinations the corpus describes (as
COCO test images resemble training ones); their images, layouts and caption draws are new.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

CORPUS_SEED = 0
CLIP_TRAIN_SEED = 1
HELDOUT_SEED = 2
TEST_SEED = 3
UNLABELLED_SEED = 5

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 215, 40),
    "purple": (155, 60, 205),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
COUNTS = (1, 2, 3)
BACKGROUND = (60, 60, 60)

# Words used when writing captions: (singular, plural) per shape; synonyms per size; words for the number one.
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"), ("box", "boxes")),
    "triangle": (("triangle", "triangles"),),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
NUMBER_WORDS: dict[int, tuple[str, ...]] = {1: ("a", "one", "a single"), 2: ("two",), 3: ("three",)}
JOINERS = (" and ", " with ", " together with ", " and also ")
TEMPLATES = (
    "{x}",
    "a photo of {x}",
    "a picture of {x}",
    "an image of {x}",
    "a drawing of {x}",
    "there {be} {x}",
    "{x} on a gray background",
    "a gray background with {x}",
    "a photo showing {x}",
    "this image shows {x}",
    "we can see {x}",
)

# Words the parser understands (a superset of what captions use, so a wrong generated word still counts).
_PARSE_SHAPES = {w: s for s, forms in SHAPE_WORDS.items() for pair in forms for w in pair}
_PLURALS = {pair[1] for forms in SHAPE_WORDS.values() for pair in forms}
_PARSE_SIZES = {w: s for s, words in SIZE_WORDS.items() for w in words}
_PARSE_COLOURS = {c: c for c in (*COLOURS, "orange", "pink", "black", "brown", "gray", "grey")}
_PARSE_COUNTS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
GRID = 3


@dataclass(frozen=True)
class Group:
    """``count`` identical objects: e.g. Group(2, "small", "red", "circle") is "two small red circles"."""

    count: int
    size: str
    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.count not in COUNTS or self.size not in SIZES or self.colour not in COLOURS or self.shape not in SHAPES:
            raise ValueError(
                f"invalid group {self}: count in {COUNTS}, size in {SIZES}, colour in {tuple(COLOURS)}, "
                f"shape in {SHAPES}"
            )


@dataclass(frozen=True)
class Scene:
    """One picture: its groups (1 or 2, different (colour, shape)) and the seed of its layout and jitter."""

    groups: tuple[Group, ...]
    layout_seed: int

    def __post_init__(self) -> None:
        kinds = {(g.colour, g.shape) for g in self.groups}
        if not 1 <= len(self.groups) <= 2 or len(kinds) != len(self.groups):
            raise ValueError(f"a scene needs 1 or 2 groups with different (colour, shape), got {self.groups}")

    def key(self) -> tuple[tuple[int, str, str, str], ...]:
        """The scene's attributes without its layout, order-free: equal keys mean equally true captions."""
        return tuple(sorted((g.count, g.size, g.colour, g.shape) for g in self.groups))

    def to_dict(self) -> dict:
        return {"groups": [vars(g).copy() for g in self.groups], "layout_seed": self.layout_seed}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        try:
            groups = tuple(Group(int(g["count"]), g["size"], g["colour"], g["shape"]) for g in data["groups"])
            return cls(groups, int(data["layout_seed"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a scene dict (need 'groups' and 'layout_seed'): {data!r}") from exc


def scene_seed(split_seed: int, index: int) -> int:
    """The 64-bit seed of item ``index`` of split ``split_seed`` (a hash, so splits never share item seeds)."""
    digest = hashlib.blake2b(f"decapflow-world:{split_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def sample_scene(rng: random.Random) -> Scene:
    """Draw a scene: one group (30%) or two groups with different (colour, shape), uniform attributes."""
    n_groups = 1 if rng.random() < 0.3 else 2
    groups: list[Group] = []
    while len(groups) < n_groups:
        g = Group(rng.choice(COUNTS), rng.choice(SIZES), rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
        if all((g.colour, g.shape) != (h.colour, h.shape) for h in groups):
            groups.append(g)
    return Scene(tuple(groups), rng.getrandbits(48))


# ---------------------------------------------------------------------------------------------- rendering
SCALE = 4  # scenes are drawn at SCALE x the output size, then downsampled


def layout(scene: Scene, size: int) -> tuple[random.Random, int, tuple[int, ...], list[tuple[Group, int]]]:
    """Where a scene's objects go: ``(rng, side, background, [(group, grid cell) per object])``, drawn from
    ``scene.layout_seed`` in a fixed order; ``rng`` then continues with each object's jitter (``render``, videos)."""
    if size < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {size}")
    rng = random.Random(scene.layout_seed)
    side = size * SCALE
    bg = tuple(max(0, min(255, c + rng.randint(-8, 8))) for c in BACKGROUND)
    objects = [g for g in scene.groups for _ in range(g.count)]
    return rng, side, bg, list(zip(objects, rng.sample(range(GRID * GRID), len(objects)), strict=True))


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image; deterministic (jitter comes from ``scene.layout_seed``).

    Drawn at 4x and downsampled, so edges are anti-aliased. Large objects span ~28% of the side, small ~14%."""
    rng, side, bg, placed = layout(scene, size)
    image = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(image)
    cell, scale = side / GRID, SCALE
    for g, c in placed:
        radius = cell * (0.42 if g.size == "large" else 0.21) * rng.uniform(0.92, 1.05)
        slack = max(0.0, cell / 2 - radius - scale)
        cx = (c % GRID + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (c // GRID + 0.5) * cell + rng.uniform(-slack, slack)
        fill = tuple(max(0, min(255, v + rng.randint(-12, 12))) for v in COLOURS[g.colour])
        _draw_shape(draw, g.shape, cx, cy, radius, fill)
    return image.resize((size, size), Image.Resampling.BOX)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.85  # a square of about the circle's area
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:  # an upward equilateral triangle inscribed in the circle of radius r, nudged down to look centred
        dy = r * 0.2
        draw.polygon([(cx, cy - r + dy), (cx - r * 0.866, cy + r / 2 + dy), (cx + r * 0.866, cy + r / 2 + dy)], fill=fill)


# ---------------------------------------------------------------------------------------------- captions
def _phrase(g: Group, rng: random.Random) -> str:
    """A noun phrase for one group, e.g. "a single tiny white disc" or "three big blue boxes"."""
    number = rng.choice(NUMBER_WORDS[g.count])
    noun = rng.choice(SHAPE_WORDS[g.shape])[0 if g.count == 1 else 1]
    return f"{number} {rng.choice(SIZE_WORDS[g.size])} {g.colour} {noun}"


def caption(scene: Scene, rng: random.Random) -> str:
    """One caption of ``scene``: its groups in random order, in a random template."""
    groups = list(scene.groups)
    rng.shuffle(groups)
    x = rng.choice(JOINERS).join(_phrase(g, rng) for g in groups)
    be = "is" if groups[0].count == 1 else "are"
    return rng.choice(TEMPLATES).format(x=x, be=be)


def captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` paraphrases of ``scene`` (distinct when the world allows: up to 20 draws per caption)."""
    out: list[str] = []
    for _ in range(n):
        text = caption(scene, rng)
        for _ in range(20):
            if text not in out:
                break
            text = caption(scene, rng)
        out.append(text)
    return out


# ---------------------------------------------------------------------------------------------- metric
def attributes_in_caption(text: str) -> dict:
    """Parse a caption into the groups it names.

    A group is a shape noun (circle(s)/disc(s), square(s)/box(es), triangle(s)) with the run of modifier words
    right before it: a number ("a", "one", "single", "two", ... "six"), a size word, a colour word (the six world
    colours and a few others, so a wrong colour still counts as named). The last modifier of each kind wins.
    A missing number means 1 for a singular noun and None (unknown) for a plural; a missing size or colour is
    None. Returns ``{"groups": [{"count", "size", "colour", "shape"}, ...]}`` plus the per-attribute lists
    ``colours``, ``shapes``, ``counts``, ``sizes`` (one entry per group, in caption order)."""
    groups: list[dict] = []
    pending: dict = {}
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _PARSE_SHAPES:
            count = pending.get("count", None if word in _PLURALS else 1)
            groups.append({"count": count, "size": pending.get("size"), "colour": pending.get("colour"),
                           "shape": _PARSE_SHAPES[word]})
            pending = {}
        elif word in _PARSE_COUNTS:
            pending["count"] = _PARSE_COUNTS[word]
        elif word in _PARSE_SIZES:
            pending["size"] = _PARSE_SIZES[word]
        elif word in _PARSE_COLOURS:
            pending["colour"] = _PARSE_COLOURS[word]
        else:  # any other word ends a modifier run ("a photo of" must not lend its "a" to a later noun)
            pending = {}
    out: dict = {"groups": groups}
    for key, plural in (("colour", "colours"), ("shape", "shapes"), ("count", "counts"), ("size", "sizes")):
        out[plural] = [g[key] for g in groups]
    return out


def _multiset_f1(predicted: list, true: list) -> float:
    """F1 of two multisets: overlap = sum of min multiplicities; precision = overlap/|pred|, recall = overlap/|true|."""
    overlap = sum((Counter(predicted) & Counter(true)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(true)
    return 2 * precision * recall / (precision + recall)


def attribute_accuracy(caption_text: str, scene: Scene) -> dict[str, float]:
    """How well a caption names ``scene``'s attributes, each score in [0, 1] (1 = exactly right).

    The caption is parsed with :func:`attributes_in_caption` into groups; for each attribute the multiset of its
    per-group values in the caption is compared with the scene's by F1 (precision: what share of the caption's
    values are true; recall: what share of the scene's values are named). Keys:

    - ``colour``, ``shape``, ``count``, ``size``: F1 of that attribute's multiset (unknown values never match);
    - ``object``: F1 of whole (count, size, colour, shape) tuples -- credit only when one group is right in all
      four attributes (it checks binding: "a red circle and a blue square" vs "a blue circle and a red square");
    - ``mean``: the mean of colour, shape, count and size.

    A caption that names no shape scores 0 everywhere. Example: scene {2 small red circles, 1 large blue
    square}, caption "two red circles" gives colour 2/3 (P=1, R=1/2), shape 2/3, count 2/3, size 0, object 0."""
    parsed = attributes_in_caption(caption_text)["groups"]
    scores: dict[str, float] = {}
    for key in ("colour", "shape", "count", "size"):
        scores[key] = _multiset_f1([p[key] for p in parsed], [getattr(g, key) for g in scene.groups])
    tuples = [(p["count"], p["size"], p["colour"], p["shape"]) for p in parsed]
    scores["object"] = _multiset_f1(tuples, [(g.count, g.size, g.colour, g.shape) for g in scene.groups])
    scores["mean"] = sum(scores[k] for k in ("colour", "shape", "count", "size")) / 4
    return scores


# ---------------------------------------------------------------------------------------------- splits and files
def make_split(n: int, seed: int, n_captions: int = 5) -> list[tuple[Scene, list[str]]]:
    """Items ``0..n-1`` of split ``seed``: (scene, its ``n_captions`` captions); item i is independent of n."""
    items = []
    for i in range(n):
        rng = random.Random(scene_seed(seed, i))
        scene = sample_scene(rng)
        items.append((scene, captions(scene, rng, n_captions)))
    return items


def image_file_name(image_id: int) -> str:
    """COCO-like file name; the trailing integer is the image id."""
    return f"world_{image_id:012d}.png"


def write_image_set(folder: str | Path, n: int, seed: int = TEST_SEED, size: int = 64) -> Path:
    """Render ``n`` scenes of split ``seed`` into ``folder``: PNGs, ``captions.json``, ``scenes.json``.

    Image ids are 1..n (item i has id i+1). ``captions.json`` is in COCO captions format
    (``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "id", "caption"}]}``, 5 captions per
    image); ``scenes.json`` maps the id (as a string) to the scene dict. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations, scenes = [], [], {}
    for i, (scene, texts) in enumerate(make_split(n, seed)):
        image_id = i + 1
        render(scene, size).save(folder / image_file_name(image_id))
        images.append({"id": image_id, "file_name": image_file_name(image_id)})
        for text in texts:
            annotations.append({"image_id": image_id, "id": len(annotations) + 1, "caption": text})
        scenes[str(image_id)] = scene.to_dict()
    info = {"description": f"decapflow synthetic world, split seed {seed}, {n} images of {size}px"}
    (folder / "captions.json").write_text(json.dumps({"info": info, "images": images, "annotations": annotations}))
    (folder / "scenes.json").write_text(json.dumps(scenes))
    return folder


def load_scenes(folder: str | Path) -> dict[int, Scene]:
    """Read ``scenes.json`` written by :func:`write_image_set`: image id -> Scene."""
    data = json.loads((Path(folder) / "scenes.json").read_text())
    return {int(k): Scene.from_dict(v) for k, v in data.items()}


def write_corpus(path: str | Path, n_scenes: int, seed: int = CORPUS_SEED, per_scene: int = 1) -> Path:
    """Write the world's text corpus: ``per_scene`` captions for each of ``n_scenes`` scenes of split ``seed``,
    one per line (gzip-compressed when ``path`` ends in ``.gz``). Duplicates are kept; dedupe is ingest's job."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [text for _, texts in make_split(n_scenes, seed, per_scene) for text in texts]
    data = ("\n".join(lines) + "\n").encode()
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=9, mtime=0)  # mtime=0: the same corpus gives the same bytes
    path.write_bytes(data)
    return path
