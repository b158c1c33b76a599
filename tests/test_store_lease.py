"""The store's lease heartbeat: a long write keeps its lease; a holder that stalled past the ttl and was taken over
finds out before it commits (real processes, one of them stopped with SIGSTOP)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from decapflow.bank.memory import Registry
from decapflow.bank.store import Lease, LeaseLost, Store

TAKER = """
import sys, time
from decapflow.bank.store import Store, StoreLocked
store = Store(sys.argv[1])
for _ in range(2):
    try:
        with store.lock("x", timeout=0.3):
            print("took it", flush=True)
    except StoreLocked:
        print("locked", flush=True)
    time.sleep(0.3)
"""

HOLDER = """
import sys, time
from pathlib import Path
from decapflow.bank.store import LeaseLost, Store
store, folder = Store(sys.argv[1]), Path(sys.argv[2])
with store.lock("x", ttl=1.0) as lease:
    print("held", lease.holder, flush=True)
    deadline = time.monotonic() + 60
    while not (folder / "go").exists() and time.monotonic() < deadline:  # the work
        time.sleep(0.05)
    try:
        lease.check()
    except LeaseLost as error:
        print("LeaseLost:", error, flush=True)
        sys.exit(3)
    with open(folder / "commits", "a") as out:
        out.write("holder\\n")
"""

BANK_WRITER = """
import sys, time
from datetime import datetime, timezone
from pathlib import Path
import numpy as np
from decapflow.bank.memory import Registry
from decapflow.bank.store import LeaseLost
registry, folder = Registry(sys.argv[1]), Path(sys.argv[2])
bank = registry.open("b")
opened = registry.store.db.open_table

def open_slowly(name):  # the bank, opened inside its lock before the commit: stall there until told to go on
    if name != "b":
        return opened(name)
    print("inside", flush=True)
    deadline = time.monotonic() + 60
    while not (folder / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return opened(name)

registry.store.db.open_table = open_slowly
lock = registry.store.lock
registry.store.lock = lambda name, **kw: lock(name, **{**kw, "ttl": 1.0})
try:
    bank.add(["h-late"], ["written by a holder that lost its lease"], np.ones((1, 4), np.float32), "late",
             datetime.now(timezone.utc))
except LeaseLost as error:
    print("LeaseLost:", error, flush=True)
    sys.exit(3)
"""


def _wait_for(proc: subprocess.Popen, word: str, timeout: float = 60) -> str:
    """The first stdout line of ``proc`` starting with ``word`` (the process must print it within ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(word):
            return line.strip()
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no {word!r} from the process: {proc.stderr.read()[-2000:]}")


def test_lease_is_a_str_holder_with_state(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    with store.lock("x", ttl=30) as lease:
        assert isinstance(lease, Lease) and isinstance(lease, str) and lease == lease.holder
        assert lease.split(":")[1] == str(os.getpid()) and not lease.lost
        lease.check()
    assert lease.released


def test_heartbeat_keeps_a_long_write_s_lease_from_other_processes(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    with store.lock("x", ttl=1.0) as lease:
        start = time.monotonic()
        taker = subprocess.run([sys.executable, "-c", TAKER, store.uri], capture_output=True, text=True,
                               timeout=60)
        while time.monotonic() - start < 3.0:  # a write three times the ttl
            time.sleep(0.1)
        lease.check()
        tokens = lease.token
    assert taker.returncode == 0, taker.stderr[-2000:]
    assert taker.stdout.split("\n")[:2] == ["locked"] * 2  # both tries came after the ttl, and found it held
    assert not lease.lost and tokens >= 1 + 4  # renewed about every ttl/3


def test_holder_stalled_past_its_ttl_loses_the_lease_and_does_not_commit(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, store.uri, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        first = _wait_for(holder, "held").split()[1]
        holder.send_signal(signal.SIGSTOP)  # the heartbeat stops with it
        time.sleep(1.5)  # past the ttl
        with store.lock("x", timeout=10) as taker:  # the lapsed lease is taken over
            (tmp_path / "commits").write_text("taker\n")
            (tmp_path / "go").touch()
            holder.send_signal(signal.SIGCONT)
            out, err = holder.communicate(timeout=60)
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
    assert holder.returncode == 3, err[-2000:]
    assert "LeaseLost:" in out and first in out and f"taken over by {taker}" in out
    assert (tmp_path / "commits").read_text() == "taker\n"  # the stalled holder wrote nothing


def test_bank_writer_that_lost_its_lease_raises_instead_of_writing(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "store"))
    bank = registry.create("b", "enc", 4)
    writer = subprocess.Popen([sys.executable, "-c", BANK_WRITER, registry.uri, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(writer, "inside")  # holds bank-b's lease, before its commit
        writer.send_signal(signal.SIGSTOP)
        time.sleep(1.5)
        assert bank.add(["h-on-time"], ["written on time"], np.ones((1, 4), np.float32), "on-time",
                        datetime.now(timezone.utc)) == 1  # takes the lapsed lease over
        (tmp_path / "go").touch()
        writer.send_signal(signal.SIGCONT)
        out, err = writer.communicate(timeout=60)
    finally:
        writer.send_signal(signal.SIGCONT)
        writer.kill()
    assert writer.returncode == 3 and "LeaseLost:" in out and "'bank-b'" in out, (out, err[-2000:])
    assert Registry(str(tmp_path / "store")).open("b").hashes() == {"h-on-time"}  # the late rows are not there


def test_lease_lost_message_names_the_lock_and_the_new_holder(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    with pytest.warns(UserWarning, match="lapsed"), store.lock("x", ttl=0.3, heartbeat=False) as lease:
        time.sleep(0.5)
        with store.lock("x", timeout=5) as other:
            with pytest.raises(LeaseLost, match=rf"'x'.*{lease.holder}.*taken over by {other}"):
                lease.check()
            assert lease.lost and lease.taken_by == other
            other.check()
