"""The artifacts of a training run as Prefect's own UI shows them, in headless Chromium against a real Prefect
server on 127.0.0.1 (slow: a server start and a browser)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.prefect_server import Prefect
from tests.test_page import chromium

TRAIN = """
from flows.train import train_flow
result = train_flow("shapes", config="tiny", recipe={"epochs": 2, "batch_size": 4, "val_fraction": 0.0})
print(result["decoder"])
"""


@pytest.mark.slow
@pytest.mark.heavy  # a Prefect server, a training and Chromium
def test_the_ui_shows_the_loss_curve_and_the_training_table(trained_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    prefect = Prefect(tmp_path / "prefect", home)
    try:
        decoder = prefect.python(TRAIN).strip().splitlines()[-1]
        found = {a["key"]: a for a in prefect.post("/artifacts/filter", {}) if a["key"]}
        assert {"train-shapes", "train-shapes-loss", "gate-shapes", "train-shapes-progress"} <= set(found)
        browser = chromium("--window-size=1200,900")
        try:
            base = prefect.api.removesuffix("/api")
            browser.get(f"{base}/artifacts/artifact/{found['train-shapes-loss']['id']}")
            script = ("return Array.from(document.querySelectorAll('.artifact-data-image img'))"
                      ".map(i => [i.naturalWidth, i.naturalHeight])")
            deadline, shown = time.monotonic() + 60, []
            while time.monotonic() < deadline and not (shown and shown[0][0] > 0):
                time.sleep(0.5)
                shown = browser.execute_script(script)
            assert shown == [[480, 320]]  # the PNG decoded: 6x4 inches at 80 dpi
            browser.get(f"{base}/artifacts/artifact/{found['train-shapes']['id']}")
            deadline, text = time.monotonic() + 60, ""
            while time.monotonic() < deadline and decoder not in text:
                time.sleep(0.5)
                text = browser.find_element("tag name", "body").text
            assert decoder in text and "final validation loss" in text
        finally:
            browser.quit()
        rows = json.loads(found["gate-shapes"]["data"])
        assert rows[0]["challenger"] == decoder
    finally:
        prefect.close()
