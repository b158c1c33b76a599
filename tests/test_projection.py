"""The projection strategies against their dense, obviously-correct formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decapflow.bank.rows import BF16Rows
from decapflow.caption.projection import (
    STRATEGIES,
    Projection,
    gather_neighbors,
    identity,
    nearest,
    project,
    project_subset,
)
from decapflow.cpu import blas_threads


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def bank() -> np.ndarray:
    """[300, 32] clustered unit rows (8 centres), like caption embeddings."""
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((8, 32)))
    return unit(centres[rng.integers(0, 8, 300)] + 0.3 * rng.standard_normal((300, 32)))


@pytest.fixture
def queries() -> np.ndarray:
    return unit(np.random.default_rng(1).standard_normal((5, 32)))


def dense(V: np.ndarray, M: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference: (normalize(softmax(V M^T / tau) M) [B, D], weights [B, N])."""
    weights = torch.softmax(torch.from_numpy(V).double() @ torch.from_numpy(M).double().T / tau, dim=1)
    out = weights @ torch.from_numpy(M).double()
    return (out / out.norm(dim=1, keepdim=True)).numpy(), weights.numpy()


def test_strategies_and_result_type(queries, bank):
    assert STRATEGIES == ("pd", "topk", "nnd", "vd", "clipre", "ms", "rerank", "fused")
    result = project(queries, bank)
    assert isinstance(result, Projection)
    assert result.vectors.shape == (5, 32) and result.vectors.dtype == np.float32
    assert result.support_ids.shape == (5, 5) and result.support_ids.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 100, 299, 300, 1000, None])
@pytest.mark.parametrize("tau", [0.1, 0.01])
def test_project_equals_dense_for_any_chunking(queries, bank, chunk_rows, tau):
    expected, _ = dense(queries, bank, tau)
    np.testing.assert_allclose(project(queries, bank, tau, chunk_rows=chunk_rows).vectors, expected, atol=1e-5)


@pytest.mark.parametrize(("tau", "atol"), [(1e-3, 1e-5), (1e-4, 1e-4)])
def test_tiny_tau_is_stable(queries, bank, tau, atol):
    """No overflow however sharp the softmax; at tau = 1e-4 float32 scores (error ~1e-7, times 1/tau) limit
    the agreement with a float64 reference to ~1e-4, whatever the implementation."""
    result = project(queries, bank, tau, chunk_rows=37)
    assert np.isfinite(result.vectors).all() and np.isfinite(result.support_weights).all()
    expected, _ = dense(queries, bank, tau)
    np.testing.assert_allclose(result.vectors, expected, atol=atol)
    ids, _ = nearest(queries, bank, k=1)
    np.testing.assert_array_equal(result.support_ids[:, 0], ids[:, 0])  # the heaviest row is the nearest


def test_single_query_vector(queries, bank):
    one = project(queries[0], bank, chunk_rows=50)
    np.testing.assert_allclose(one.vectors, project(queries[:1], bank).vectors, atol=1e-6)
    assert one.vectors.shape == (1, 32)


def test_support_rows_are_the_heaviest_rows(queries, bank):
    result = project(queries, bank, 0.05, chunk_rows=23, n_support=6)
    _, weights = dense(queries, bank, 0.05)
    expected_ids = np.argsort(-weights, axis=1)[:, :6]
    np.testing.assert_array_equal(result.support_ids, expected_ids)
    np.testing.assert_allclose(result.support_weights, np.take_along_axis(weights, expected_ids, 1), atol=1e-6)
    assert (np.diff(result.support_weights, axis=1) <= 0).all()


def test_more_support_than_rows_is_padded(queries, bank):
    result = project(queries, bank[:3], n_support=5)
    assert (result.support_ids[:, 3:] == -1).all() and (result.support_weights[:, 3:] == 0).all()
    np.testing.assert_allclose(result.support_weights.sum(axis=1), 1.0, atol=1e-5)


def test_memmap_and_float16_and_torch_inputs(tmp_path, queries, bank):
    path = tmp_path / "bank.npy"
    np.save(path, bank)
    mapped = np.load(path, mmap_mode="r")  # read-only memmap
    reference = project(queries, bank, chunk_rows=64)
    np.testing.assert_allclose(project(queries, mapped, chunk_rows=64).vectors, reference.vectors, atol=1e-6)
    half = bank.astype(np.float16)
    expected, _ = dense(queries, half.astype(np.float32), 0.01)
    np.testing.assert_allclose(project(queries, half, chunk_rows=64).vectors, expected, atol=1e-5)
    from_torch = project(torch.from_numpy(queries), torch.from_numpy(bank), chunk_rows=64)
    np.testing.assert_allclose(from_torch.vectors, reference.vectors, atol=1e-6)


def test_project_subset_with_all_rows_equals_project(queries, bank):
    full = project(queries, bank, 0.02)
    rng = np.random.default_rng(2)
    ids = np.stack([rng.permutation(len(bank)) for _ in range(len(queries))])  # every row, shuffled
    subset = project_subset(queries, bank, 0.02, neighbor_ids=ids)
    np.testing.assert_allclose(subset.vectors, full.vectors, atol=1e-5)
    np.testing.assert_array_equal(subset.support_ids, full.support_ids)
    np.testing.assert_allclose(subset.support_weights, full.support_weights, atol=1e-6)


def test_project_subset_on_gathered_vectors_and_padding(queries, bank):
    ids, _ = nearest(queries, bank, k=10)
    by_ids = project_subset(queries, bank, neighbor_ids=ids)
    by_vectors = project_subset(queries, gather_neighbors(bank, ids))  # [B, k, D]; support = positions
    np.testing.assert_allclose(by_vectors.vectors, by_ids.vectors, atol=1e-6)
    np.testing.assert_array_equal(np.take_along_axis(ids, by_vectors.support_ids, 1), by_ids.support_ids)
    padded = np.concatenate([ids, -np.ones((len(ids), 3), dtype=np.int64)], axis=1)  # ANN found fewer
    np.testing.assert_allclose(project_subset(queries, bank, neighbor_ids=padded).vectors, by_ids.vectors, atol=1e-6)
    few = project_subset(queries, bank, neighbor_ids=padded[:, [0, 1, 11, 12]], n_support=4)
    assert (few.support_ids[:, 2:] == -1).all() and (few.support_weights[:, 2:] == 0).all()


@pytest.mark.parametrize("chunk_rows", [1, 13, 128, None])
def test_nearest_matches_argsort(queries, bank, chunk_rows):
    ids, sims = nearest(queries, bank, k=4, chunk_rows=chunk_rows)
    scores = queries @ bank.T
    np.testing.assert_array_equal(ids, np.argsort(-scores, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(sims, np.take_along_axis(scores, ids, 1), atol=1e-6)
    all_ids, _ = nearest(queries, bank[:3], k=10)
    assert all_ids.shape == (5, 3)


def test_identity_renormalises(queries):
    np.testing.assert_allclose(identity(3.0 * queries), queries, atol=1e-6)


def test_bad_inputs_raise_clear_errors(queries, bank):
    with pytest.raises(ValueError, match="dims"):
        project(queries, bank[:, :16])
    with pytest.raises(ValueError, match="tau"):
        project(queries, bank, tau=0.0)
    with pytest.raises(ValueError, match="NaN"):
        project(np.full((1, 32), np.nan, np.float32), bank)
    with pytest.raises(ValueError, match="out of range"):
        project_subset(queries, bank, neighbor_ids=np.full((5, 2), 999))
    with pytest.raises(ValueError, match="no neighbours"):
        project_subset(queries, bank, neighbor_ids=np.full((5, 2), -1))


def test_blas_threads_follow_torch_and_are_restored():
    from threadpoolctl import threadpool_info

    def blas() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    assert blas(), "numpy's BLAS is seen by threadpoolctl"
    before, torch_threads = blas(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with blas_threads():
            assert set(blas()) == {1}
            with blas_threads(2):
                assert set(blas()) == {2}
            assert set(blas()) == {1}
        assert blas() == before
    finally:
        torch.set_num_threads(torch_threads)


def test_bfloat16_bank_keeps_results(queries, bank):
    """A bfloat16 copy (half the bytes) gives the float32 bank's projection up to the rounding of its rows."""
    bits = BF16Rows.encode(bank)
    assert bits.dtype == np.uint16 and bits.shape == bank.shape
    rows = BF16Rows(bits)
    np.testing.assert_allclose(rows[:], bank, atol=2e-3)  # 8 significant bits
    assert rows[[3, 7]].shape == (2, 32) and rows[5].shape == (32,) and len(rows) == 300
    exact = project(queries, bank, tau=0.01)
    for chunk_rows in (7, 64, None):
        half = project(queries, rows, tau=0.01, chunk_rows=chunk_rows)
        assert (half.vectors * exact.vectors).sum(axis=1).min() > 0.999  # 32-d; more dims average the rounding out
        np.testing.assert_allclose(half.support_weights.sum(axis=1), exact.support_weights.sum(axis=1), atol=0.05)
    best_ids, best = nearest(queries, bank, k=1)
    half_ids, _ = nearest(queries, rows, k=1)  # may pick a near-tie: its true similarity is within the rounding
    assert (best[:, 0] - (bank[half_ids[:, 0]] * queries).sum(axis=1)).max() < 4e-3
    ids = nearest(queries, bank, k=16)[0]
    np.testing.assert_allclose(gather_neighbors(rows, ids), bank[ids], atol=2e-3)
    with pytest.raises(ValueError, match="uint16"):
        BF16Rows(bank)
