from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from decapflow.encoders import (
    BUILTIN_SPECS,
    EncoderUnavailable,
    load_encoder,
    parse_spec,
)

TEXTS = [
    "a dog",
    "a man riding a red bicycle down a busy city street next to parked cars",
    "two cats sleeping on a sofa",
    "a very long sentence " + "with many many words " * 30,
    "pizza",
]


def test_parse_spec_forms(tmp_path: Path) -> None:
    s = parse_spec("ViT-B-32:openai")
    assert (s.model, s.pretrained, s.config) == ("ViT-B-32", "openai", None)
    assert parse_spec("ViT-L-14:random").pretrained is None
    hub = parse_spec("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert hub.model == "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K" and hub.pretrained is None
    local = parse_spec(f"{tmp_path}/my-clip.json:{tmp_path}/w.safetensors")
    assert local.model == "my-clip" and local.config == tmp_path / "my-clip.json"
    assert local.pretrained == f"{tmp_path}/w.safetensors"
    world = parse_spec("world")
    assert world.raw == "world" and world.model == "world-clip"
    assert BUILTIN_SPECS["world"].endswith("world-clip.safetensors")
    for bad in ("ViT-B-32", ":openai", "x.json"):
        with pytest.raises(EncoderUnavailable):
            parse_spec(bad)


def test_text_embeddings_unit_and_equal_to_full_context(tiny_encoder_spec: str) -> None:
    enc = load_encoder(tiny_encoder_spec, "cpu")
    assert enc.dim == 32 and enc.context_length == 77
    got = enc.encode_text(TEXTS, batch_size=2)
    assert got.shape == (len(TEXTS), 32) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():  # the bare open_clip way: every sentence padded to 77 tokens
        bare = F.normalize(enc.model.encode_text(enc.tokenizer(TEXTS)), dim=-1).numpy()
    np.testing.assert_allclose(got, bare, atol=1e-5)


def test_tokenize_counts_truncation_and_matches_open_clip(tiny_encoder_spec: str) -> None:
    enc = load_encoder(tiny_encoder_spec, "cpu")
    ids, truncated = enc.tokenize(TEXTS)
    assert truncated == 1
    assert len(ids[3]) == 77 and ids[3][-1] == 49407 and ids[0][0] == 49406
    reference = enc.tokenizer(TEXTS).numpy()
    for row, ref in zip(ids, reference, strict=True):
        assert row == ref[: len(row)].tolist() and not ref[len(row):].any()


def test_encoder_loaded_once_per_process(tiny_encoder_spec: str) -> None:
    assert load_encoder(tiny_encoder_spec, "cpu") is load_encoder(tiny_encoder_spec, "cpu")


def test_random_weights_are_deterministic(tiny_clip_config: Path) -> None:
    from decapflow.encoders import Encoder

    a = Encoder(f"{tiny_clip_config}:random", "cpu").encode_text(["a red circle"])
    b = Encoder(f"{tiny_clip_config}:random", "cpu").encode_text(["a red circle"])
    np.testing.assert_array_equal(a, b)


def test_image_embeddings(tiny_encoder_spec: str) -> None:
    enc = load_encoder(tiny_encoder_spec, "cpu")
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue", "green")]
    got = enc.encode_image(images, batch_size=2)
    assert got.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(got[0], got[1])


def test_local_checkpoint_loads_offline(tmp_path: Path, tiny_encoder_spec: str, tiny_clip_config: Path) -> None:
    from safetensors.torch import save_file

    from decapflow.encoders import Encoder

    source = load_encoder(tiny_encoder_spec, "cpu")
    state = {k: v.clone() + 0.01 for k, v in source.model.state_dict().items()}  # different from seed-0 init
    weights = tmp_path / "weights.safetensors"
    save_file(state, str(weights))
    enc = Encoder(f"{tiny_clip_config}:{weights}", "cpu")
    for key, value in enc.model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert not np.allclose(enc.encode_text(["a dog"]), source.encode_text(["a dog"]))


def test_offline_pretrained_fails_fast_with_a_hint() -> None:
    from decapflow.encoders import Encoder

    start = time.perf_counter()
    with pytest.raises(EncoderUnavailable) as err:
        Encoder("RN50:openai", "cpu")
    assert time.perf_counter() - start < 30
    message = str(err.value)
    assert "RN50:openai" in message and "MODEL.json:" in message and "world" in message


def test_bad_specs_are_clear(tmp_path: Path, tiny_clip_config: Path) -> None:
    from decapflow.encoders import Encoder

    with pytest.raises(EncoderUnavailable, match="unknown open_clip model"):
        Encoder("NoSuchNet-9:openai", "cpu")
    with pytest.raises(EncoderUnavailable, match="do not exist"):
        Encoder(f"{tiny_clip_config}:{tmp_path}/missing.safetensors", "cpu")
    with pytest.raises(EncoderUnavailable, match="does not exist"):
        Encoder(f"{tmp_path}/nope.json:random", "cpu")
