"""The decoder registry in the store: statuses, compare-and-swap promotion, rollback, retention, the old layout."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from decapflow.bank.store import Store, StoreLocked
from decapflow.decoder.checkpoint import register, save_decoder
from decapflow.decoder.model import DeCapDecoder, build_decoder
from decapflow.decoder.registry import Decoders, decoders
from decapflow.decoder.vocab import Vocab, tokenize
from decapflow.errors import NoDecoder


@pytest.fixture
def model() -> tuple[DeCapDecoder, Vocab]:
    vocab = Vocab.build(np.concatenate(tokenize(["a dog runs", "two cats"])))
    torch.manual_seed(0)
    return build_decoder("tiny", vocab, prefix_dim=8), vocab


def _register(model: tuple[DeCapDecoder, Vocab], bank: str = "b", n: int = 1) -> list[str]:
    net, vocab = model
    ids = []
    for _ in range(n):
        with torch.no_grad():
            net.ln_f.bias.add_(1.0)  # new weights, new id
        ids.append(register(bank, net, vocab, {"encoder": "e"}, make_current=False))
    return ids


def test_set_current_is_a_compare_and_swap_and_rollback_walks_back(model) -> None:
    reg = decoders()
    a, b, c = _register(model, n=3)
    assert reg.current_id("b") is None
    assert reg.set_current("b", a, expected=None)
    assert not reg.set_current("b", b, expected=None)  # a gate that compared against "no decoder" lost
    assert reg.set_current("b", b, expected=a) and reg.set_current("b", c, expected=b)
    assert [r["status"] for r in reg.list("b")] == ["promoted"] * 3
    assert reg.rollback("b") == b and reg.current_id("b") == b
    assert reg.rollback("b") == a
    with pytest.raises(NoDecoder, match="no earlier decoder"):
        reg.rollback("b")


def test_prune_keeps_current_rollback_targets_and_the_newest_rejected(model) -> None:
    reg = decoders()
    ids = _register(model, n=6)
    reg.set_current("b", ids[0])
    for rejected in ids[1:5]:
        reg.update("b", rejected, status="rejected")
    reg.set_current("b", ids[5])
    dropped = reg.prune("b", keep_rejected=2, keep_promoted=5)
    assert dropped == ids[1:3]  # the two oldest rejected
    left = {r["id"] for r in reg.list("b")}
    assert left == {ids[0], *ids[3:]} and reg.current_id("b") == ids[5]
    assert not Path(reg.folder("b", ids[1])).exists() and Path(reg.folder("b", ids[3])).is_dir()


def test_old_home_layout_moves_into_the_store(model, decapflow_home: Path, tmp_path: Path) -> None:
    net, vocab = model
    legacy = decapflow_home / "decoders" / "coco"
    for name in ("20250101-000000-aaaaaa", "20250102-000000-bbbbbb"):
        save_decoder(legacy / name, net, vocab, {"encoder": "e", "bank": "coco"})
    (legacy / "current").write_text("20250101-000000-aaaaaa\n")
    reg = Decoders()
    assert [r["id"] for r in reg.list("coco")] == ["20250101-000000-aaaaaa", "20250102-000000-bbbbbb"]
    assert reg.current_id("coco") == "20250101-000000-aaaaaa"
    assert (decapflow_home / "decoders" / "MIGRATED").is_file()
    assert len(Decoders().list("coco")) == 2  # once


LOCK_WORKER = """
import sys, time
from decapflow.bank.store import Store
store, counter = Store(sys.argv[1]), sys.argv[2]
for _ in range(10):
    with store.lock("count", timeout=60):
        n = int(open(counter).read()); time.sleep(0.002); open(counter, "w").write(str(n + 1))
"""


def test_lock_makes_writers_in_other_processes_take_turns(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", LOCK_WORKER, str(tmp_path / "store"), str(counter)])
             for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert counter.read_text() == "30"  # no lost update


def test_lock_times_out_naming_the_holder_and_a_lapsed_lease_is_taken_over(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    with store.lock("x", ttl=60) as holder:
        start = time.monotonic()
        with pytest.raises(StoreLocked, match=holder.split(":")[1]), store.lock("x", timeout=0.3):
            pass
        assert time.monotonic() - start < 5
    with pytest.warns(UserWarning, match="lapsed"), store.lock("y", ttl=0.2, heartbeat=False), \
            store.lock("y", timeout=5):
        pass  # the first lease lapsed and was taken over; releasing it warns


def test_decision_and_scores_round_trip_as_json(model) -> None:
    reg = decoders()
    (a,) = _register(model)
    reg.update("b", a, scores={"text-8-v1": {"cider": 1.5}}, decision={"promoted": False, "reason": "x"})
    reg.update("b", a, scores={"images-2-abc": {"cider": 0.2}}, status="rejected")
    row = reg.record("b", a)
    assert row["scores"] == {"text-8-v1": {"cider": 1.5}, "images-2-abc": {"cider": 0.2}}
    assert row["decision"]["reason"] == "x" and row["status"] == "rejected"
    assert json.loads(Path(reg.folder("b", a), "meta.json").read_text())["bank"] == "b"


def test_lock_created_by_racing_threads_still_excludes(tmp_path: Path) -> None:
    """Three threads race to create a lock's table and then take turns. LanceDB's create is not atomic (a second
    creator can overwrite the first, resetting a lock already taken); the store serialises creation."""
    import threading

    store = Store(str(tmp_path / "store"))
    count, inside, overlaps = [0], [0], [0]

    def work() -> None:
        for _ in range(10):
            with store.lock("fresh", timeout=60):
                inside[0] += 1
                overlaps[0] += inside[0] > 1
                n = count[0]
                time.sleep(0.002)
                count[0] = n + 1
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert count[0] == 30 and overlaps[0] == 0  # unserialised creation: lost increments and conflict errors
