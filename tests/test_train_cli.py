from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from decapflow.cli import main
from decapflow.decoder.checkpoint import export_official, list_decoders, load_decoder
from decapflow.decoder.model import build_decoder
from decapflow.decoder.vocab import Vocab


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def bank(tmp_path: Path, tiny_encoder_spec: str) -> str:
    corpus = tmp_path / "animals.txt"
    corpus.write_text("".join(f"a {c} {a}\n" for c in ("red", "brown", "small") for a in ("dog", "cat", "bird", "fox")))
    assert invoke("ingest", str(corpus), "--encoder", tiny_encoder_spec, "--prefect", "off").exit_code == 0
    return "animals"


def test_train_registers_a_current_decoder(bank: str) -> None:
    out = invoke("train", "--memory", bank, "--config", "tiny", "--epochs", "2", "--batch-size", "4",
                 "--prefect", "off", "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert len(result["history"]) == 2 and result["steps"] > 0 and result["prefect_seconds"] is None
    decoders = json.loads(invoke("decoder", "list", bank, "--json").stdout)
    assert [d["id"] for d in decoders] == [result["decoder"]] and decoders[0]["current"]
    assert decoders[0]["bank_version"] == 2 and decoders[0]["recipe"]["epochs"] == 2
    human = invoke("train", "--memory", bank, "--config", "tiny", "--epochs", "1", "--prefect", "off")
    assert human.exit_code == 0 and "is now current" in human.output
    assert len(list_decoders(bank)) == 2


def test_resume_continues_the_latest_run(bank: str) -> None:
    nothing = invoke("train", "--memory", bank, "--config", "tiny", "--resume", "--prefect", "off")
    assert nothing.exit_code == 1 and "nothing to resume" in nothing.output
    first = json.loads(invoke("train", "--memory", bank, "--config", "tiny", "--epochs", "1", "--batch-size", "4",
                              "--prefect", "off", "--json").stdout)
    more = json.loads(invoke("train", "--memory", bank, "--config", "tiny", "--epochs", "3", "--batch-size", "4",
                             "--resume", "--prefect", "off", "--json").stdout)
    assert [h["epoch"] for h in more["history"]] == [1, 2, 3]
    assert more["history"][0] == first["history"][0]


def test_train_errors(tmp_path: Path) -> None:
    missing = invoke("train", "--memory", "ghost", "--prefect", "off")
    assert missing.exit_code == 1 and "no memory bank named 'ghost'" in missing.output
    assert "decap-base" in invoke("train", "--help").output and "--paper" in invoke("train", "--help").output


def test_import_official_checkpoint_and_switch(bank: str, tmp_path: Path, tiny_encoder_spec: str) -> None:
    model = build_decoder("tiny", Vocab.identity(), prefix_dim=32, n_embd=48, n_head=4, block_size=40)
    path = tmp_path / "coco_prefix-009.pt"
    torch.save(export_official(model), path)
    wrong = invoke("decoder", "import", str(path), "--memory", bank)
    assert wrong.exit_code == 1 and "holds embeddings of encoder" in wrong.output
    out = invoke("decoder", "import", str(path), "--memory", bank, "--encoder", tiny_encoder_spec)
    assert out.exit_code == 0, out.output
    (imported,) = list_decoders(bank)
    assert imported["current"] and imported["encoder"] == tiny_encoder_spec
    loaded, vocab, _ = load_decoder(Path(imported["path"]))
    prefix = torch.randn(2, 32)
    ids = torch.tensor([[49406, 320, 1929], [49406, 320, 2368]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(prefix, ids), model(prefix, ids))
    bad = invoke("decoder", "use", bank, "nope")
    assert bad.exit_code == 1 and "no decoder 'animals/nope'" in bad.output
