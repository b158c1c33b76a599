"""COCO caption metrics through pycocoevalcap (offline; needs Java), loaders and reports."""

from __future__ import annotations

import json
import logging

import pytest

from decapflow.evaluation.evaluate import (
    java_available,
    load_coco_references,
    load_results,
    score_captions,
    spice_available,
    tokenize,
    write_report,
    write_results,
)

needs_java = pytest.mark.skipif(not java_available(), reason="the COCO metrics need Java")

REFERENCES = {
    1: ["A man is riding a red bicycle down the street.", "A person rides a bike along a city road."],
    2: ["Two dogs are playing with a ball in the park.", "Dogs chase a ball across the green grass."],
    3: ["A plate of food with broccoli and rice on a table.", "A dinner plate holds rice and vegetables."],
    4: ["A large passenger jet flying through a blue sky.", "An airplane is in the air above the clouds."],
}
FAST = ("bleu", "rouge", "cider")


@needs_java
def test_tokenize_matches_coco_conventions():
    out = tokenize({"a": ["A Café, on the street!\nSecond line.", ""], 7: ["Two dogs."]})
    assert out == {"a": ["a café on the street second line", ""], 7: ["two dogs"]}


@needs_java
def test_identical_captions_score_high_and_wrong_ones_lower():
    perfect = score_captions(REFERENCES, {k: v[0] for k, v in REFERENCES.items()}, metrics=FAST)
    assert list(perfect) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["ROUGE-L"] == pytest.approx(1.0)
    assert perfect["CIDEr"] > 3.0  # CIDEr-D is on a 0-10 scale; a second, different reference lowers it
    swapped = {1: REFERENCES[2][0], 2: REFERENCES[3][0], 3: REFERENCES[4][0], 4: REFERENCES[1][0]}
    wrong = score_captions(REFERENCES, swapped, metrics=FAST)
    for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert wrong[key] < perfect[key] / 2, key
    close = swapped | {1: "a man riding a bicycle down a street"}
    assert wrong["CIDEr"] < score_captions(REFERENCES, close, metrics=FAST)["CIDEr"]


@needs_java
def test_predictions_may_cover_a_subset_of_references():
    scores = score_captions(REFERENCES, {2: REFERENCES[2][1]}, metrics=("bleu",))
    assert scores["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="no prediction"):
        score_captions(REFERENCES, {2: REFERENCES[2][1]}, metrics=("bleu",), require_all=True)


def test_id_and_metric_errors_are_clear():
    with pytest.raises(ValueError, match=r"1 predicted image ids have no references \(e\.g\. \[99\]\)"):
        score_captions(REFERENCES, {1: "a man", 99: "a dog"}, metrics=FAST)
    with pytest.raises(ValueError, match="ints vs strings"):
        score_captions(REFERENCES, {"1": "a man"}, metrics=FAST)
    with pytest.raises(ValueError, match="unknown metrics"):
        score_captions(REFERENCES, {1: "a man"}, metrics=("bleu", "bertscore"))
    with pytest.raises(ValueError, match="no predictions"):
        score_captions(REFERENCES, {})


@needs_java
def test_spice_is_skipped_with_a_notice_when_its_models_are_missing(caplog):
    with caplog.at_level(logging.WARNING, logger="decapflow.evaluation.evaluate"):
        scores = score_captions(REFERENCES, {1: REFERENCES[1][0]}, metrics=("bleu", "spice"))
    assert ("SPICE" in scores) == spice_available()
    if not spice_available():
        assert "SPICE skipped" in caplog.text


@needs_java
@pytest.mark.slow
def test_all_metrics_with_meteor():
    scores = score_captions(REFERENCES, {k: v[0] for k, v in REFERENCES.items()})
    assert scores["METEOR"] == pytest.approx(1.0, abs=1e-6)
    assert set(scores) >= {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}


def test_load_coco_and_karpathy_references(tmp_path):
    coco = {
        "images": [{"id": 10, "file_name": "a.jpg"}, {"id": 11, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 10, "caption": "x"}, {"image_id": 10, "caption": "y"},
                        {"image_id": 11, "caption": "z"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    refs, names = load_coco_references(tmp_path / "coco.json")
    assert refs == {10: ["x", "y"], 11: ["z"]} and names == {"a.jpg": 10, "b.jpg": 11}
    karpathy = {"images": [
        {"cocoid": 5, "filename": "p.jpg", "split": "test", "sentences": [{"raw": "one"}, {"raw": "two"}]},
        {"cocoid": 6, "filename": "q.jpg", "split": "train", "sentences": [{"raw": "three"}]},
    ]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    refs, names = load_coco_references(tmp_path / "dataset_coco.json", split="test")
    assert refs == {5: ["one", "two"]} and names == {"p.jpg": 5}
    with pytest.raises(ValueError, match="no images with split"):
        load_coco_references(tmp_path / "dataset_coco.json", split="val")
    with pytest.raises(ValueError, match="no splits"):
        load_coco_references(tmp_path / "coco.json", split="test")


def test_results_round_trip_and_duplicates(tmp_path):
    path = write_results({1: "a man on a bike", 2: "two dogs"}, tmp_path / "out" / "results.json")
    assert load_results(path) == {1: "a man on a bike", 2: "two dogs"}
    (tmp_path / "dup.json").write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]))
    with pytest.raises(ValueError, match="more than one caption"):
        load_results(tmp_path / "dup.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"id": 1, "text": "a"}]))
    with pytest.raises(ValueError, match="entry 0"):
        load_results(tmp_path / "bad.json")


def test_write_report_makes_json_and_a_markdown_table(tmp_path):
    metrics = {
        "pd": {"BLEU-4": 0.247, "METEOR": 0.25, "CIDEr": 0.912, "SPICE": 0.187},
        "vd": {"BLEU-4": 0.05, "CIDEr": 0.1},
    }
    json_path, md_path = write_report(metrics, tmp_path / "report", extra={"tau": 0.01, "images": 5000})
    assert json.loads(json_path.read_text()) == {"metrics": metrics, "extra": {"tau": 0.01, "images": 5000}}
    text = md_path.read_text()
    assert "| strategy | BLEU-4 | METEOR | CIDEr | SPICE |" in text
    assert "| pd | 24.7 | 25.0 | 91.2 | 18.7 |" in text
    assert "| vd | 5.0 | – | 10.0 | – |" in text
    assert "**tau**: 0.01" in text
