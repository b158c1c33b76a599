"""The DeCap decoder model: configs, shapes, KV cache, greedy and beam generation, the compact vocabulary."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from decapflow.decoder.model import DeCapDecoder, DecoderConfig, build_decoder, list_configs, load_config
from decapflow.decoder.vocab import END_ID, START_ID, Vocab, tokenize

TEXTS = ["A dog runs on the beach.", "Two cats sleep on a red sofa!", "a man rides a bike"]


def random_decoder(vocab_size: int = 50, prefix_dim: int = 16, std: float = 0.5, seed: int = 0) -> DeCapDecoder:
    """A tiny decoder with large random weights, so greedy/beam paths are long and varied (not all <start>)."""
    torch.manual_seed(seed)
    config = replace(load_config("tiny"), n_layer=2, prefix_dim=prefix_dim, vocab_size=vocab_size,
                     start_id=0, end_id=1)
    model = DeCapDecoder(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def unit(n: int, d: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_bundled_configs_are_data() -> None:
    assert {"decap-base", "decap-small", "tiny"} <= set(list_configs())
    base = load_config("decap-base")
    assert (base.n_layer, base.n_head, base.n_embd) == (4, 4, 768)
    assert load_config("tiny", prefix_dim=32).prefix_dim == 32
    with pytest.raises(ValueError, match="decap-small"):
        load_config("no-such-config")


def test_config_json_round_trip_and_file(tmp_path) -> None:
    config = DecoderConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=10, start_id=8, end_id=9)
    assert DecoderConfig.from_json(config.to_json()) == config
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"_note": "comment", "n_layer": 3, "n_head": 1, "n_embd": 4}))
    assert load_config(path).n_layer == 3
    with pytest.raises(ValueError, match="unknown decoder config keys"):
        DecoderConfig.from_json('{"n_layers": 3}')
    with pytest.raises(ValueError, match="multiple of n_head"):
        DecoderConfig(n_embd=10, n_head=3)


def test_forward_shapes() -> None:
    model = random_decoder()
    ids = torch.randint(0, 50, (3, 7))
    assert model(unit(3), ids).shape == (3, 8, 50)  # prefix + 7 tokens
    assert model(None, ids).shape == (3, 7, 50)
    assert model(unit(3), None).shape == (3, 1, 50)
    with pytest.raises(ValueError, match="block_size"):
        model(unit(1), torch.zeros(1, 40, dtype=torch.long))


def test_kv_cache_steps_equal_full_forward() -> None:
    model = random_decoder()
    prefix, ids = unit(2), torch.randint(0, 50, (2, 9))
    full = model(prefix, ids)  # [2, 10, V]
    cache = model.new_cache(2)
    steps = [model(prefix, ids[:, :3], cache)]  # prefill: prefix + 3 tokens
    steps += [model(None, ids[:, i : i + 1], cache) for i in range(3, 7)]
    steps.append(model(None, ids[:, 7:], cache))  # two new tokens after cached ones (masked attention)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert model.new_cache(2, 12).k.shape[3] == 12  # generation allocates max_len + 2, not block_size


def test_greedy_with_cache_equals_full_rerun() -> None:
    model = random_decoder()
    prefix = unit(6)
    cached = model.generate(prefix, max_len=20)
    assert cached == model.generate(prefix, max_len=20, use_cache=False)
    assert any(len(row) > 3 for row in cached)  # the random model produces real paths


def test_beam_one_equals_greedy() -> None:
    model = random_decoder(seed=3)
    prefix = unit(5, seed=4)
    assert model.generate(prefix, max_len=15, beam=1) == model.generate(prefix, max_len=15, beam=1, use_cache=False)
    assert model._beam_search(prefix, 15, 1, 1.0, None, model.prefix_len(None)) == model.generate(prefix, max_len=15)


def test_beam_respects_max_len_end_and_batch_independence() -> None:
    model = random_decoder(seed=10)  # a seed whose random paths hit <end> early in some rows
    prefix = unit(6, seed=6)
    rows = model.generate(prefix, max_len=12, beam=4)
    assert len(rows) == 6
    assert all(len(r) <= 12 and model.config.end_id not in r for r in rows)
    one_by_one = [model.generate(prefix[i : i + 1], max_len=12, beam=4)[0] for i in range(6)]
    assert rows == one_by_one
    greedy = model.generate(prefix, max_len=12)
    assert all(model.config.end_id not in r for r in greedy)
    assert any(len(r) < 12 for r in rows) and any(len(r) < 12 for r in greedy)  # some rows stopped at <end>


def test_beam_finds_higher_likelihood_than_greedy_on_average() -> None:
    model = random_decoder(seed=7, std=0.3)
    prefix = unit(8, seed=8)

    @torch.no_grad()
    def logprob(rows: list[list[int]]) -> float:
        total = 0.0
        for i, row in enumerate(rows):
            ids = torch.tensor([[0, *row, 1]])
            logp = model(prefix[i : i + 1], ids[:, :-1])[0, 1:].log_softmax(-1)
            total += float(logp.gather(1, ids[0, 1:, None]).sum())
        return total

    greedy, beam = model.generate(prefix, max_len=10), model.generate(prefix, max_len=10, beam=5, length_penalty=0.0)
    assert logprob(beam) >= logprob(greedy) - 1e-4


def test_generate_validates_inputs() -> None:
    model = random_decoder()
    with pytest.raises(ValueError, match="prefix must be"):
        model.generate(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="block_size"):
        model.generate(unit(1), max_len=39)
    assert model.training is False
    model.train()
    model.generate(unit(1), max_len=3)
    assert model.training is True  # generation restores the mode


def test_vocab_compaction_round_trip() -> None:
    rows = tokenize(TEXTS)
    assert rows[0][0] == START_ID and rows[0][-1] == END_ID
    vocab = Vocab.build(np.concatenate(rows))
    assert len(vocab) == len({t for r in rows for t in r})
    assert vocab.clip_ids == sorted(vocab.clip_ids)
    for text in TEXTS:
        ids = vocab.encode(text)
        assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id and max(ids) < len(vocab)
        assert vocab.decode(ids) == " ".join(text.lower().split())
    assert vocab.decode(vocab.encode(TEXTS[0])[:-1] + [vocab.end_id, vocab.start_id]) == "a dog runs on the beach."
    assert Vocab.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    with pytest.raises(ValueError, match="never trained on"):
        vocab.encode("quantum chromodynamics")


def test_tokenize_cuts_like_official_code() -> None:
    long = " ".join(["dog"] * 30)
    row = tokenize([long], max_tokens=20)[0]
    assert len(row) == 20 and row[0] == START_ID and END_ID not in row
    assert tokenize(["a dog"], max_tokens=20)[0][-1] == END_ID


def test_identity_vocab_drops_padding_only_when_asked() -> None:
    identity = Vocab.identity()
    assert identity.is_identity and len(identity) == 49408 and identity.start_id == START_ID
    ids = tokenize(["hello world"])[0]
    assert identity.decode(ids + [0, 0]) == "hello world"  # after <end>: ignored
    assert Vocab.identity(drop_clip_ids=(0,)).decode([320, 0, 0, 1929]) == "a dog"
    assert Vocab.from_dict(identity.to_dict()).is_identity


def test_decode_texts_and_build_decoder() -> None:
    vocab = Vocab.build(np.concatenate(tokenize(TEXTS)))
    model = build_decoder("tiny", vocab, prefix_dim=16)
    assert model.config.vocab_size == len(vocab) and model.config.end_id == vocab.end_id
    texts = model.decode_texts(unit(3).numpy(), vocab, max_len=5, batch_size=2)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
