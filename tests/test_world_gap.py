"""The shipped realistic-gap world CLIP (encoder spec ``world-gap``): loads offline, has real CLIP's modality gap,
and still retrieves the right captions."""

from __future__ import annotations

import numpy as np
import pytest

from corpora import world
from decapflow.encoders import BUILTIN_SPECS, load_encoder, parse_spec


@pytest.fixture(scope="module")
def held_out():
    """300 held-out scenes (split HELDOUT_SEED, as in corpora/world/REPORT.md), their images and first captions."""
    items = world.make_split(300, world.HELDOUT_SEED, n_captions=1)
    return [s for s, _ in items], [world.render(s) for s, _ in items], [texts[0] for _, texts in items]


def _measure(spec: str, held_out) -> dict[str, float]:
    scenes, images, texts = held_out
    enc = load_encoder(spec, "cpu")
    img, txt = enc.encode_image(images), enc.encode_text(texts)  # [n, D] unit vectors each
    sim = img @ txt.T
    keys = [s.key() for s in scenes]
    return {
        "gap": float(np.linalg.norm(img.mean(0) - txt.mean(0))),
        "i2t_top1": float(np.mean([keys[i] == keys[j] for i, j in enumerate(sim.argmax(1))])),
        "t2i_top1": float(np.mean([keys[j] == keys[i] for j, i in enumerate(sim.argmax(0))])),
        "pair_cos": float(np.diag(sim).mean()),
    }


def test_world_gap_spec_loads_the_shipped_weights_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = parse_spec("world-gap")
    assert spec.model == "world-clip-gap" and spec.config.is_file() and BUILTIN_SPECS["world-gap"].endswith(
        "world-clip-gap.safetensors")
    enc = load_encoder("world-gap", "cpu")
    assert enc.dim == 128 and enc.context_length == 32
    assert float(enc.model.logit_scale.exp()) == pytest.approx(300, rel=1e-3)  # trained at a fixed scale of 300


def test_world_gap_has_real_clips_gap_and_retrieves(held_out) -> None:
    gap = _measure("world-gap", held_out)
    assert gap["gap"] > 0.6, gap  # real CLIP ViT-B/32: ~0.8
    assert gap["i2t_top1"] >= 0.9 and gap["t2i_top1"] >= 0.9, gap  # 0.98 and 0.98 when shipped; chance ~0.003
    assert gap["pair_cos"] < 0.8, gap  # matched pairs are far from identical, as with real CLIP
    plain = _measure("world", held_out)  # the first world CLIP, for contrast: almost no gap
    assert plain["gap"] < 0.2 and plain["i2t_top1"] >= 0.9, plain
