"""The micro-batcher and the captioner pool, without HTTP."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from decapflow.bank.ingest import run_ingest
from decapflow.bank.memory import UnknownBank
from decapflow.decoder.checkpoint import NoDecoder, UnknownDecoder, current_meta
from decapflow.serve.batcher import MicroBatcher, QueueFull
from decapflow.serve.pool import CaptionerPool


def run_batcher(calls: list[tuple[str, list[int]]], **kwargs: object) -> tuple[list, list[list[int]]]:
    """Submit every call, one after another without waiting; returns (results per call, the batches seen).

    The first batch is held until every call is queued, as when a batch runs while requests arrive."""
    seen: list[list[int]] = []

    async def main() -> list:
        release = asyncio.Event()

        async def run(key: str, items: list[int]) -> list[str]:
            await release.wait()
            seen.append(list(items))
            return [f"{key}:{i * 10}" for i in items]

        batcher = MicroBatcher(run, **kwargs)
        tasks = [asyncio.create_task(batcher.submit(*calls[0]))]
        await asyncio.sleep(0.02)  # the first call's batch is running (held in run)
        tasks += [asyncio.create_task(batcher.submit(key, items)) for key, items in calls[1:]]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.close()
        return results

    return asyncio.run(main()), seen


def test_concurrent_items_share_batches_up_to_max_batch() -> None:
    calls = [("a", [i]) for i in range(10)]
    results, seen = run_batcher(calls, max_batch=4, max_wait_ms=1, arriving=lambda: 0)
    assert [r[0][0] for r in results] == [f"a:{i * 10}" for i in range(10)]  # every caller gets its own answer
    assert seen == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]  # the rest queued behind the first batch
    assert [r[0][1].size for r in results] == [1, 4, 4, 4, 4, 4, 4, 4, 4, 1]


def test_a_batch_waits_for_arriving_requests_only() -> None:
    async def main(arriving: int) -> list[int]:
        sizes: list[int] = []

        async def run(key: str, items: list[int]) -> list[int]:
            sizes.append(len(items))
            return items

        batcher = MicroBatcher(run, max_batch=8, max_wait_ms=200, arriving=lambda: arriving)
        first = asyncio.create_task(batcher.submit("a", [1]))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit("a", [2]))
        await asyncio.gather(first, second)
        await batcher.close()
        return sizes

    assert asyncio.run(main(arriving=1)) == [2]  # waited up to 200 ms and caught the second one
    assert asyncio.run(main(arriving=0)) == [1, 1]  # nothing on the way: the lone request ran at once


def test_keys_never_mix_and_a_multi_image_call_keeps_its_order() -> None:
    results, seen = run_batcher([("a", [1, 2, 3]), ("b", [4]), ("a", [5])], max_batch=8, max_wait_ms=20)
    assert [x for x, _ in results[0]] == ["a:10", "a:20", "a:30"] and results[1][0][0] == "b:40"
    assert seen == [[1, 2, 3], [4], [5]]


def test_max_batch_one_runs_alone() -> None:
    _, seen = run_batcher([("a", [i]) for i in range(5)], max_batch=1, max_wait_ms=50)
    assert seen == [[0], [1], [2], [3], [4]]


def test_failures_reach_only_their_callers_and_the_worker_goes_on() -> None:
    async def run(key: str, items: list[int]) -> list[object]:
        if key == "bad":
            raise UnknownBank("gone")
        return [ValueError(f"item {i}") if i < 0 else i for i in items]  # one item alone can fail

    async def main() -> tuple:
        batcher = MicroBatcher(run, max_batch=4, max_wait_ms=1)
        bad = await batcher.submit("bad", [1, 2])
        mixed = await batcher.submit("good", [7, -1, 8])
        again = await batcher.submit("good", [9])
        await batcher.close()
        return bad, mixed, again

    bad, mixed, again = asyncio.run(main())
    assert all(isinstance(r, UnknownBank) for r in bad)
    assert mixed[0][0] == 7 and isinstance(mixed[1], ValueError) and mixed[2][0] == 8 and again[0][0] == 9


def test_queue_limit_refuses_instead_of_growing() -> None:
    results, _ = run_batcher([("a", [1]), ("a", [2, 3, 4]), ("a", [5, 6])], max_batch=1, max_queue=4,
                             max_wait_ms=1)
    assert [x for x, _ in results[1]] == ["a:20", "a:30", "a:40"]
    assert isinstance(results[2], QueueFull)  # 3 waiting + 2 > 4


def test_idle_workers_exit() -> None:
    async def echo(key: str, items: list[int]) -> list[int]:
        return items

    async def main() -> int:
        batcher = MicroBatcher(echo, idle_s=0.05)
        await batcher.submit("a", [1])
        await asyncio.sleep(0.2)
        left = len(batcher._workers)
        assert (await batcher.submit("a", [2]))[0][0] == 2  # a new worker starts on demand
        await batcher.close()
        return left

    assert asyncio.run(main()) == 0


def test_pool_shares_encoders_evicts_banks_and_names_its_errors(trained_home: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 tiny_encoder_spec: str) -> None:
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    monkeypatch.setenv("DECAPFLOW_HOME", str(home))
    corpus = tmp_path / "c.txt"
    corpus.write_text("a cat\na dog\n")
    run_ingest(corpus, "pets", tiny_encoder_spec)
    pool = CaptionerPool(max_banks=1)
    shapes = pool.captioner("shapes")
    assert shapes.decoder_id == current_meta("shapes")["id"] and pool.captioner("shapes") is shapes
    assert pool.encoder("pets") is shapes.encoder  # one CLIP for banks with the same encoder
    with pytest.raises(NoDecoder, match="decapflow train --memory pets"):
        pool.captioner("pets")
    pets = pool.captioner("pets", needs_decoder=False)
    assert pets.options.strategy == "clipre"
    assert [row["bank"] for row in pool.loaded()] == ["pets"]  # max_banks=1: shapes was evicted
    borrowed = pool.captioner("pets", decoder=f"shapes/{shapes.decoder_id}")  # a decoder of another bank
    assert borrowed.decoder_id == shapes.decoder_id
    assert pool.captioner("pets", decoder=shapes.decoder_id).decoder_id == shapes.decoder_id
    with pytest.raises(UnknownDecoder):
        pool.captioner("pets", decoder="../shapes")
    with pytest.raises(UnknownBank):
        pool.captioner("ghost")
    assert pool.loads == 3
