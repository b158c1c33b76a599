"""``decapflow train`` under torchrun: 2 CPU ranks (gloo) against 1 process with the same global batch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from decapflow.bank.ingest import run_ingest
from decapflow.decoder.registry import decoders

BIN = Path(sys.executable).parent


def train(args: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])  # rank 0 alone prints the result


@pytest.mark.slow  # two trainings, one of them two processes: ~1 minute
@pytest.mark.heavy  # a machine to itself: three training processes
def test_two_cpu_ranks_match_one_process_with_the_same_global_batch(tmp_path: Path, tiny_encoder_spec: str,
                                                                    decapflow_home: Path) -> None:
    corpus = tmp_path / "many.txt"
    corpus.write_text("".join(f"a {c} {s} number {i}\n" for i in range(25) for c in ("red", "blue")
                              for s in ("circle", "square", "star", "moon")))
    run_ingest(corpus, "many", tiny_encoder_spec)  # 200 sentences, 10 of them held out for the gate
    env = {**os.environ, "DECAPFLOW_HOME": str(decapflow_home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = ["train", "--memory", "many", "--config", "tiny", "--epochs", "3", "--lr", "5e-3", "--threads", "1",
              "--prefect", "off", "--json"]
    one = train([sys.executable, "-m", "decapflow.cli", *common, "--batch-size", "16"], env)
    two = train([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "decapflow.cli", *common,
                 "--batch-size", "8"], env)
    assert one["steps"] == two["steps"] > 0  # 16 per step either way
    loss_one, loss_two = one["history"][-1]["val_loss"], two["history"][-1]["val_loss"]
    assert math.isfinite(loss_two) and abs(loss_two - loss_one) / loss_one < 0.1, (loss_one, loss_two)
    assert one["history"][0]["val_loss"] > loss_one and two["history"][0]["val_loss"] > loss_two  # both learn
    assert len(decoders().list("many")) == 2  # rank 0 registered its decoder once
    print(f"\nval loss 1 process {loss_one:.3f}, 2 ranks {loss_two:.3f}; tokens/s "
          f"{one['history'][-1]['tokens_per_s']:.0f} vs {two['history'][-1]['tokens_per_s']:.0f}")
