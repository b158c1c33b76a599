from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from decapflow.cli import main


def coco_annotations(path: Path, captions: dict[int, list[str]], names: dict[int, str] | None = None) -> Path:
    images = [{"id": i, "file_name": (names or {}).get(i, f"img_{i:06d}.png")} for i in captions]
    annotations = [{"image_id": i, "id": n, "caption": c}
                   for n, (i, caps) in enumerate((i, caps) for i, caps in captions.items()) for c in caps]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_eval_scores_a_results_file(tmp_path: Path) -> None:
    refs = {1: ["a red circle", "one red circle"], 2: ["two blue squares", "a pair of blue squares"]}
    ann = coco_annotations(tmp_path / "ann.json", refs)
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"image_id": 1, "caption": "a red circle"}, {"image_id": 2, "caption": "two blue squares"}]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "caption": "two blue squares"}, {"image_id": 2, "caption": "a red circle"}]))
    runner = CliRunner()
    scores = {}
    for res in (good, bad):
        out = runner.invoke(main, ["eval", "--annotations", str(ann), "--results", str(res), "--no-meteor", "--json",
                                   "--output-dir", str(tmp_path / res.stem)])
        assert out.exit_code == 0, out.output
        scores[res.stem] = json.loads(out.stdout)["metrics"][res.stem]
    assert scores["good"]["BLEU-1"] > 0.99 and scores["good"]["CIDEr"] > scores["bad"]["CIDEr"] + 1
    assert "CIDEr" in (tmp_path / "good" / "eval.md").read_text()
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"image_id": 99, "caption": "x"}]))
    out = runner.invoke(main, ["eval", "--annotations", str(ann), "--results", str(unknown), "--no-meteor"])
    assert out.exit_code == 1 and "99" in out.output


def test_eval_captions_images_with_every_strategy(home: Path, images: Path, tmp_path: Path) -> None:
    refs = {7: ["a red circle"], 8: ["a blue square"], 9: ["two green triangles"]}
    ann = coco_annotations(tmp_path / "ann.json", refs)
    out = CliRunner().invoke(main, ["eval", "--annotations", str(ann), "--images", str(images), "--memory", "shapes",
                                    "--compare-strategies", "--no-meteor", "--json",
                                    "--output-dir", str(tmp_path / "ev")])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert set(report["metrics"]) == {"pd", "topk", "nnd", "vd", "clipre"} and report["images"] == 3
    for name in report["metrics"]:
        rows = json.loads((tmp_path / "ev" / f"results_{name}.json").read_text())
        assert sorted(r["image_id"] for r in rows) == [7, 8, 9]
    usage = CliRunner().invoke(main, ["eval", "--annotations", str(ann)])
    assert usage.exit_code == 2 and "--results" in usage.output
