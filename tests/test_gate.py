"""Champion / challenger: fixed evaluation sets, held-out training, gated promotion, rollback, pinned versions."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from decapflow.bank.ingest import run_ingest
from decapflow.bank.memory import Registry
from decapflow.cli import main
from decapflow.decoder.registry import decoders
from decapflow.decoder.train import TrainRecipe
from decapflow.lifecycle.gate import decide, eval_sets, held_out_texts, text_eval_set
from decapflow.lifecycle.training import retrain_due, train_bank, train_from_bank

WEAK = {"epochs": 1, "max_steps": 1, "batch_size": 8, "lr": 1e-4, "val_fraction": 0.0}
STRONG = {"epochs": 150, "batch_size": 8, "lr": 1e-2, "warmup_steps": 10, "val_fraction": 0.0, "patience": None}


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_a_worse_challenger_is_rejected_a_better_one_promoted_and_rollback_restores(own_home: Path) -> None:
    reg = decoders()
    champion = reg.current_id("shapes")
    worse = train_bank("shapes", "tiny", WEAK, progress=False, gate=True)
    assert not worse["promoted"] and reg.current_id("shapes") == champion
    decision = worse["decision"]
    assert decision["metric"] == "text.cider" and decision["champion"] == champion
    assert decision["challenger_score"] < decision["champion_score"]
    assert reg.record("shapes", worse["decoder"])["status"] == "rejected"
    # The champion was scored once, on the same set, and the score is kept with it.
    (set_id,) = reg.record("shapes", champion)["scores"]
    assert set_id == decision["eval_set"] and reg.record("shapes", worse["decoder"])["scores"].keys() == {set_id}

    reg.set_current("shapes", worse["decoder"])  # a bad decoder is current: a good challenger must replace it
    better = train_bank("shapes", "tiny", STRONG, progress=False, gate=True)
    assert better["promoted"] and reg.current_id("shapes") == better["decoder"]
    assert better["decision"]["challenger_score"] > better["decision"]["champion_score"]
    assert reg.record("shapes", better["decoder"])["parent"] == worse["decoder"]
    assert reg.rollback("shapes") == worse["decoder"] and reg.current_id("shapes") == worse["decoder"]


def test_ungated_training_promotes_and_says_so(own_home: Path) -> None:
    out = invoke("train", "--memory", "shapes", "--config", "tiny", "--epochs", "1", "--max-steps", "1",
                 "--prefect", "off")
    assert out.exit_code == 0, out.output
    assert "is now current for bank 'shapes'" in out.output and "ungated (by hand)" in out.output
    gated = invoke("train", "--memory", "shapes", "--config", "tiny", "--epochs", "1", "--max-steps", "1",
                   "--seed", "1", "--gate", "--margin", "0.5", "--prefect", "off")
    assert gated.exit_code == 0 and "rejected for bank 'shapes'" in gated.output
    rows = json.loads(invoke("decoder", "list", "shapes", "--json").stdout)
    assert [r["status"] for r in rows] == ["promoted", "promoted", "rejected"] and rows[1]["current"]
    listed = invoke("decoder", "list", "shapes").output
    assert "rejected" in listed and "cider" in listed and f"parent {rows[0]['id']}" in listed
    back = invoke("decoder", "rollback", "shapes")
    assert back.exit_code == 0 and decoders().current_id("shapes") == rows[0]["id"]
    promoted = invoke("decoder", "promote", rows[2]["id"])
    assert promoted.exit_code == 0 and decoders().current_id("shapes") == rows[2]["id"]


def test_racing_gates_never_both_replace_the_champion_blindly(own_home: Path) -> None:
    """Two challengers gated at once against the same champion: the second compares against the first's result."""
    reg = decoders()
    bank = Registry().open("shapes")
    evalset = text_eval_set(bank)
    champion = reg.current_id("shapes")
    # Different seeds: identical weights trained within one second get the same id (a re-registration).
    a = train_bank("shapes", "tiny", {**WEAK, "seed": 1}, progress=False, gate=True)["decoder"]
    b = train_bank("shapes", "tiny", {**WEAK, "seed": 2}, progress=False, gate=True)["decoder"]
    assert a != b
    # Give them known scores on the bank's set (what scoring them would record) so the race is about the swap.
    reg.update("shapes", champion, scores={evalset.id: {"cider": 1.0}})
    reg.update("shapes", a, scores={evalset.id: {"cider": 2.0}}, status="challenger")
    reg.update("shapes", b, scores={evalset.id: {"cider": 3.0}}, status="challenger")
    decisions = {}
    threads = [threading.Thread(target=lambda d=d: decisions.__setitem__(d, decide("shapes", d, emit=False)))
               for d in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert reg.current_id("shapes") == b  # the best one, whichever order the swaps happened in
    history = json.loads(reg.pointer("shapes")["history"])
    # b replaced either the champion or a; a was promoted only if it got there first.
    assert history[-1] == (a if decisions[a].promoted else champion)
    assert all(decisions[d].champion_score is not None for d in (a, b))


def test_held_out_sentences_are_fixed_and_left_out_of_training(tmp_path: Path, tiny_encoder_spec: str) -> None:
    corpus = tmp_path / "many.txt"
    corpus.write_text("".join(f"a {c} {s} number {i}\n" for i in range(25) for c in ("red", "blue")
                              for s in ("circle", "square", "star", "moon")))
    run_ingest(corpus, "many", tiny_encoder_spec)  # 200 sentences: 10 held out
    decoder_id, _ = train_from_bank("many", config="tiny", progress=False,
                                    recipe=TrainRecipe(epochs=1, max_steps=1, val_fraction=0.0))
    (evalset,) = eval_sets("many")
    assert evalset.held_out and len(evalset.texts) == 10 and held_out_texts("many") == set(evalset.texts)
    meta = decoders().record("many", decoder_id)
    assert meta["bank_rows"] == 200 and meta["trained_rows"] == 190 and meta["eval_set"] == evalset.id
    more = tmp_path / "more.txt"
    more.write_text("".join(f"a green triangle number {i}\n" for i in range(100)))
    run_ingest(more, "many", tiny_encoder_spec)
    assert text_eval_set(Registry().open("many")) == evalset  # the bank grew; its evaluation set did not change
    shown = invoke("memory", "eval-set", "many")
    assert shown.exit_code == 0 and "10 held-out sentences" in shown.output


def test_training_pins_the_bank_version_it_started_from(own_home: Path, tmp_path: Path) -> None:
    bank = Registry().open("shapes")
    pinned, rows = bank.version, len(bank)
    extra = tmp_path / "extra.txt"
    extra.write_text("a pink hexagon\nan orange oval\n")
    run_ingest(extra, "shapes")
    decoder_id, _ = train_from_bank("shapes", config="tiny", progress=False, version=pinned, promote=False,
                                    recipe=TrainRecipe(epochs=1, max_steps=1, val_fraction=0.0))
    record = decoders().record("shapes", decoder_id)
    assert record["bank_version"] == pinned and record["bank_rows"] == rows == 8
    assert Registry().open("shapes").at(pinned).arrays()[1].shape == (8, 32)


def test_retrain_is_due_on_growth_and_not_twice_for_the_same_rows(own_home: Path, tmp_path: Path) -> None:
    assert retrain_due("shapes")[0] is False
    extra = tmp_path / "extra.txt"
    extra.write_text("a pink hexagon\n")
    run_ingest(extra, "shapes")
    assert retrain_due("shapes", min_new_rows=5) == (False, retrain_due("shapes", min_new_rows=5)[1])
    due, reason = retrain_due("shapes", min_new_rows=5, min_growth=0.1)
    assert due and "12.5%" in reason
    train_bank("shapes", "tiny", WEAK, progress=False, gate=True)  # rejected
    assert retrain_due("shapes")[0] is False  # not retried on the same rows


def test_image_eval_set_is_copied_into_the_store_and_gates(own_home: Path, images: Path, tmp_path: Path) -> None:
    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"img_{i:06d}.png"} for i in (7, 8, 9)],
        "annotations": [{"image_id": i, "id": i, "caption": c}
                        for i, c in ((7, "a red circle"), (8, "a blue square"), (9, "two green triangles"))]}))
    out = invoke("memory", "eval-set", "shapes", "--annotations", str(annotations), "--images", str(images), "--json")
    assert out.exit_code == 0, out.output
    sets = json.loads(out.stdout)
    assert [s["kind"] for s in sets] == ["text", "images"] and sets[1]["size"] == 3
    shutil.rmtree(images)  # copied: scoring does not need the original folder
    result = train_bank("shapes", "tiny", WEAK, progress=False, gate=True)
    assert result["decision"]["metric"] == "images.cider" and result["decision"]["eval_set"] == sets[1]["id"]
    scores = decoders().record("shapes", result["decoder"])["scores"][sets[1]["id"]]
    assert scores["n"] == 3 and np.isfinite(scores["cider"])
    again = invoke("memory", "eval-set", "shapes", "--annotations", str(annotations), "--images", str(tmp_path))
    assert again.exit_code == 1 and "not in" in again.output


def test_events_are_a_no_op_without_a_prefect_server() -> None:
    from decapflow.bank import events

    assert events.bank_updated("x", 1, 2, 3) is False


def test_gate_metric_names_match_the_cli() -> None:
    from decapflow.cli.decoders import GATE_METRICS
    from decapflow.lifecycle.gate import METRICS

    assert GATE_METRICS == METRICS


def test_deleting_a_bank_forgets_its_decoders_and_evaluation_sets(own_home: Path, tmp_path: Path,
                                                                   tiny_encoder_spec: str) -> None:
    assert eval_sets("shapes") and decoders().list("shapes")
    folder = Path(decoders().current_path("shapes"))
    out = invoke("memory", "rm", "shapes", "--yes")
    assert out.exit_code == 0 and "1 decoder(s), 1 evaluation set(s)" in out.output
    assert not folder.exists() and decoders().list("shapes") == [] and decoders().current_id("shapes") is None
    corpus = tmp_path / "shapes.txt"
    corpus.write_text("a red circle\n")
    run_ingest(corpus, "shapes", tiny_encoder_spec)  # a new bank under the old name starts clean
    assert eval_sets("shapes") == [] and retrain_due("shapes")[0]
