"""The demo's floors and world. The short demo itself runs in .ci/run (``decapflow demo ... --check``: ingest 21k
sentences, train a decoder, caption, score, fail below the floors), so the suite does not run it a second time."""

from __future__ import annotations

import pytest

from decapflow.lifecycle.demo import FLOORS, DemoResult, DemoSettings, run_demo


def test_floors_catch_a_broken_pipeline() -> None:
    broken = DemoResult(table={"pd": {"CIDEr": 0.1, "BLEU-4": 0.3, "attr-mean": 0.9}}, speeds={"pd": 1.0},
                        examples=[])
    assert broken.failed_floors() == [f"pd CIDEr 0.100 < {FLOORS['pd']['CIDEr']}"]


def test_demo_uses_the_realistic_gap_world_clip() -> None:
    assert DemoSettings().encoder == "world-gap"  # the paper's pd-over-vd ordering needs real CLIP's modality gap
    with pytest.raises(ValueError, match="world-gap, world"):
        run_demo(DemoSettings(encoder="ViT-B-32:openai"), log=lambda _: None)
