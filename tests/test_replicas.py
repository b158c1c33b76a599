"""Two ``decapflow serve`` processes over one store follow a promotion and an ingest without a restart (issue 19).

Each replica's compute worker checks, on every batch, the bank's LanceDB version and the store's ``_current``
pointer (:mod:`decapflow.serve.pool`), so the first request that starts after the change has committed is answered
with the new decoder / bank version; nothing is cached between requests that could lag."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import free_port

MAX_REQUESTS = 3000  # the loop's bounds: whichever comes first, or the test stops it
MAX_SECONDS = 50.0
FOLLOW_S = 10.0  # how long a replica may take to answer with a new decoder / bank version


def png(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Answer:
    replica: int
    started: float
    status: int
    decoder: str | None = None
    bank_version: int | None = None
    error: str = ""


class Loop(threading.Thread):
    """Captions against the replicas alternately, one request at a time, at most MAX_REQUESTS / MAX_SECONDS."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.answers: list[Answer] = []
        self.halt = threading.Event()
        self.image = png()

    def run(self) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        with httpx.Client(timeout=30) as client:
            for i in range(MAX_REQUESTS):
                if self.halt.is_set() or time.monotonic() > deadline:
                    return
                replica = i % len(self.urls)
                started = time.monotonic()
                try:
                    r = client.post(f"{self.urls[replica]}/v1/captions", data={"memory": "shapes"},
                                    files=[("images", ("a.png", self.image))])
                except httpx.HTTPError as exc:
                    self.answers.append(Answer(replica, started, 0, error=repr(exc)))
                    continue
                if r.status_code != 200:
                    self.answers.append(Answer(replica, started, r.status_code, error=r.text))
                    continue
                result = r.json()["results"][0]
                self.answers.append(Answer(replica, started, 200, result["decoder"], result["bank_version"]))

    def latest(self, replica: int, since: float) -> Answer | None:
        mine = [a for a in list(self.answers) if a.replica == replica and a.started >= since and a.status == 200]
        return mine[-1] if mine else None


def wait_for(check: Any, timeout: float, what: str, loop: Loop) -> float:
    """Wait until ``check()`` is true (polling); returns the seconds it took."""
    start = time.monotonic()
    while not check():
        assert loop.is_alive(), f"the request loop ended before {what}"
        assert time.monotonic() - start < timeout, f"{what} not within {timeout} s: {loop.answers[-4:]}"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def replicas(own_home: Path, tmp_path: Path):
    """Two ``decapflow serve`` subprocesses over the store of ``own_home``, ready; yields their URLs."""
    store = own_home / "banks"
    procs: list[tuple[subprocess.Popen, Path]] = []
    urls = []
    try:
        for i in range(2):
            port = free_port()
            log = tmp_path / f"replica-{i}.log"
            with log.open("w") as out:
                procs.append((subprocess.Popen(
                    [sys.executable, "-m", "decapflow.cli", "serve", "--store", str(store), "--host", "127.0.0.1",
                     "--port", str(port), "--preload", "shapes", "--max-wait-ms", "0", "--log-level", "warning"],
                    stdout=out, stderr=subprocess.STDOUT, env=os.environ), log))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 90  # two servers and two workers importing torch on a busy 2-core box
        for url, (proc, log) in zip(urls, procs, strict=True):
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                try:
                    if httpx.get(f"{url}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        yield urls
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.mark.slow
def test_two_replicas_follow_a_promotion_and_an_ingest(own_home: Path, replicas: list[str], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from decapflow.bank.memory import Registry
    from decapflow.cli import main
    from decapflow.decoder.registry import decoders
    from decapflow.decoder.train import TrainRecipe
    from decapflow.lifecycle.training import train_from_bank

    store = str(own_home / "banks")
    old_decoder = decoders(store).current_id("shapes")
    old_version = Registry(store).open("shapes").version
    loop = Loop(replicas)
    loop.start()
    try:
        def all_answer(decoder: str | None, version: int, since: float) -> bool:
            return all((a := loop.latest(r, since)) is not None and (a.decoder, a.bank_version) == (decoder, version)
                       for r in range(len(replicas)))

        wait_for(lambda: all_answer(old_decoder, old_version, 0.0), 30, "the first answers", loop)

        # (a) a new decoder: registered as a challenger (not current: nothing changes), then promoted by hand
        new_decoder, _ = train_from_bank("shapes", config="tiny", store=store, progress=False, promote=False,
                                         recipe=TrainRecipe(epochs=2, batch_size=8, warmup_steps=1, val_fraction=0.0,
                                                            patience=None))
        assert new_decoder != old_decoder and decoders(store).current_id("shapes") == old_decoder
        registered = time.monotonic()
        wait_for(lambda: all_answer(old_decoder, old_version, registered), FOLLOW_S, "answers after registering", loop)
        promoted = runner_ok(CliRunner().invoke(main, ["decoder", "promote", new_decoder, "--memory", "shapes",
                                                       "--store", store]))
        promotion_lag = wait_for(lambda: all_answer(new_decoder, old_version, promoted), FOLLOW_S,
                                 f"both replicas answering with decoder {new_decoder}", loop)

        # (b) new sentences in the bank: a new bank version, same decoder
        corpus = tmp_path / "more.txt"
        corpus.write_text("a black hexagon\nfour orange stars\na grey circle on the right\n")
        ingested = runner_ok(CliRunner().invoke(main, ["ingest", str(corpus), "--memory", "shapes", "--prefect", "off",
                                                       "--store", store]))
        bank = Registry(store).open("shapes")
        new_version, rows = bank.version, len(bank)
        assert new_version > old_version and rows == 8 + 3
        ingest_lag = wait_for(lambda: all_answer(new_decoder, new_version, ingested), FOLLOW_S,
                              f"both replicas answering from bank version {new_version}", loop)
    finally:
        loop.halt.set()
        loop.join(40)
    assert not loop.is_alive()

    answers = loop.answers
    failed = [a for a in answers if a.status != 200]
    assert not failed, failed[:5]
    for replica, url in enumerate(replicas):
        mine = [a for a in answers if a.replica == replica]
        assert len(mine) >= 3
        # each replica moves forward only: old -> new decoder -> new bank version, never back (requests are serial)
        states = [(a.decoder != old_decoder, a.bank_version) for a in mine]
        assert states == sorted(states), states
        # every request that started after a change had committed saw it: the replicas check on every batch
        assert all(a.decoder == new_decoder for a in mine if a.started >= promoted)
        assert all(a.bank_version == new_version for a in mine if a.started >= ingested)
        loaded = httpx.get(f"{url}/readyz").json()["worker"]["loaded"]
        assert {"bank": "shapes", "bank_version": new_version, "decoder": new_decoder, "rows": rows} in loaded, loaded
    assert promotion_lag < FOLLOW_S and ingest_lag < FOLLOW_S
    print(f"{len(answers)} requests; promotion followed in {promotion_lag:.2f} s, ingest in {ingest_lag:.2f} s")


def runner_ok(result: Any) -> float:
    """Check a CliRunner result; returns when the command had finished (time.monotonic)."""
    assert result.exit_code == 0, (result.output, result.exception)
    return time.monotonic()
