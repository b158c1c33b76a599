"""A compute worker that dies loses no request that it had not begun: the server's ComputeWorker on a real worker
process, then over HTTP (uvicorn on 127.0.0.1) and through ``decapflow caption --server``, whose client retries a
request that was in flight once."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from decapflow.serve.compute import ComputeWorker
from decapflow.serve.errors import ApiError
from decapflow.serve.worker import WorkerSettings
from tests.test_serve import png, post_files


def pid_of(_server_id: str) -> int:
    """Runs in the worker: which process answered."""
    return os.getpid()


def nap(_server_id: str, seconds: float) -> int:
    """Runs in the worker: a call that is in flight for ``seconds``."""
    time.sleep(seconds)
    return os.getpid()


async def until_begun(compute: ComputeWorker, seq: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while compute._begun.value < seq:  # the worker writes each call's number as it begins it
        assert time.monotonic() < deadline, "the worker never began the call"
        await asyncio.sleep(0.005)


@pytest.mark.slow
def test_only_the_call_in_flight_fails_the_queued_and_the_next_ones_wait_for_the_new_worker(tmp_path: Path) -> None:
    settings = WorkerSettings(str(tmp_path / "store"), "cpu", 1, 10_000_000, 1)

    async def scenario() -> None:
        compute = ComputeWorker("restart-test", settings, "process", start_timeout_s=60)
        try:
            first = await compute.call(pid_of)
            in_flight = asyncio.ensure_future(compute.call(nap, 30.0))
            await until_begun(compute, compute._seq)
            queued = asyncio.ensure_future(compute.call(pid_of))  # sent to the worker, behind the nap
            await asyncio.sleep(0.2)
            os.kill(first, signal.SIGKILL)
            with pytest.raises(ApiError) as lost:
                await asyncio.wait_for(in_flight, 30)
            assert lost.value.status == 503 and lost.value.code == "worker_restarted"
            assert lost.value.headers == {"Retry-After": "1"}
            arrived = await asyncio.wait_for(compute.call(pid_of), 60)  # arrives while the new worker starts
            second = await asyncio.wait_for(queued, 60)
            assert second == arrived and second not in (first, os.getpid())
            assert compute.restarts == 1

            os.kill(second, signal.SIGKILL)  # between requests: nothing was in flight, nothing fails
            await asyncio.sleep(0.5)
            third = await asyncio.wait_for(compute.call(pid_of), 60)
            assert third not in (first, second) and compute.restarts == 2
        finally:
            compute.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_worker_that_does_not_come_back_in_time_is_a_503_unavailable(tmp_path: Path) -> None:
    settings = WorkerSettings(str(tmp_path / "store"), "cpu", 1, 10_000_000, 1)

    async def scenario() -> None:
        compute = ComputeWorker("slow-start-test", settings, "process", start_timeout_s=0.01)
        try:
            os.kill(await compute.call(pid_of), signal.SIGKILL)
            await asyncio.sleep(0.3)
            with pytest.raises(ApiError) as waited:  # the replacement takes seconds to answer, more than 10 ms
                for _ in range(3):
                    await compute.call(pid_of)
            assert waited.value.status == 503 and waited.value.code == "worker_unavailable"
            assert waited.value.headers == {"Retry-After": "5"}
        finally:
            compute.close()

    asyncio.run(scenario())


def ready_worker_pid(url: str) -> int:
    deadline = time.monotonic() + 60
    while (ready := httpx.get(f"{url}/readyz")).status_code != 200:
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.1)
    return ready.json()["worker"]["pid"]


def test_a_worker_killed_between_requests_fails_no_request(home: Path, serve_app) -> None:
    url = serve_app(compute="process", preload=["shapes"])
    pid = ready_worker_pid(url)
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    for _ in range(3):
        answer = post_files(url, [("a.png", png())])
        assert answer.status_code == 200, answer.text
    assert ready_worker_pid(url) not in (pid, None)


@pytest.mark.slow
def test_caption_server_retries_the_request_the_worker_died_in(home: Path, tmp_path: Path, serve_app) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from decapflow.cli import main

    images = tmp_path / "noisy"  # 16 photos' worth of noise: a call the worker is in for a while
    images.mkdir()
    for i in range(16):
        Image.effect_noise((512, 512), 64 + i).convert("RGB").save(images / f"n{i:02d}.png")
    url = serve_app(compute="process", preload=["shapes"])
    first = ready_worker_pid(url)
    compute = serve_app.apps[url].state.server.compute
    begun_before = compute._begun.value
    killed: list[int] = []

    def kill_when_begun() -> None:  # the client's request is in the worker: kill it there
        deadline = time.monotonic() + 60
        while compute._begun.value <= begun_before and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.kill(first, signal.SIGSTOP)  # hold it mid-call, then kill it
        killed.append(first)
        os.kill(first, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_begun)
    killer.start()
    result = CliRunner().invoke(main, ["caption", "--server", url, "--memory", "shapes", str(images)])
    killer.join(60)
    assert killed == [first]
    assert result.exit_code == 0, result.output
    assert "was restarted; retry the request; retrying in 1 s" in result.stderr  # said, then retried
    assert len(result.stdout.splitlines()) == 16
    assert ready_worker_pid(url) not in (first, None)

