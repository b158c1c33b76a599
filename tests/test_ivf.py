"""The in-process IVF (decapflow.bank.ivf): recall against the exact top-k, padding, one index per bank version
(saved, reloaded, rebuilt, centroids reused), and topk / fused retrieval through it in a Captioner."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from decapflow.bank import ivf as ivf_module
from decapflow.bank.ivf import IvfIndex
from decapflow.bank.memory import Registry
from decapflow.bank.rows import BF16Rows
from decapflow.caption import captioner as captioner_module
from decapflow.caption.captioner import Captioner, Options
from decapflow.caption.projection import nearest, project_subset
from decapflow.decoder.model import build_decoder
from decapflow.decoder.vocab import Vocab


def clustered(rows: int, dim: int = 32, centres: int = 60, seed: int = 0, spread: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim)).astype(np.float32)
    x = middle[rng.integers(0, centres, rows)] + spread * rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(rows: np.ndarray, count: int, seed: int = 1, noise: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = rows[rng.integers(0, len(rows), count)] + noise * rng.standard_normal((count, rows.shape[1])).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def test_recall_against_exact_top_k(tmp_path: Path) -> None:
    rows = clustered(20_000)
    index = IvfIndex.write(tmp_path / "ivf", rows, "float32")
    assert index.partitions == 141 and len(index) == 20_000  # sqrt(rows)
    assert sorted(np.asarray(index.ids).tolist()) == list(range(20_000))  # every row once
    queries = near(rows, 64)
    exact, exact_scores = nearest(queries, rows, k=32)
    ids, scores = index.search(queries, 32)
    assert recall(ids, exact) >= 0.99
    assert (np.diff(scores, axis=1) <= 0).all()  # nearest first
    np.testing.assert_allclose(scores, np.einsum("bkd,bd->bk", rows[ids], queries), atol=1e-5)
    assert recall(index.search(queries, 32, nprobes=1)[0], exact) < recall(ids, exact)
    every, _ = index.search(queries, 32, nprobes=index.partitions)  # every partition: the exact top-k
    assert recall(every, exact) == 1.0
    one, _ = index.search(queries, 32, threads=1)
    assert (one == ids).all() and (index.search(queries[3], 32)[0] == ids[3]).all()  # threads, a single [D] query


def test_padding_when_the_probes_hold_fewer_rows(tmp_path: Path) -> None:
    rows = clustered(2_000, centres=4)
    index = IvfIndex.write(tmp_path / "ivf", rows, "float32", partitions=8)
    queries = near(rows, 5)
    ids, scores = index.search(queries, 1_500, nprobes=1)
    probed = index.sizes[index.probes(queries, 1)[:, 0]]
    for row, score, size in zip(ids, scores, probed, strict=True):
        assert (row[:size] >= 0).all() and (row[size:] == -1).all()
        assert np.isfinite(score[:size]).all() and np.isneginf(score[size:]).all()
    many, _ = index.search(queries, 5_000, nprobes=8)  # more than the bank
    assert ((many >= 0).sum(axis=1) == 2_000).all()


def test_bfloat16_rows_find_the_same_neighbours(tmp_path: Path) -> None:
    rows = clustered(5_000)
    half = BF16Rows(BF16Rows.encode(rows))
    queries = near(rows, 16)
    a, _ = IvfIndex.write(tmp_path / "f32", rows, "float32").search(queries, 16)
    b, _ = IvfIndex.write(tmp_path / "bf16", half, "bfloat16").search(queries, 16)
    assert recall(b, a) >= 0.97  # same centroids from the same seed; the rows rounded to bfloat16


def add_rows(bank, vectors: np.ndarray, start: int) -> None:
    n = len(vectors)
    bank.add([f"h{i}" for i in range(start, start + n)], [f"s{i}" for i in range(start, start + n)], vectors, "x",
             datetime.now(timezone.utc))


def test_one_index_per_bank_version(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = clustered(6_000)
    bank = Registry().create("b", "e", 32)
    add_rows(bank, rows[:4_000], 0)
    assert not bank.has_ivf() and bank.ivf(build=False) is None
    index = bank.ivf()  # built on first use, beside the version's local copy
    folder = bank.ivf_folder()
    assert folder.parent.name == f"v{bank.version}" and (folder / "rows.npy").exists() and bank.has_ivf()
    assert bank.ivf() is index  # loaded once per process
    queries = near(rows[:4_000], 8)
    reloaded = IvfIndex.load(folder)
    assert (reloaded.search(queries, 10)[0] == index.search(queries, 10)[0]).all()
    assert not list(folder.parent.glob(".tmp-*"))  # written under a temporary name, renamed

    half = bank.build_ivf("bfloat16")  # the same index, its rows added in the other precision
    assert bank.has_ivf("bfloat16") and (half.centroids == index.centroids).all()

    first = bank.version
    add_rows(bank, rows[4_000:], 4_000)  # a new version: no index yet
    newer = Registry().open("b")
    assert newer.version > first and not newer.has_ivf()
    grown = newer.build_ivf()
    assert grown.meta["centroids_from_version"] == first and grown.meta["trained_rows"] == 4_000
    assert (grown.centroids == index.centroids).all() and len(grown) == 6_000  # reused, every row assigned
    queries = near(rows, 32)
    assert recall(grown.search(queries, 10)[0], nearest(queries, rows, k=10)[0]) >= 0.99
    fresh = newer.build_ivf(reuse=False, rebuild=True)
    assert "centroids_from_version" not in fresh.meta and fresh.meta["trained_rows"] == 6_000
    assert newer.ivf() is fresh  # the rebuilt one replaced the loaded one
    monkeypatch.setattr(ivf_module, "REUSE_FACTOR", 1.0001)  # 6001 rows, centroids trained on 6000: too far
    add_rows(newer, clustered(1, seed=9), 6_000)
    assert Registry().open("b").build_ivf().meta["trained_rows"] == 6_001


def tiny_captioner(bank, options: Options) -> Captioner:
    vocab = Vocab.build([320, 1929])  # prefixes only: the decoder never runs
    return Captioner(None, bank, build_decoder("tiny", vocab, prefix_dim=bank.dim), vocab, options)


def test_captioner_topk_through_the_ivf_matches_exact_top_k(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = clustered(6_000)
    bank = Registry().create("big", "e", 32)
    add_rows(bank, rows, 0)
    queries = near(rows, 16)
    options = Options(strategy="topk", k=32, tau=0.05)
    exact_ids, _ = nearest(queries, rows, k=32)
    exact = project_subset(queries, rows, tau=0.05, neighbor_ids=exact_ids).vectors
    monkeypatch.setattr(captioner_module, "ANN_MIN_ROWS", 1_000)

    auto = tiny_captioner(bank, Options(k=32, tau=0.05))  # auto runs topk on banks this big
    monkeypatch.setattr(captioner_module, "TOPK_MIN_ROWS", 1_000)
    assert auto.strategy == "topk" and not auto.resolved().uses_index()
    assert "'decapflow memory index big' makes it faster" in auto.auto_reason()
    auto.prefixes(queries)
    assert not bank.has_ivf()  # auto never builds an index

    captioner = tiny_captioner(bank, options)
    assert captioner.uses_index()
    prefixes, support = captioner.prefixes(queries)
    assert bank.has_ivf() and not bank.has_index()
    assert ((prefixes * exact).sum(axis=1) > 0.9999).all()
    assert all(s and s[0][0].startswith("s") for s in support)
    assert auto.resolved().uses_index() and "by its ANN index" in auto.auto_reason()  # now auto uses it
    assert ((auto.prefixes(queries)[0] * exact).sum(axis=1) > 0.9999).all()
