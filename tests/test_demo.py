"""The offline demo end to end (slow: ingest 21k sentences, train a decoder, caption, score)."""

from __future__ import annotations

import pytest

from decapflow.lifecycle.demo import FLOORS, DemoResult, DemoSettings, format_result, run_demo


def test_floors_catch_a_broken_pipeline() -> None:
    broken = DemoResult(table={"pd": {"CIDEr": 0.1, "BLEU-4": 0.3, "attr-mean": 0.9}}, speeds={"pd": 1.0},
                        examples=[])
    assert broken.failed_floors() == [f"pd CIDEr 0.100 < {FLOORS['pd']['CIDEr']}"]


def test_demo_uses_the_realistic_gap_world_clip() -> None:
    assert DemoSettings().encoder == "world-gap"  # the paper's pd-over-vd ordering needs real CLIP's modality gap
    with pytest.raises(ValueError, match="world-gap, world"):
        run_demo(DemoSettings(encoder="ViT-B-32:openai"), log=lambda _: None)


@pytest.mark.slow
def test_short_demo_clears_the_floors() -> None:
    result = run_demo(DemoSettings(images=40, epochs=1, max_steps=120, meteor=False), log=lambda _: None)
    assert result.failed_floors() == []
    assert set(result.table) == {"pd", "topk", "nnd", "vd", "clipre", "ms", "rerank"}
    assert "reference" in format_result(result)
    again = run_demo(DemoSettings(images=40, epochs=1, max_steps=120, meteor=False), log=lambda _: None)
    assert again.decoder == result.decoder  # the second run reuses the bank and its decoder
