"""The exact projection on a torch device equals the numpy path over the same bfloat16 rows (CPU here; CUDA when
there is one), in every placement of the bank, and captioners can take either path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from decapflow.bank.rows import BF16Rows
from decapflow.caption import device_projection as dp
from decapflow.caption import projection

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_bank(n: int, d: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def clustered_bank(n: int, d: int, centres: int = 40, seed: int = 1) -> np.ndarray:
    """Rows at cosine ~0.8 to one of ``centres`` random centres (like caption embeddings)."""
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centres, d)))
    return unit(c[rng.integers(0, centres, n)] + 0.75 / np.sqrt(d) * rng.standard_normal((n, d)))


def image_like_queries(bank: np.ndarray, b: int, seed: int = 2) -> np.ndarray:
    """Queries near some bank rows but far from all (cosine ~0.3-0.5, like CLIP images against captions)."""
    rng = np.random.default_rng(seed)
    d = bank.shape[1]
    return unit(bank[rng.integers(0, len(bank), b)] + 2.0 / np.sqrt(d) * rng.standard_normal((b, d)))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(unit(a) * unit(b), axis=1)


def assert_same(got: projection.Projection, want: projection.Projection, min_cos: float = 0.99999) -> float:
    cos = float(cosines(got.vectors, want.vectors).min())
    assert cos >= min_cos, cos
    np.testing.assert_array_equal(got.support_ids, want.support_ids)
    np.testing.assert_allclose(got.support_weights, want.support_weights, rtol=2e-4, atol=1e-6)
    assert got.vectors.dtype == np.float32 and got.support_ids.dtype == np.int64
    assert got.support_weights.dtype == np.float32
    return cos


# ------------------------------------------------------------------------------------------- placement
def test_resident_fits_leaves_the_larger_of_a_floor_and_a_share_free() -> None:
    gib = 1 << 30
    assert dp.resident_fits(6 * gib, free_bytes=70 * gib, total_bytes=80 * gib)  # keeps 8 GiB (10%)
    assert not dp.resident_fits(63 * gib, free_bytes=70 * gib, total_bytes=80 * gib)
    assert dp.resident_fits(62 * gib, free_bytes=70 * gib, total_bytes=80 * gib)
    assert not dp.resident_fits(5 * gib, free_bytes=6 * gib, total_bytes=10 * gib)  # floor of 2 GiB, not 1 GiB
    assert dp.resident_fits(4 * gib, free_bytes=6 * gib, total_bytes=10 * gib)
    assert not dp.resident_fits(4 * gib, 6 * gib, 10 * gib, workspace_bytes=1)  # the workspace counts
    assert dp.resident_fits(5 * gib, 6 * gib, 10 * gib, min_free_bytes=0, free_fraction=0.1)


def test_device_bank_holds_the_bfloat16_rounding_of_a_float_bank_and_reports_where() -> None:
    bank = random_bank(1000, 48)
    resident = dp.DeviceBank(bank, "cpu", chunk_rows=300)
    assert resident.mode == "resident" and resident.nbytes == 1000 * 48 * 2 and len(resident) == 1000
    got = torch.cat([c for _, c in resident.chunks()]).view(torch.int16).numpy()
    np.testing.assert_array_equal(got, BF16Rows.encode(bank).view(np.int16))  # same rounding as the BF16Rows copy
    np.testing.assert_array_equal(torch.from_numpy(bank).to(torch.bfloat16).view(torch.int16).numpy(), got)
    streamed = dp.DeviceBank(bank.astype(np.float16), "cpu", chunk_rows=300, force_stream=True)
    assert streamed.mode == "streamed" and "streamed on cpu" in streamed.placement.describe()
    starts = [s for s, _ in streamed.chunks(256)]
    assert starts == [0, 256, 512, 768]
    assert "resident on cpu" in repr(resident)


def test_a_bfloat16_memmap_is_used_in_place_on_cpu(tmp_path: Path) -> None:
    bits = BF16Rows.encode(random_bank(500, 32))
    path = tmp_path / "rows.u16"
    bits.tofile(path)
    mapped = BF16Rows(np.memmap(path, dtype=np.uint16, mode="r", shape=bits.shape))
    bank = dp.DeviceBank(mapped, "cpu")
    chunk = next(bank.chunks())[1]
    assert chunk.data_ptr() == mapped.bits.ctypes.data  # a view, no copy
    want = projection.project(random_bank(3, 32, seed=5), mapped, n_support=4)
    assert_same(dp.project(random_bank(3, 32, seed=5), bank, n_support=4), want)


def test_bad_banks_and_queries_are_clear_errors() -> None:
    bank = dp.DeviceBank(random_bank(10, 8), "cpu")
    with pytest.raises(ValueError, match="8 dims but queries have 4"):
        dp.project(random_bank(2, 4), bank)
    with pytest.raises(ValueError, match="tau"):
        dp.project(random_bank(2, 8), bank, tau=0.0)
    with pytest.raises(ValueError, match="NaN"):
        dp.project(np.full((1, 8), np.nan, np.float32), bank)
    with pytest.raises(ValueError, match="non-empty"):
        dp.DeviceBank(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="floats"):
        dp.DeviceBank(np.zeros((4, 8), np.int64))
    with pytest.raises(ValueError, match="bfloat16"):
        dp.DeviceBank.from_tensor(torch.zeros(4, 8))


# ------------------------------------------------------------------------------------------- equality on CPU
PLACEMENTS = {
    "resident": {},
    "streamed": {"force_stream": True},
    "streamed-pinned-whole": {"force_stream": True, "pin_whole": True},
}


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("tau", [0.01, 0.001])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_equals_the_numpy_path_over_the_same_bfloat16_rows(kind: str, tau: float, placement: str) -> None:
    make = random_bank if kind == "random" else clustered_bank
    rows = BF16Rows(BF16Rows.encode(make(3001, 64)))  # a row count no chunk size divides
    bank = dp.DeviceBank(rows, "cpu", chunk_rows=512, **PLACEMENTS[placement])
    for batch in (1, 7):
        queries = image_like_queries(rows[:], batch)
        want = projection.project(queries, rows, tau=tau, n_support=5)
        for chunk_rows in (None, 700, 5000):
            got = dp.project(queries, bank, tau=tau, n_support=5, chunk_rows=chunk_rows)
            assert_same(got, want, min_cos=0.9999999)


def test_a_float_bank_projects_like_its_bfloat16_copy_and_support_pads_like_the_numpy_path() -> None:
    bank = clustered_bank(40, 16)
    queries = image_like_queries(bank, 3)
    copy = BF16Rows(BF16Rows.encode(bank))
    device = dp.DeviceBank(bank, "cpu", chunk_rows=16)
    for n_support in (0, 1, 40, 45):  # 45 > rows: id -1 and weight 0 in the unused slots, as on CPU
        got = dp.project(queries, device, tau=0.05, n_support=n_support)
        want = projection.project(queries, copy, tau=0.05, n_support=n_support)
        assert got.support_ids.shape == (3, n_support)
        assert_same(got, want, min_cos=0.9999999)
    padded = dp.project(queries, device, n_support=45)
    assert (padded.support_ids[:, 40:] == -1).all() and (padded.support_weights[:, 40:] == 0).all()
    one = dp.project(queries[0], device, n_support=2)  # a single [D] query
    assert one.vectors.shape == (1, 16)


def test_the_query_is_not_rounded_to_bfloat16() -> None:
    """At tau 0.001 a bfloat16 query moves the weights visibly; the device path matches the float32 query."""
    rows = BF16Rows(BF16Rows.encode(clustered_bank(2000, 128)))
    queries = image_like_queries(rows[:], 8)
    want = projection.project(queries, rows, tau=0.001, n_support=5)
    got = dp.project(queries, dp.DeviceBank(rows, "cpu"), tau=0.001, n_support=5)
    rounded = projection.project(BF16Rows.decode(BF16Rows.encode(queries)), rows, tau=0.001, n_support=5)
    ours = np.abs(got.support_weights - want.support_weights).max()
    theirs = np.abs(rounded.support_weights - want.support_weights).max()
    assert ours < 1e-4 < 1e-3 < theirs, (ours, theirs)


def test_the_float32_product_precision_is_highest_during_the_call_and_restored_after() -> None:
    seen: list[str] = []
    bank = dp.DeviceBank(random_bank(100, 8), "cpu")
    original = torch.mm

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_float32_matmul_precision())
        return original(a, b)

    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "mm", spy)
            dp.project(random_bank(2, 8), bank)
        assert seen and set(seen) == {"highest"}
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(saved)


def test_from_tensor_wraps_rows_already_on_the_device() -> None:
    bank = random_bank(600, 32)
    tensor = torch.from_numpy(bank).to(torch.bfloat16)
    wrapped = dp.DeviceBank.from_tensor(tensor)
    assert wrapped.mode == "resident" and wrapped.rows == 600
    queries = image_like_queries(bank, 4)
    want = projection.project(queries, BF16Rows(BF16Rows.encode(bank)), n_support=3)
    assert_same(dp.project(queries, wrapped, n_support=3), want, min_cos=0.9999999)


# ------------------------------------------------------------------------------------------- BankProjector
def test_bank_projector_picks_numpy_on_cpu_and_builds_one_device_bank_lazily() -> None:
    rows = random_bank(300, 16)
    auto = dp.BankProjector(rows, "cpu")
    assert auto.backend == "numpy"
    auto.project(rows[:2])
    assert not auto.loaded  # numpy never builds a DeviceBank
    forced = dp.BankProjector(rows, "cpu", "torch")
    assert forced.backend == "torch" and not forced.loaded
    got = forced.project(rows[:2], tau=0.02, n_support=3)
    assert forced.loaded and forced.device_bank is forced.device_bank
    want = projection.project(rows[:2], BF16Rows(BF16Rows.encode(rows)), tau=0.02, n_support=3)
    assert_same(got, want, min_cos=0.9999999)
    sub = forced.subset(rows[:50])
    assert sub.backend == "torch" and not sub.loaded and sub.project(rows[:1]).support_ids.max() < 50
    with pytest.raises(ValueError, match="backend"):
        dp.BankProjector(rows, "cpu", "jax")


def test_a_captioner_on_the_torch_path_gives_the_numpy_paths_captions(home: Path) -> None:
    from decapflow.bank.memory import Registry
    from decapflow.caption.captioner import Captioner, Options

    vectors, _ = Registry().open("shapes").vector_cache()
    rng = np.random.default_rng(0)
    queries = unit(np.asarray(vectors)[rng.integers(0, len(vectors), 6)]
                   + 0.3 * rng.standard_normal((6, vectors.shape[1])))
    numpy_half = Captioner.for_bank("shapes", Options(strategy="pd", tau=0.05), precision="bfloat16")
    numpy_full = Captioner.for_bank("shapes", Options(strategy="pd", tau=0.05))
    torch_path = Captioner.for_bank("shapes", Options(strategy="pd", tau=0.05), projector="torch")
    assert numpy_full.projector.backend == "numpy" and torch_path.projector.backend == "torch"
    a, b, c = (x.caption_embeddings(queries) for x in (numpy_half, torch_path, numpy_full))
    assert [x.caption for x in a] == [x.caption for x in b] == [x.caption for x in c]
    assert [[s for s, _ in x.support] for x in a] == [[s for s, _ in x.support] for x in b]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose([w for _, w in x.support], [w for _, w in y.support], atol=2e-4)
    # the rerank candidates pd and pd@TAU go through the same projector
    names = ["pd", "pd@0.2"]
    for p, q in zip(numpy_half.candidate_prefixes(queries, names), torch_path.candidate_prefixes(queries, names),
                    strict=True):
        assert cosines(p, q).min() > 0.99999
    # with_options shares the loaded DeviceBank; a restricted captioner gets its own over its rows
    other = torch_path.with_options(Options(strategy="pd", tau=0.01))
    assert other.projector.device_bank is torch_path.projector.device_bank
    sub = torch_path.restricted([1, 3, 5])
    assert sub.projector is not torch_path.projector and sub.projector.backend == "torch"
    assert sub.caption_embeddings(queries[:2])[0].support[0][0] in {sub.texts[i].as_py() for i in range(3)}
    assert sub.projector.device_bank.rows == 3


# ------------------------------------------------------------------------------------------- CUDA
@CUDA
@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("tau", [0.01, 0.001])
def test_cuda_equals_the_numpy_path(placement: str, batch: int, tau: float) -> None:
    rows = BF16Rows(BF16Rows.encode(clustered_bank(200_003, 128, centres=500)))
    bank = dp.DeviceBank(rows, "cuda", chunk_rows=16_384, **PLACEMENTS[placement])
    assert bank.mode == ("resident" if placement == "resident" else "streamed")
    queries = image_like_queries(rows[:], batch)
    want = projection.project(queries, rows, tau=tau, n_support=5)
    for chunk_rows in (None, 50_000):
        assert_same(dp.project(queries, bank, tau=tau, n_support=5, chunk_rows=chunk_rows), want)


@CUDA
def test_cuda_default_placement_is_resident_for_a_small_bank_and_from_tensor_matches() -> None:
    bank = clustered_bank(50_000, 64)
    device = dp.DeviceBank(bank, "cuda")
    assert device.mode == "resident" and device.placement.free_bytes is not None
    queries = image_like_queries(bank, 16)
    want = projection.project(queries, BF16Rows(BF16Rows.encode(bank)), n_support=5)
    assert_same(dp.project(queries, device, n_support=5), want)
    wrapped = dp.DeviceBank.from_tensor(torch.from_numpy(bank).to("cuda", torch.bfloat16))
    assert_same(dp.project(queries, wrapped, n_support=5), want)
