"""The synthetic world: seeded scenes, rendering, captions, the attribute metric, files, and the shipped CLIP."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from corpora import world
from corpora.world import Group, Scene

WORLD_DIR = Path(world.__file__).parent / "world"
SCENE = Scene((Group(2, "small", "red", "circle"), Group(1, "large", "blue", "square")), layout_seed=7)


def test_split_and_render_are_deterministic():
    a, b = world.make_split(20, 5), world.make_split(20, 5)
    assert a == b
    assert world.make_split(5, 5) == a[:5]  # item i does not depend on the split size
    assert [s for s, _ in world.make_split(20, 6)] != [s for s, _ in a]
    assert np.array_equal(np.asarray(world.render(a[0][0])), np.asarray(world.render(a[0][0])))
    image = world.render(a[0][0], size=48)
    assert image.mode == "RGB" and image.size == (48, 48)


def test_scene_dict_roundtrip_and_validation():
    assert Scene.from_dict(json.loads(json.dumps(SCENE.to_dict()))) == SCENE
    with pytest.raises(ValueError, match="invalid group"):
        Group(4, "small", "red", "circle")
    with pytest.raises(ValueError, match="different"):
        Scene((Group(1, "small", "red", "circle"), Group(2, "large", "red", "circle")), 0)
    with pytest.raises(ValueError, match="not a scene dict"):
        Scene.from_dict({"groups": []})


def test_scene_sampler_covers_the_world():
    scenes = [s for s, _ in world.make_split(2000, 11, n_captions=1)]
    groups = [g for s in scenes for g in s.groups]
    assert {g.colour for g in groups} == set(world.COLOURS)
    assert {g.shape for g in groups} == set(world.SHAPES)
    assert {g.count for g in groups} == set(world.COUNTS)
    assert {g.size for g in groups} == set(world.SIZES)
    assert 0.2 < np.mean([len(s.groups) == 1 for s in scenes]) < 0.4
    assert len({s.key() for s in scenes}) > 1000  # captions are far from trivially identical


def test_rendered_pixels_show_the_scene_colours():
    image = np.asarray(world.render(SCENE, size=64)).reshape(-1, 3).astype(int)
    for colour, expected_share in (("red", 0.015), ("blue", 0.04)):
        near = np.abs(image - np.array(world.COLOURS[colour])).max(axis=1) < 30
        assert near.mean() > expected_share, colour
    assert (np.abs(image - np.array(world.COLOURS["yellow"])).max(axis=1) < 30).mean() == 0


def test_captions_are_varied_and_name_every_attribute():
    for scene, texts in world.make_split(200, 12):
        assert len(texts) == 5 and len(set(texts)) == 5
        for text in texts:
            assert text == text.lower() and 3 <= len(text.split()) <= 16
            assert world.attribute_accuracy(text, scene)["object"] == 1.0, (text, scene)
    texts = world.captions(SCENE, random.Random(0), n=30)
    assert any(t.startswith("two") for t in texts) and any(t.startswith("a photo") for t in texts)
    assert any("box" in t for t in texts) and any("square" in t for t in texts)


def test_attribute_accuracy_scores_right_and_wrong_captions():
    right = world.attribute_accuracy("a photo of two tiny red circles and a big blue box", SCENE)
    assert right == {"colour": 1.0, "shape": 1.0, "count": 1.0, "size": 1.0, "object": 1.0, "mean": 1.0}
    swapped = world.attribute_accuracy("two small blue circles and a large red square", SCENE)
    assert swapped["colour"] == swapped["shape"] == 1.0 and swapped["object"] == 0.0
    partial = world.attribute_accuracy("two red circles", SCENE)  # the docstring's example
    assert partial["colour"] == pytest.approx(2 / 3) and partial["size"] == 0.0 and partial["object"] == 0.0
    wrong = world.attribute_accuracy("three green triangles", SCENE)
    assert wrong["mean"] == 0.0
    assert world.attribute_accuracy("a photo of nothing at all", SCENE)["mean"] == 0.0
    parsed = world.attributes_in_caption("a photo of red circles with an orange box")
    assert parsed["groups"] == [
        {"count": None, "size": None, "colour": "red", "shape": "circle"},
        {"count": 1, "size": None, "colour": "orange", "shape": "square"},
    ]


def test_write_image_set_writes_coco_json_and_images(tmp_path):
    folder = world.write_image_set(tmp_path / "test", n=4, seed=world.TEST_SEED, size=32)
    coco = json.loads((folder / "captions.json").read_text())
    assert [im["id"] for im in coco["images"]] == [1, 2, 3, 4]
    assert len(coco["annotations"]) == 20 and len({a["id"] for a in coco["annotations"]}) == 20
    assert {a["image_id"] for a in coco["annotations"]} == {1, 2, 3, 4}
    scenes = world.load_scenes(folder)
    for im in coco["images"]:
        assert im["file_name"] == f"world_{im['id']:012d}.png"
        pixels = np.asarray(Image.open(folder / im["file_name"]))
        assert pixels.shape == (32, 32, 3)
        assert np.array_equal(pixels, np.asarray(world.render(scenes[im["id"]], 32)))
    for a in coco["annotations"]:
        assert world.attribute_accuracy(a["caption"], scenes[a["image_id"]])["object"] == 1.0


def test_write_corpus_plain_and_gzip(tmp_path):
    plain = world.write_corpus(tmp_path / "c.txt", 50, seed=world.CORPUS_SEED, per_scene=2)
    lines = plain.read_text().splitlines()
    assert len(lines) == 100
    zipped = world.write_corpus(tmp_path / "c.txt.gz", 50, seed=world.CORPUS_SEED, per_scene=2)
    assert gzip.decompress(zipped.read_bytes()).decode().splitlines() == lines


def test_splits_use_disjoint_seeds():
    """Test/held-out items never share a seed (so a layout) with corpus or CLIP-training items."""
    def seeds(split: int, n: int) -> set[int]:
        return {world.scene_seed(split, i) for i in range(n)}

    # sizes used for the shipped artefacts: corpus scenes, and CLIP training steps x batch size
    corpus, train = seeds(world.CORPUS_SEED, 24_000), seeds(world.CLIP_TRAIN_SEED, 1200 * 128)
    for split in (world.TEST_SEED, world.HELDOUT_SEED):
        held = seeds(split, 5_000)
        assert len(held) == 5_000 and not held & corpus and not held & train
    test_layouts = {s.layout_seed for s, _ in world.make_split(1000, world.TEST_SEED, 1)}
    corpus_layouts = {s.layout_seed for s, _ in world.make_split(5000, world.CORPUS_SEED, 1)}
    assert not test_layouts & corpus_layouts


# ---------------------------------------------------------------------------------------------- shipped artefacts
def test_shipped_corpus_is_reproducible_and_varied(tmp_path):
    shipped = gzip.decompress((WORLD_DIR / "corpus.txt.gz").read_bytes()).decode().splitlines()
    assert len(set(shipped)) > 15_000
    assert shipped[:200] == [c for _, cs in world.make_split(200, world.CORPUS_SEED, 1) for c in cs]


@pytest.fixture(scope="module")
def world_clip():
    import open_clip

    torch.set_num_threads(1)
    open_clip.add_model_config(WORLD_DIR / "world-clip.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "world-clip", pretrained=str(WORLD_DIR / "world-clip.safetensors")
    )
    return model.eval(), preprocess, open_clip.get_tokenizer("world-clip")


def test_shipped_clip_loads_offline_and_embeds_unit_vectors(world_clip):
    model, preprocess, tokenizer = world_clip
    assert tokenizer.vocab_size == 49408 and tokenizer.context_length == 32
    images = [world.render(s) for s, _ in world.make_split(3, world.TEST_SEED)]
    from corpora.train_world_clip import to_pixels

    pixels = torch.stack([preprocess(im) for im in images])
    assert torch.allclose(pixels, to_pixels(images, model), atol=1e-5)  # training saw what inference sees
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(["two small red circles"])), dim=-1)
    assert img.shape == (3, 128) and txt.shape == (1, 128)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_shipped_clip_retrieves_held_out_captions(world_clip):
    model, preprocess, tokenizer = world_clip
    items = world.make_split(50, world.TEST_SEED)
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(world.render(s)) for s, _ in items]))
        txt = model.encode_text(tokenizer([texts[0] for _, texts in items]))
    sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T  # [50, 50]
    best = sim.argmax(dim=1).tolist()
    top1 = np.mean([items[i][0].key() == items[b][0].key() for i, b in enumerate(best)])
    attr = np.mean([world.attribute_accuracy(items[b][1][0], items[i][0])["mean"] for i, b in enumerate(best)])
    assert top1 >= 0.8, top1  # chance is 0.02
    assert attr >= 0.9, attr
