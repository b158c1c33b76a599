"""Training data read in place: rows picked by index from a memory-mapped bank cache, tokens tokenised once and
memory-mapped from the token cache, other torchrun ranks reading rank 0's tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from decapflow.decoder import vocab as vocab_module
from decapflow.decoder.distributed import Dist
from decapflow.decoder.train import TrainRecipe, train_decoder
from decapflow.decoder.vocab import TextRows, load_tokens, prepare, tokenize, tokenize_cached

TEXTS = [f"a {c} {t} on the {p}" for c in ("red", "blue", "old") for t in ("dog", "cat", "bird") for p in ("bed", "road")]
RECIPE = TrainRecipe(epochs=2, batch_size=4, lr=1e-2, warmup_steps=2, val_fraction=0.2, patience=None,
                     noise_std=0.05, device="cpu", num_threads=1)


def unit_vectors(n: int, d: int = 16) -> np.ndarray:
    v = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_rows_of_a_memmap_train_like_the_copied_rows(tmp_path: Path) -> None:
    vectors = unit_vectors(len(TEXTS)) * 3  # not unit: batches re-normalise
    np.save(tmp_path / "vectors.npy", vectors)
    mapped = np.load(tmp_path / "vectors.npy", mmap_mode="r")
    rows = np.array([i for i in range(len(TEXTS)) if i % 5 != 2])
    column = pa.chunked_array([TEXTS[:7], TEXTS[7:]])  # like a bank cache's text column
    copied = train_decoder([TEXTS[i] for i in rows], vectors[rows], config="tiny", recipe=RECIPE,
                           out_dir=tmp_path / "copied", progress=False)
    in_place = train_decoder(column, mapped, rows=rows, config="tiny", recipe=RECIPE, out_dir=tmp_path / "mapped",
                             progress=False)
    assert in_place.history and [(h["train_loss"], h["val_loss"]) for h in in_place.history] == \
        [(h["train_loss"], h["val_loss"]) for h in copied.history]
    data, _ = prepare(column, mapped, 20, tmp_path / "tok", rows=rows)
    assert data.vectors is mapped and len(data) == len(rows)  # no copy of the vectors


def test_text_rows_read_arrow_and_lists_in_order() -> None:
    rows = np.array([5, 0, 17, 3])
    assert list(TextRows(pa.chunked_array([TEXTS[:10], TEXTS[10:]]), rows)) == [TEXTS[i] for i in rows]
    assert list(TextRows(TEXTS, rows)) == [TEXTS[i] for i in rows] and len(TextRows(TEXTS, rows)) == 4
    assert TEXTS[17] in TextRows(TEXTS, rows) and TEXTS[1] not in TextRows(TEXTS, rows)


def test_token_cache_is_memory_mapped(tmp_path: Path) -> None:
    plain_flat, plain_offsets = tokenize_cached(TEXTS, 20, None)
    tokenize_cached(TEXTS, 20, tmp_path)
    flat, offsets = load_tokens(next(tmp_path.glob("*.npz")))
    assert isinstance(flat, np.memmap) and isinstance(offsets, np.memmap)
    assert np.array_equal(flat, plain_flat) and np.array_equal(offsets, plain_offsets)
    assert flat[offsets[3]:offsets[4]].tolist() == tokenize([TEXTS[3]], 20)[0]


class OtherRank(Dist):
    """Rank 1 of 2, receiving what rank 0 broadcast (no process group)."""

    def __init__(self, sent: object) -> None:
        super().__init__(world=2, rank=1)
        self.sent = sent

    def broadcast(self, value: object) -> object:
        return self.sent


def test_other_ranks_read_rank_0s_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main, _ = prepare(TEXTS, unit_vectors(len(TEXTS)), 20, tmp_path)
    monkeypatch.setattr(vocab_module, "tokenize", lambda *a: pytest.fail("a rank other than 0 tokenised"))
    cached, _ = prepare(TEXTS, unit_vectors(len(TEXTS)), 20, tmp_path, dist=OtherRank((main.key, None)))
    assert isinstance(cached.flat, np.memmap) and np.array_equal(cached.flat, main.flat)
    sent, _ = prepare(TEXTS, unit_vectors(len(TEXTS)), 20, None, dist=OtherRank((main.key, (main.flat, main.offsets))))
    assert sent.key == main.key and np.array_equal(sent.offsets, main.offsets)
