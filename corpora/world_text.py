"""Millions of distinct sentences of the synthetic world, each true of a picture ``corpora.world.render`` draws.

The corpus captions of :mod:`corpora.world` name each group's count, size, colour and shape in 11 templates and 4
joiners. That world runs out of sentences: 1M draws give 686k distinct ones, and a scene of one group has ~800
ways to be said. A bank of millions of rows needs more to say, so this generator also says what the picture shows
and the old captions leave out:

- **where** a group sits on the 3x3 grid: "on the left", "in the top row", "in the bottom right corner", "in the
  centre", "spread across the picture" (:func:`where`), read from the scene's layout (:func:`corpora.world.layout`
  draws the grid cells from ``layout_seed``, so the words are true of ``render(scene)`` at any size);
- **how two groups relate**: "above", "below", "to the left of", "to the right of" (:func:`relations`), used as the
  joiner when every object of one group is above (left of ...) every object of the other;
- **more phrasings**: 15 openings x 4 endings ("a rendered image of ... against a gray background").

Count, size, colour and shape words are those of :mod:`corpora.world`, so
:func:`corpora.world.attribute_accuracy` parses every sentence back to its scene exactly (position words end a
modifier run). The world CLIPs never saw the position and relation words in training: they embed a sentence with
them at cosine ~0.97-0.98 to the same sentence without (a near paraphrase), as real CLIP embeds details it barely
sees. Scenes come from split ``BIG_CORPUS_SEED``; 1.2M draws give ~1.1M distinct sentences.

    python -m corpora.world_text --out /tmp/big.txt.gz --sentences 1000000   # ~1 min
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from corpora import world

BIG_CORPUS_SEED = 6

OPENINGS = (
    "{x}", "a photo of {x}", "a picture of {x}", "an image of {x}", "a drawing of {x}", "there {be} {x}",
    "a photo showing {x}", "this image shows {x}", "we can see {x}", "a simple picture of {x}",
    "a rendered image of {x}", "in this picture we can see {x}", "the image shows {x}", "a computer drawing of {x}",
    "a close view of {x}",
)
ENDINGS = ("", " on a gray background", " on a dark gray background", " against a gray background")
_CORNERS = {0: "top left", 2: "top right", 6: "bottom left", 8: "bottom right"}
_COLUMN_WORDS = {0: ["on the left", "on the left side"], 1: ["in the middle column"],
                 2: ["on the right", "on the right side"]}
_ROW_WORDS = {0: ["at the top", "in the top row"], 1: ["in the middle row"], 2: ["at the bottom", "in the bottom row"]}


def where(cells: Sequence[int]) -> list[str]:
    """Position phrases true of objects in these grid cells (0..8, row-major on the 3x3 grid); may be empty."""
    cols = {c % world.GRID for c in cells}
    rows = {c // world.GRID for c in cells}
    out: list[str] = []
    for line, words in ((cols, _COLUMN_WORDS), (rows, _ROW_WORDS)):
        if len(line) == 1:  # every object in one column (row)
            out += words[next(iter(line))]
    if len(cells) == 1 and cells[0] in _CORNERS:
        out.append(f"in the {_CORNERS[cells[0]]} corner")
    if len(cells) == 1 and cells[0] == 4:
        out += ["in the centre", "in the middle"]
    if len(cols) >= 2 and len(rows) >= 2:
        out.append("spread across the picture")
    return out


def relations(a: Sequence[int], b: Sequence[int]) -> list[str]:
    """Relation words true of group ``a`` against group ``b`` (their grid cells): "above" when every object of
    ``a`` is in a higher row than every object of ``b``, and so on."""
    rows_a, rows_b = [c // world.GRID for c in a], [c // world.GRID for c in b]
    cols_a, cols_b = [c % world.GRID for c in a], [c % world.GRID for c in b]
    out = []
    if max(rows_a) < min(rows_b):
        out.append("above")
    if min(rows_a) > max(rows_b):
        out.append("below")
    if max(cols_a) < min(cols_b):
        out.append("to the left of")
    if min(cols_a) > max(cols_b):
        out.append("to the right of")
    return out


def group_cells(scene: world.Scene) -> dict[world.Group, list[int]]:
    """Each group's grid cells in ``render(scene)`` (the layout does not depend on the image size)."""
    _, _, _, placed = world.layout(scene, 16)
    cells: dict[world.Group, list[int]] = {g: [] for g in scene.groups}
    for g, cell in placed:
        cells[g].append(cell)
    return cells


def rich_caption(scene: world.Scene, rng: random.Random) -> str:
    """One sentence of ``scene``: its groups in random order, each with a true position half the time, joined by a
    true relation (40% when there is one) or a plain joiner, in one of 15 x 4 phrasings."""
    cells = group_cells(scene)
    groups = list(scene.groups)
    rng.shuffle(groups)
    phrases = []
    for g in groups:
        phrase, spots = world._phrase(g, rng), where(cells[g])
        phrases.append(f"{phrase} {rng.choice(spots)}" if spots and rng.random() < 0.5 else phrase)
    joiner = rng.choice(world.JOINERS)
    if len(groups) == 2:
        true = relations(cells[groups[0]], cells[groups[1]])
        if true and rng.random() < 0.4:
            joiner = f" {rng.choice(true)} "
    be = "is" if groups[0].count == 1 else "are"
    return rng.choice(OPENINGS).format(x=joiner.join(phrases), be=be) + rng.choice(ENDINGS)


def rich_split(n: int, seed: int = BIG_CORPUS_SEED) -> Iterator[tuple[world.Scene, str]]:
    """Items ``0..n-1`` of split ``seed``: (scene, one rich sentence of it); item i does not depend on n."""
    for i in range(n):
        rng = random.Random(world.scene_seed(seed, i))
        scene = world.sample_scene(rng)
        yield scene, rich_caption(scene, rng)


def distinct_sentences(n: int, seed: int = BIG_CORPUS_SEED, max_draws: int | None = None) -> Iterator[str]:
    """The first ``n`` distinct sentences of split ``seed`` (a repeat is skipped, by an 8-byte digest, so memory
    is ~100 bytes per sentence). Raises ValueError if ``max_draws`` (default 3n) draws give fewer."""
    seen: set[bytes] = set()
    limit = max_draws if max_draws is not None else 3 * n
    for _, text in rich_split(limit, seed):
        key = hashlib.blake2b(text.encode(), digest_size=8).digest()
        if key in seen:
            continue
        seen.add(key)
        yield text
        if len(seen) == n:
            return
    raise ValueError(f"only {len(seen):,} distinct sentences in {limit:,} draws of split {seed}, {n:,} asked")


def write_big_corpus(path: str | Path, n: int, seed: int = BIG_CORPUS_SEED) -> Path:
    """Write ``n`` distinct sentences, one per line (gzip when ``path`` ends in ``.gz``, streamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as out:
        for text in distinct_sentences(n, seed):
            out.write(text + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="corpus file (.txt or .txt.gz)")
    parser.add_argument("--sentences", type=int, default=1_000_000, help="distinct sentences to write")
    parser.add_argument("--seed", type=int, default=BIG_CORPUS_SEED)
    args = parser.parse_args()
    print(write_big_corpus(args.out, args.sentences, args.seed))


if __name__ == "__main__":
    main()
