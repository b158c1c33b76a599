"""Decoder checkpoints: save/load, the per-bank registry, official DeCap import/export."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from decapflow.decoder.checkpoint import (
    current_decoder,
    export_official,
    import_official,
    list_decoders,
    load_decoder,
    register,
    save_decoder,
    set_current,
)
from decapflow.decoder.model import DeCapDecoder, build_decoder, load_config
from decapflow.decoder.vocab import Vocab, tokenize


@pytest.fixture
def decoder() -> tuple[DeCapDecoder, Vocab]:
    vocab = Vocab.build(np.concatenate(tokenize(["a dog runs on the beach.", "two cats sleep"])))
    torch.manual_seed(0)
    model = build_decoder("tiny", vocab, prefix_dim=16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval(), vocab


def logits(model: DeCapDecoder, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.nn.functional.normalize(torch.randn(2, model.config.prefix_dim, generator=g), dim=-1)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=g)
    with torch.no_grad():
        return model(prefix, ids)


def test_save_load_round_trip(tmp_path: Path, decoder) -> None:
    model, vocab = decoder
    folder = save_decoder(tmp_path / "ckpt", model, vocab, {"bank": "coco", "encoder": "ViT-B-32:openai"})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "meta.json", "model.safetensors", "vocab.json"]
    loaded, loaded_vocab, meta = load_decoder(folder)
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.lm_head.weight is loaded.wte.weight  # still tied
    assert loaded_vocab == vocab and loaded.config == model.config and not loaded.training
    assert meta["bank"] == "coco" and meta["decapflow_version"] and meta["created"].endswith("Z")
    save_decoder(folder, model, vocab, {"bank": "other"})  # overwrite in place
    assert load_decoder(folder)[2]["bank"] == "other" and not list(tmp_path.glob(".*"))
    with pytest.raises(ValueError, match="not a decoder checkpoint"):
        load_decoder(tmp_path)


def test_registry_lists_and_switches_current(tmp_path: Path, decoder, decapflow_home: Path) -> None:
    model, vocab = decoder
    assert list_decoders("coco") == [] and current_decoder("coco") is None
    first = register("coco", save_decoder(tmp_path / "a", model, vocab, {"encoder": "e"}))
    with torch.no_grad():
        model.ln_f.bias.add_(1.0)  # different weights, different id
    second = register("coco", model, vocab, {"encoder": "e"}, make_current=False)
    assert first != second and len(first.split("-")) == 3
    rows = list_decoders("coco")
    assert [r["id"] for r in rows] == [first, second]  # in the order registered
    assert {r["id"]: (r["current"], r["status"]) for r in rows} == {first: (True, "promoted"),
                                                                    second: (False, "challenger")}
    assert all(r["bank"] == "coco" and r["encoder"] == "e" for r in rows)
    # The files live in the store, beside the banks.
    assert current_decoder("coco") == decapflow_home / "banks" / "_decoders" / "coco" / first
    assert load_decoder(current_decoder("coco"))[2]["encoder"] == "e"
    set_current("coco", second)
    assert current_decoder("coco").name == second
    with pytest.raises(ValueError, match="no decoder"):
        set_current("coco", "nope")
    with pytest.raises(ValueError, match="invalid bank name"):
        list_decoders("../etc")


def official_layout_model(n_embd: int = 16, n_layer: int = 2) -> DeCapDecoder:
    config = replace(load_config("tiny"), n_layer=n_layer, n_head=4, n_embd=n_embd, prefix_dim=12,
                     vocab_size=49408, start_id=49406, end_id=49407)
    torch.manual_seed(1)
    model = DeCapDecoder(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def test_official_export_import_round_trip(tmp_path: Path) -> None:
    model = official_layout_model()
    state = export_official(model)
    assert state["decoder.transformer.h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D: [in, out]
    assert state["clip_project.model.0.weight"].shape == (16, 12)
    torch.save(state, tmp_path / "coco_prefix-009.pt")
    imported, vocab, meta = import_official(tmp_path / "coco_prefix-009.pt", n_head=4)
    assert vocab.is_identity and meta["source"] == "official-decap"
    torch.testing.assert_close(logits(imported), logits(model), atol=1e-6, rtol=1e-6)
    torch.save({"wrong": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an official DeCap checkpoint"):
        import_official(tmp_path / "bad.pt")


@pytest.mark.slow  # importing transformers takes ~5 s
def test_official_import_matches_transformers_gpt2(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=49408, n_positions=40, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    clip_project = torch.nn.Sequential(torch.nn.Linear(12, 32))  # official MLP((512, 768)) is one Linear
    state = {f"decoder.{k}": v for k, v in gpt.state_dict().items()}
    state.update({f"clip_project.model.{k}": v for k, v in clip_project.state_dict().items()})
    torch.save(state, tmp_path / "official.pt")
    model, vocab, _ = import_official(tmp_path / "official.pt", n_head=4)
    assert (model.config.n_embd, model.config.n_layer, model.config.block_size) == (32, 2, 40)

    prefix = torch.nn.functional.normalize(torch.randn(3, 12), dim=-1)
    ids = torch.tensor([[49406, 320, 1929, 5586, 49407]] * 3)
    with torch.no_grad():  # the official forward: cat(clip_project(v).reshape(-1, 1, E), wte(ids))
        embeds = torch.cat([clip_project(prefix).reshape(-1, 1, 32), gpt.transformer.wte(ids)], dim=1)
        expected = gpt(inputs_embeds=embeds).logits
        torch.testing.assert_close(model(prefix, ids), expected, atol=1e-5, rtol=1e-5)
    assert json.dumps(vocab.to_dict())  # identity vocabulary serialises compactly
