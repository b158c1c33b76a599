"""The memory-size study: bank subsets (nested, seeded, honoured by every strategy), its table, plot and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from decapflow.caption.captioner import Captioner, Options
from decapflow.cli import main
from decapflow.evaluation.memory_size import (
    MemorySizeStudy,
    SizeRun,
    parse_sizes,
    plan_sizes,
    plot_size,
    plot_study,
    subset_order,
    subset_rows,
)
from tests.test_eval_cli import coco_annotations

BANK_STRATEGIES = ("pd", "topk", "nnd", "clipre")


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sizes_parse_and_clip_to_the_bank() -> None:
    assert parse_sizes("1000, 10k,1_000_000,all") == [1000, 10_000, 1_000_000, "all"]
    for bad, says in (("0", "at least 1 row"), ("-5", "at least 1 row"), ("ten", "not a row count"),
                      ("100,", "not a row count"), ("1.5k", "not a row count")):
        with pytest.raises(ValueError, match=says):
            parse_sizes(bad)
    plans, notes = plan_sizes([5000, 100, "all", 1000, 100, 30_000], bank_rows=24_000)
    assert [(p.label, p.rows) for p in plans] == [("100", 100), ("1000", 1000), ("5000", 5000), ("all", 24_000)]
    assert notes == ["30000 rows > the bank's 24000: clipped to all"]
    assert [(p.label, p.rows) for p in plan_sizes([8], bank_rows=8)[0]] == [("all", 8)]  # exactly the bank: all


def test_subsets_are_seeded_and_nested() -> None:
    order = subset_order(10_000, seed=0)
    assert np.array_equal(order, subset_order(10_000, seed=0))
    assert not np.array_equal(order, subset_order(10_000, seed=1))
    small, large = subset_rows(order, 100), subset_rows(order, 1000)
    assert len(small) == 100 and len(np.unique(large)) == 1000 and np.all(np.diff(large) > 0)
    assert set(small) <= set(large)


def test_a_restricted_captioner_only_sees_its_rows(home: Path) -> None:
    base = Captioner.for_bank("shapes", Options(n_support=3))
    texts = [t.as_py() for t in base.texts]
    rows = np.array([1, 4, 6])
    sub = base.restricted(rows)
    assert np.array_equal(sub.vectors, base.vectors[rows]) and sub.texts.to_pylist() == [texts[i] for i in rows]
    allowed = {texts[i] for i in rows}
    images = unit_rows(12, base.bank.dim)
    for strategy in BANK_STRATEGIES:
        captions = sub.with_options(Options(strategy=strategy, n_support=3)).caption_embeddings(images)
        assert all(text in allowed for c in captions for text, _ in c.support), strategy
        if strategy == "clipre":
            assert {c.caption for c in captions} <= allowed
    prefixes, _ = sub.with_options(Options(strategy="nnd")).prefixes(images)
    assert all(any(np.array_equal(p, base.vectors[r]) for r in rows) for p in prefixes)
    unrestricted = base.with_options(Options(strategy="clipre")).caption_embeddings(images)
    assert {c.caption for c in unrestricted} - allowed  # the whole bank would have answered otherwise
    assert sub.restricted([2, 0]).row_ids.tolist() == [6, 1]  # a subset of a subset keeps bank row numbers
    for bad in ([8], [-1], [2, 2], []):
        with pytest.raises(ValueError):
            base.restricted(bad)


def run_eval(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["eval", *args])
    return result.exit_code, result.output


def test_eval_bank_sizes_table_plot_and_all_equals_plain_eval(home: Path, images: Path, tmp_path: Path) -> None:
    ann = coco_annotations(tmp_path / "ann.json", {7: ["a red circle"], 8: ["a blue square"], 9: ["two green "
                                                                                                  "triangles"]})
    common = ["--annotations", str(ann), "--images", str(images), "--memory", "shapes", "--compare-strategies",
              "--no-meteor"]
    code, output = run_eval(*common, "--output-dir", str(tmp_path / "plain"))
    assert code == 0, output
    plain = json.loads((tmp_path / "plain" / "eval.json").read_text())["metrics"]

    out = tmp_path / "sizes"
    code, output = run_eval(*common, "--bank-sizes", "2,4,50,all", "--seed", "3", "--output-dir", str(out))
    assert code == 0, output
    assert "| pd | 2 |" in output and "| clipre | all (8) |" in output  # the table
    assert f"plot: {out / 'memory-size.png'}" in output and "50 rows > the bank's 8: clipped to all" in output
    study = json.loads((out / "memory-size.json").read_text())
    runs = {(r["strategy"], r["size"]): r for r in study["runs"]}
    assert {size for _, size in runs} == {"2", "4", "all"} and {s for s, _ in runs} == set(plain)
    assert {r["rows"] for r in study["runs"]} == {2, 4, 8} and study["seed"] == 3
    for strategy, metrics in plain.items():
        assert runs[(strategy, "all")]["metrics"] == metrics  # exactly the plain eval's numbers
        if strategy == "vd":  # reads no bank: flat
            assert runs[("vd", "2")]["metrics"] == metrics
    texts = [t.as_py() for t in Captioner.for_bank("shapes", Options(strategy="clipre")).texts]
    order = subset_order(8, seed=3)
    for size in (2, 4):
        allowed = {texts[i] for i in subset_rows(order, size)}
        captions = {r["caption"] for r in json.loads((out / f"results_clipre_{size}.json").read_text())}
        assert captions <= allowed
    with Image.open(out / "memory-size.png") as png:
        assert png.format == "PNG" and png.size == (1260, 340)  # CIDEr, BLEU-4, ROUGE-L in one row
    assert "memory-size.png" in (out / "memory-size.md").read_text()


def test_bad_bank_sizes_are_click_errors(tmp_path: Path) -> None:
    ann = coco_annotations(tmp_path / "ann.json", {7: ["a red circle"]})
    for bad in ("0", "-100", "lots", "10,,all"):
        code, output = run_eval("--annotations", str(ann), "--images", str(tmp_path), "--memory", "x",
                                "--bank-sizes", bad)
        assert code == 2 and "Invalid value for '--bank-sizes'" in output, output
    results = tmp_path / "res.json"
    results.write_text("[]")
    code, output = run_eval("--annotations", str(ann), "--results", str(results), "--bank-sizes", "10")
    assert code == 2 and "--bank-sizes" in output and "--images" in output


def test_plot_has_a_panel_per_metric(tmp_path: Path) -> None:
    metrics = {"BLEU-4": 0.2, "METEOR": 0.2, "ROUGE-L": 0.4, "CIDEr": 0.8, "attr-mean": 0.7}
    runs = [SizeRun(s, label, rows, {}, {k: v * rows / 1000 for k, v in metrics.items()}, 0.5)
            for s in ("pd", "nnd") for label, rows in (("10", 10), ("100", 100), ("all", 1000))]
    study = MemorySizeStudy("bank", "dec1", 1000, 7, 0, runs)
    path = plot_study(study, tmp_path / "p" / "curve.png")
    assert plot_size(study) == (1260, 680)  # five panels: two rows of three
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (1260, 680)


@pytest.mark.slow
@pytest.mark.heavy  # METEOR's Java on every caption twice; test_evaluate runs METEOR in CI
def test_score_many_equals_score_captions_with_meteor() -> None:
    from decapflow.evaluation.evaluate import score_captions, score_many

    refs = {1: ["a red circle", "one red circle"], 2: ["two blue squares", "a pair of blue squares"],
            3: ["a small green triangle"]}
    runs = {"good": {1: "a red circle", 2: "two blue squares", 3: "a green triangle"},
            "bad": {1: "two blue squares", 2: "a red circle"}}
    assert score_many(refs, runs) == {name: score_captions(refs, preds) for name, preds in runs.items()}


def test_captions_already_decoded_on_the_whole_bank_are_reused(home: Path) -> None:
    from decapflow.evaluation.memory_size import run_study

    base = Captioner.for_bank("shapes", Options())
    ids = [1, 2, 3]
    refs = {i: ["a red circle"] for i in ids}
    known = {"pd": (dict.fromkeys(ids, "a red circle"), 0.5), "vd": (dict.fromkeys(ids, "a blue square"), 0.5)}
    study = run_study(base, refs, ids, unit_rows(3, base.bank.dim), [2, "all"], strategies=("pd", "vd"),
                      metrics=("bleu",), full_bank=known)
    runs = {(r.strategy, r.size): r for r in study.runs}
    assert runs[("pd", "all")].captions == known["pd"][0] and runs[("pd", "all")].metrics["BLEU-1"] > 0.99
    assert runs[("vd", "2")].captions == known["vd"][0]  # vd reads no bank: the whole bank's captions hold
    assert runs[("pd", "2")].rows == 2 and runs[("pd", "2")].seconds != 0.5  # decoded on its subset
