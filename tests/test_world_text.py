"""The big-bank text generator (corpora/world_text.py): many distinct sentences, each true of the rendered scene."""

from __future__ import annotations

import gzip
import itertools
import random

import numpy as np
import pytest

from corpora import world
from corpora import world_text as wt


def test_sentences_name_their_scene_exactly() -> None:
    for scene, text in itertools.islice(wt.rich_split(2000), 2000):
        scores = world.attribute_accuracy(text, scene)
        assert scores["object"] == 1.0, (text, scene)


def test_far_more_distinct_sentences_than_the_corpus_captions() -> None:
    draws = 40_000
    rich = {text for _, text in wt.rich_split(draws)}
    plain = set()
    for i in range(draws):
        rng = random.Random(world.scene_seed(wt.BIG_CORPUS_SEED, i))
        plain.add(world.caption(world.sample_scene(rng), rng))
    assert len(rich) >= 0.95 * draws  # measured: 0.979
    assert len(rich) > len(plain) + 0.1 * draws  # plain: 0.837 of the draws here, 0.686 at 1M draws
    got = list(wt.distinct_sentences(20_000))
    assert len(got) == len(set(got)) == 20_000
    assert got[:5] == [text for _, text in itertools.islice(wt.rich_split(5), 5)]  # no repeats among the first
    with pytest.raises(ValueError, match="distinct sentences"):
        list(wt.distinct_sentences(10, max_draws=5))


def test_write_big_corpus(tmp_path) -> None:
    path = wt.write_big_corpus(tmp_path / "big.txt.gz", 3000)
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert len(lines) == len(set(lines)) == 3000


def _thirds(mask: np.ndarray) -> tuple[set[int], set[int]]:
    """The thirds of the image (0, 1, 2) that the mask's pixels fall in: (columns, rows)."""
    ys, xs = np.nonzero(mask)
    side = mask.shape[0]
    return {int(x) * 3 // side for x in xs}, {int(y) * 3 // side for y in ys}


def test_position_words_are_true_of_the_rendered_picture() -> None:
    """Find each group's pixels in render(scene) by its colour and check every phrase where() gives it."""
    checked = 0
    expect_cols = {"on the left": {0}, "on the left side": {0}, "on the right": {2}, "on the right side": {2},
                   "in the middle column": {1}}
    expect_rows = {"at the top": {0}, "in the top row": {0}, "at the bottom": {2}, "in the bottom row": {2},
                   "in the middle row": {1}}
    for scene, _ in itertools.islice(wt.rich_split(300, seed=11), 300):
        if len({g.colour for g in scene.groups}) != len(scene.groups):
            continue  # a colour shared by both groups cannot tell them apart in pixels
        pixels = np.asarray(world.render(scene, 96), dtype=np.int32)
        cells = wt.group_cells(scene)
        for g in scene.groups:
            mask = np.abs(pixels - np.array(world.COLOURS[g.colour])).max(axis=2) < 16  # object interiors
            cols, rows = _thirds(mask)
            for phrase in wt.where(cells[g]):
                checked += 1
                if phrase in expect_cols:
                    assert cols == expect_cols[phrase], (phrase, g, cols)
                elif phrase in expect_rows:
                    assert rows == expect_rows[phrase], (phrase, g, rows)
                elif phrase.endswith("corner"):
                    vertical, horizontal = phrase.split()[2:4]
                    assert rows == {0 if vertical == "top" else 2} and cols == {0 if horizontal == "left" else 2}
                elif phrase in ("in the centre", "in the middle"):
                    assert rows == cols == {1}
                else:
                    assert phrase == "spread across the picture" and len(rows) >= 2 and len(cols) >= 2
        if len(scene.groups) == 2:
            a, b = scene.groups
            for rel in wt.relations(cells[a], cells[b]):
                checked += 1
                ma = np.abs(pixels - np.array(world.COLOURS[a.colour])).max(axis=2) < 16
                mb = np.abs(pixels - np.array(world.COLOURS[b.colour])).max(axis=2) < 16
                (ya, xa), (yb, xb) = np.nonzero(ma), np.nonzero(mb)
                holds = {"above": ya.max() < yb.min(), "below": ya.min() > yb.max(),
                         "to the left of": xa.max() < xb.min(), "to the right of": xa.min() > xb.max()}[rel]
                assert holds, (rel, a, b)
    assert checked > 300
