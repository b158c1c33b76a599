"""Writers that overlap: concurrent ingests into one bank, in separate processes, lose and duplicate nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from decapflow.bank.memory import Registry


@pytest.mark.slow  # three processes importing torch on two cores: ~45 s
def test_concurrent_ingests_of_overlapping_corpora_store_each_sentence_once(tmp_path: Path, tiny_encoder_spec: str,
                                                                              decapflow_home: Path) -> None:
    words = ("red", "blue", "green", "small", "large")
    things = ("dog", "cat", "bird", "car", "tree", "house")
    sentences = [f"a {w} {t} number {i}" for i in range(40) for w in words for t in things]  # 1,200
    corpora = {"a": sentences[:800], "b": sentences[400:], "c": sentences[200:1000] + sentences[:50]}
    for name, lines in corpora.items():
        (tmp_path / f"{name}.txt").write_text("".join(s + "\n" for s in lines))
    env = {**os.environ, "DECAPFLOW_HOME": str(decapflow_home)}
    # Three processes race to create the bank, then on every chunk write (50 sentences a chunk).
    procs = [subprocess.Popen([sys.executable, "-m", "decapflow.cli", "ingest", str(tmp_path / f"{name}.txt"),
                               "--memory", "shared", "--encoder", tiny_encoder_spec, "--chunk-size", "50",
                               "--prefect", "off", "--json"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for name in corpora]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    bank = Registry().open("shared")
    texts = bank.arrays()[0]
    assert len(texts) == len(set(texts)) == len(sentences)  # every distinct sentence, once
    assert sorted(texts) == sorted(sentences)
