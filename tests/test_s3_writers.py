"""Writers that overlap on an object store: concurrent ingests into one S3 bank and racing gates on one S3 registry,
in separate processes, against moto's S3 server on 127.0.0.1 (the fixtures of test_s3_store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from decapflow.bank.memory import Registry
from decapflow.bank.store import Store
from decapflow.decoder.registry import decoders
from decapflow.lifecycle.gate import text_eval_set
from tests.test_s3_store import animals, moto_endpoint, s3, s3_store  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow  # processes importing torch and a chatty S3 server on two cores


def test_concurrent_ingests_into_one_s3_bank_store_each_sentence_once(s3_store: str, tmp_path: Path,  # noqa: F811
                                                                     tiny_encoder_spec: str) -> None:
    words = ("red", "blue", "green", "small", "large")
    things = ("dog", "cat", "bird", "car", "tree", "house")
    sentences = [f"a {w} {t} number {i}" for i in range(10) for w in words for t in things]  # 300
    corpora = {"a": sentences[:200], "b": sentences[100:], "c": sentences[50:250] + sentences[:20]}
    for name, lines in corpora.items():
        (tmp_path / f"{name}.txt").write_text("".join(s + "\n" for s in lines))
    # Three processes race to create the bank (in a fresh bucket: the store's tables too), then on every chunk.
    procs = [subprocess.Popen([sys.executable, "-m", "decapflow.cli", "ingest", str(tmp_path / f"{name}.txt"),
                               "--memory", "shared", "--encoder", tiny_encoder_spec, "--chunk-size", "25",
                               "--store", s3_store, "--prefect", "off", "--json"], env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in corpora]
    outputs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    texts = Registry(s3_store).open("shared").arrays()[0]
    assert len(texts) == len(set(texts)) == len(sentences)  # every distinct sentence, once
    assert sorted(texts) == sorted(sentences)


GATE = """
import json, sys, time
from pathlib import Path
from decapflow.decoder.registry import decoders
from decapflow.lifecycle.gate import decide
store, folder, decoder_id, score, evalset, start = sys.argv[1:7]
reg = decoders(store)
reg.add("animals", Path(folder), decoder_id)  # register a challenger, with the score scoring it would record
reg.update("animals", decoder_id, scores={evalset: {"cider": float(score)}})
time.sleep(max(0.0, float(start) - time.time()))  # both gates decide at once
print(json.dumps(decide("animals", decoder_id, store=store, emit=False).to_dict()))
"""


def _fake_decoder(folder: Path) -> Path:
    """A decoder folder as the registry stores it (its scores are given, so nothing loads the weights)."""
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"encoder": "tiny", "bank": "animals"}))
    (folder / "model.safetensors").write_bytes(b"not loaded")
    return folder


def test_racing_gates_on_s3_never_both_replace_the_champion(animals: str, tmp_path: Path) -> None:  # noqa: F811
    store = animals
    reg = decoders(store)
    evalset = text_eval_set(Registry(store).open("animals"), store)
    for round_, scores in enumerate(((2.0, 3.0), (5.0, 4.0))):  # the better challenger second, then first
        champion = f"2026010{round_}-000000-champ{round_}"
        reg.add("animals", _fake_decoder(tmp_path / champion), champion)
        reg.update("animals", champion, scores={evalset.id: {"cider": 1.0}})
        assert reg.set_current("animals", champion, reason="the champion of this round")
        ids = [f"2026010{round_}-000001-chal{round_}{k}" for k in "ab"]
        start = time.time() + 8  # after both processes have imported and registered
        procs = [subprocess.Popen([sys.executable, "-c", GATE, store, str(_fake_decoder(tmp_path / i)), i, str(s),
                                   evalset.id, str(start)], env=dict(os.environ), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for i, s in zip(ids, scores, strict=True)]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
        decisions = {d["challenger"]: d for d in (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)}

        best = ids[scores.index(max(scores))]
        assert reg.current_id("animals") == best  # the best one, whichever order the swaps came in
        pointer = reg.pointer("animals")
        sequence = [*json.loads(pointer["history"]), pointer["decoder"]]
        sequence = sequence[sequence.index(champion):]  # this round's promotions, in order
        promoted = [d for d in decisions.values() if d["promoted"]]
        # Every promotion is in the pointer's history once, and nothing else is.
        assert sorted(sequence[1:]) == sorted(d["challenger"] for d in promoted)
        for d in promoted:  # each promotion replaced the champion it had compared against
            assert sequence[sequence.index(d["challenger"]) - 1] == d["champion"]
        for d in decisions.values():
            assert d["champion_score"] is not None and (d["promoted"] == (d["challenger_score"] > d["champion_score"]))
        assert sum(d["champion"] == champion and d["promoted"] for d in decisions.values()) <= 1


def test_s3_lock_swaps_from_processes_lose_no_update(s3_store: str, tmp_path: Path) -> None:  # noqa: F811
    """The lease's compare-and-swap (LanceDB's conditional-PUT commits) holds on S3: writers take turns."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    worker = ("import sys, time\nfrom decapflow.bank.store import Store\n"
              "store, counter = Store(sys.argv[1]), sys.argv[2]\n"
              "for _ in range(8):\n"
              "    with store.lock('count', timeout=120) as lease:\n"
              "        n = int(open(counter).read()); time.sleep(0.01); lease.check()\n"
              "        open(counter, 'w').write(str(n + 1))\n")
    procs = [subprocess.Popen([sys.executable, "-c", worker, s3_store, str(counter)], env=dict(os.environ),
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for e in errors]
    assert counter.read_text() == "24"  # no two holders at once
    table = Store(s3_store).db.open_table("_lock-count")
    assert table.to_arrow().to_pylist()[0]["holder"] == ""  # released
