from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from decapflow.bank.corpus import clean_text
from decapflow.bank.ingest import bank_name_for, run_ingest
from decapflow.bank.memory import BankError, Registry
from decapflow.encoders import load_encoder

WORDS = "red green blue small large circle square triangle dog cat on the left right of a near".split()


def write_corpus(path: Path, n: int, seed: int = 0, dup_every: int = 7) -> set[str]:
    """n lines of random short sentences, with duplicates and blank lines; returns the distinct cleaned texts."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        lines.append(" ".join(rng.choice(WORDS, size=rng.integers(3, 10))) + f" {i}")
        if i % dup_every == 0:
            lines.append(lines[-1] + "  ")  # a duplicate once cleaned
        if i % 11 == 0:
            lines.append("   ")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return {clean_text(line) for line in lines if line.strip()}


def test_bank_name_from_file() -> None:
    assert bank_name_for(Path("data/coco_captions.txt.gz"), None) == "coco_captions"
    assert bank_name_for(Path("x.jsonl"), "mine") == "mine"
    with pytest.raises(BankError):
        bank_name_for(Path("x.txt"), "bad name")


def test_ingest_is_idempotent_and_exact(tmp_path: Path, tiny_encoder_spec: str) -> None:
    corpus = tmp_path / "c.txt.gz"
    distinct = write_corpus(corpus, 300)
    first = run_ingest(corpus, "c", tiny_encoder_spec, chunk_size=64)
    assert first.written == len(distinct) == first.rows
    assert first.corpus["duplicates"] > 0 and first.corpus["empty"] > 0
    assert first.chunks == -(-len(distinct) // 64)
    again = run_ingest(corpus, "c", None, chunk_size=64)  # the bank remembers its encoder
    assert again.written == 0 and again.rows == len(distinct)
    assert again.corpus["already_stored"] == len(distinct)
    texts, vectors = Registry().open("c").arrays()
    assert set(texts) == distinct and len(texts) == len(distinct)
    np.testing.assert_allclose(vectors, load_encoder(tiny_encoder_spec).encode_text(texts), atol=1e-5)


def test_ingest_appends_only_new_sentences(tmp_path: Path, tiny_encoder_spec: str) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one\ntwo\nthree\n")
    b.write_text("three\nfour\n")
    run_ingest(a, "m", tiny_encoder_spec)
    report = run_ingest(b, "m", tiny_encoder_spec)
    assert (report.written, report.corpus["already_stored"], report.rows) == (1, 1, 4)
    info = Registry().open("m").describe()
    assert [(i["source"], i["rows"]) for i in info["ingests"]] == [("a.txt", 3), ("b.txt", 1)]


def test_ingest_refuses_another_encoder(tmp_path: Path, tiny_encoder_spec: str) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("a cat\n")
    run_ingest(corpus, "c", tiny_encoder_spec)
    with pytest.raises(BankError, match="holds embeddings of encoder"):
        run_ingest(corpus, "c", "world")


def test_ingest_counts_truncated(tmp_path: Path, tiny_encoder_spec: str) -> None:
    corpus = tmp_path / "long.txt"
    corpus.write_text("short one\n" + "word " * 200 + "\n")
    report = run_ingest(corpus, "long", tiny_encoder_spec)
    assert (report.truncated, report.written) == (1, 2)


def test_sigkill_mid_ingest_then_rerun_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, tiny_encoder_spec: str, decapflow_home: Path
) -> None:
    corpus = tmp_path / "big.txt"
    distinct = write_corpus(corpus, 40_000, seed=1)
    cmd = [sys.executable, "-m", "decapflow.cli", "ingest", str(corpus), "--memory", "crash",
           "--encoder", tiny_encoder_spec, "--prefect", "off", "--chunk-size", "500", "--json"]
    env = {**os.environ, "DECAPFLOW_HOME": str(decapflow_home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows, deadline = 0, time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        registry = Registry()
        rows = len(registry.open("crash")) if registry.exists("crash") else 0
        if rows >= 2000:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"ingest finished before it could be killed: {proc.stderr.read()!r}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < rows < len(distinct)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    texts, _ = Registry().open("crash").arrays()
    assert len(texts) == len(set(texts)) == len(distinct)
    assert set(texts) == distinct
