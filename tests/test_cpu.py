"""CPU budgets (decapflow.cpu): what a process may use, precedence of the settings, fair shares between real
processes, BLAS and torch following the share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_info

from decapflow import cpu

HOLDER = """
import sys, time
from pathlib import Path
from decapflow import cpu
share = cpu.Share(None if sys.argv[2] == "auto" else int(sys.argv[2]), cpus=4, folder=Path(sys.argv[1]),
                  service=sys.argv[3] == "service")
print(share.path, flush=True)
time.sleep(60)
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "claims"


@pytest.fixture
def holder(folder: Path):
    """Start a process that holds a claim in ``folder`` (threads "auto" or a count); yields its claim file."""
    started: list[subprocess.Popen] = []

    def start(threads: str = "auto", kind: str = "job") -> tuple[subprocess.Popen, Path]:
        folder.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("DECAPFLOW_THREADS", "OMP_NUM_THREADS")}
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), threads, kind], env=env,
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        return proc, Path(proc.stdout.readline().strip())

    yield start
    for proc in started:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fixed count in the environment: the fair share decides."""
    monkeypatch.delenv("DECAPFLOW_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_taskset_limits_the_usable_cpus() -> None:
    code = "from decapflow.cpu import usable_cpus; print(usable_cpus())"
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert pinned.stdout.strip() == "1"
    assert cpu.usable_cpus() == len(os.sched_getaffinity(0))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_tightest_ancestor(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    write(proc, "0::/team/job\n")
    write(tmp_path / "fs" / "team" / "cpu.max", "150000 100000\n")
    write(tmp_path / "fs" / "team" / "job" / "cpu.max", "max 100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "fs", proc) == 1.5
    write(tmp_path / "fs" / "team" / "cpu.max", "max 100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "fs", proc) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    write(proc, "5:memory:/x\n4:cpu,cpuacct:/docker/abc\n")
    base = tmp_path / "fs" / "cpu,cpuacct" / "docker" / "abc"
    write(base / "cpu.cfs_quota_us", "300000\n")
    write(base / "cpu.cfs_period_us", "100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "fs", proc) == 3.0
    write(base / "cpu.cfs_quota_us", "-1\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "fs", proc) is None
    assert cpu.cgroup_cpu_limit(tmp_path / "fs", tmp_path / "missing") is None


def test_flag_beats_environment_beats_omp(monkeypatch: pytest.MonkeyPatch, auto: None) -> None:
    assert cpu.fixed_threads() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert cpu.fixed_threads() == 4
    monkeypatch.setenv("DECAPFLOW_THREADS", "2")
    assert cpu.fixed_threads() == 2
    assert cpu.fixed_threads(3) == 3
    monkeypatch.setenv("DECAPFLOW_THREADS", "two")
    with pytest.raises(ValueError, match="DECAPFLOW_THREADS must be a positive number"):
        cpu.fixed_threads()
    with pytest.raises(ValueError, match="--threads"):
        cpu.fixed_threads(0)


def test_a_job_alone_gets_every_cpu_and_shares_with_a_second(folder: Path, holder, auto: None) -> None:
    folder.mkdir()
    mine = cpu.Share(cpus=4, folder=folder)
    try:
        assert mine.fair_share() == 4
        other, path = holder("auto")
        assert path.exists() and mine.fair_share() == 2
        other.send_signal(signal.SIGKILL)  # however it dies, its lock goes with it
        other.wait(10)
        assert mine.fair_share() == 4
        assert not path.exists(), "a dead owner's claim file is removed by whoever finds it"
        fixed, _ = holder("3")
        assert mine.fair_share() == 1  # the fixed claim takes its 3 off the top
        fixed.kill()
        fixed.wait(10)
        assert mine.fair_share() == 4
    finally:
        mine.close()
    assert list(folder.glob("*.json")) == []


def test_three_jobs_split_the_leftover_by_age(folder: Path, holder, auto: None) -> None:
    holder("auto")
    holder("auto")  # two older claims: 4 CPUs among 3 give 2 + 1 + 1, the extra one to the oldest
    mine = cpu.Share(cpus=4, folder=folder)
    try:
        assert mine.fair_share() == 1
    finally:
        mine.close()


def test_an_idle_service_does_not_count(folder: Path, holder, auto: None) -> None:
    _, path = holder("auto", "service")
    mine = cpu.Share(cpus=4, folder=folder)
    try:
        assert mine.fair_share() == 2  # just started: busy
        past = time.time() - cpu.ACTIVE_S - 1
        os.utime(path, (past, past))
        assert mine.fair_share() == 4
        os.utime(path)
        assert mine.fair_share() == 2
    finally:
        mine.close()


def blas() -> set[int]:
    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_claim_sets_torch_and_blas_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECAPFLOW_THREADS", "2")
    torch.set_num_threads(1)
    try:
        with cpu.claim() as share:
            assert share.threads == 2 and torch.get_num_threads() == 2 and blas() == {2}
            assert json.loads(share.path.read_text())["threads"] == 2
            with cpu.claim(1) as inner:  # nested: the same claim, the inner count for its block
                assert inner is share and torch.get_num_threads() == 1
            assert torch.get_num_threads() == 2
            assert cpu.current() is share
        assert torch.get_num_threads() == 1 and cpu.current() is None
        assert not share.path.exists()
    finally:
        torch.set_num_threads(1)


def test_a_forked_child_forgets_its_parents_claim(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    monkeypatch.setenv("DECAPFLOW_CPU_DIR", str(folder))
    with cpu.claim(1) as share:
        read, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.write(write_end, b"1" if cpu.current() is None else b"0")
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 1) == b"1"
        assert share.path.exists() and cpu._others(folder, None), "the parent's claim is still held"
