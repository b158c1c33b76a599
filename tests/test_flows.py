"""The Prefect flows, run for real on a temporary local Prefect server."""

from __future__ import annotations

import json
from pathlib import Path

from decapflow.decoder.checkpoint import list_decoders


def test_caption_flow_writes_results_and_manifest(own_home: Path, images: Path, tmp_path: Path) -> None:
    from flows.caption import caption_flow

    (images / "corrupt.png").write_bytes(b"nope")
    manifest = caption_flow(str(images), "shapes", str(tmp_path / "out"), strategy="pd", batch_size=2)
    assert manifest["captioned"] == 3 and [Path(f["path"]).name for f in manifest["failed"]] == ["corrupt.png"]
    assert manifest["decoder"] == list_decoders("shapes")[0]["id"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    rows = json.loads((tmp_path / "out" / "captions.coco.json").read_text())
    assert sorted(r["image_id"] for r in rows) == [7, 8, 9]


def test_retrain_flow_only_retrains_changed_banks(own_home: Path, tmp_path: Path) -> None:
    from decapflow.bank.ingest import run_ingest
    from flows.train import retrain_flow

    recipe = {"epochs": 1, "batch_size": 4, "val_fraction": 0.0}
    assert retrain_flow(config="tiny", recipe=recipe) == []  # the decoder matches the bank version
    extra = tmp_path / "more.txt"
    extra.write_text("a green square\n")
    run_ingest(extra, "shapes", None)
    (result,) = retrain_flow(config="tiny", recipe=recipe)
    assert result["bank"] == "shapes" and len(list_decoders("shapes")) == 2
    assert retrain_flow(config="tiny", recipe=recipe) == []
