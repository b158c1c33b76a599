"""Caption an annotated image set with several strategies and score each: the core of ``decapflow eval``.

Images are embedded once; every strategy then runs on the same embeddings with the same decoder, so the table
compares strategies and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from decapflow.caption.captioner import Caption, Captioner
from decapflow.caption.images import ImageFailure
from decapflow.caption.video import embed_media, load_media
from decapflow.evaluation.evaluate import load_coco_references, score_captions


@dataclass
class StrategyRun:
    strategy: str
    captions: dict[int, Caption]
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # projection + decoding, after the image embeddings


@dataclass
class Experiment:
    references: dict[int, list[str]]
    runs: dict[str, StrategyRun]
    image_ids: list[int]
    failures: list[ImageFailure]
    embed_seconds: float
    vectors: np.ndarray | None = None  # the images' CLIP embeddings [B, D], in image_ids order

    def table(self) -> dict[str, dict[str, float]]:
        return {name: run.metrics for name, run in self.runs.items()}


def embed_annotated_images(captioner: Captioner, annotations: Path, images_dir: Path, split: str | None = None,
                           limit: int | None = None) -> tuple[dict[int, list[str]], list[int], np.ndarray,
                                                               list[ImageFailure]]:
    """References, the ids of the images found in ``images_dir``, their CLIP embeddings, and failures."""
    references, by_name = load_coco_references(annotations, split=split)
    ids, images, failures = [], [], []
    for name, image_id in sorted(by_name.items(), key=lambda item: item[1]):
        if image_id not in references:
            continue
        path = Path(images_dir) / name
        if not path.is_file():
            path = Path(images_dir) / Path(name).name
        image = load_media(path, captioner.encoder)  # a video: its mean frame embedding (decapflow.caption.video)
        if isinstance(image, ImageFailure):
            failures.append(image)
            continue
        ids.append(image_id)
        images.append(image)
        if limit is not None and len(ids) >= limit:
            break
    if not ids:
        raise FileNotFoundError(f"none of the annotated images were found in {images_dir}")
    vectors = embed_media(captioner.encoder, images, captioner.options.batch_size)
    return {i: references[i] for i in ids}, ids, vectors, failures


def run_strategies(base: Captioner, annotations: Path, images_dir: Path, strategies: Sequence[str],
                   metrics: Sequence[str] | None = None, split: str | None = None, limit: int | None = None
                   ) -> Experiment:
    """Caption the annotated images with each strategy (same embeddings, same decoder) and score them."""
    start = time.perf_counter()
    references, ids, vectors, failures = embed_annotated_images(base, annotations, images_dir, split, limit)
    embed_seconds = time.perf_counter() - start
    runs = {strategy: run_strategy(base, strategy, references, ids, vectors, metrics) for strategy in strategies}
    return Experiment(references, runs, ids, failures, embed_seconds, vectors)


def run_strategy(base: Captioner, strategy: str, references: dict[int, list[str]], ids: list[int],
                 vectors: np.ndarray, metrics: Sequence[str] | None = None, name: str | None = None) -> StrategyRun:
    """Caption embedded images ``vectors`` (of ``ids``) with ``strategy`` (same bank copy, image mean and decoder as
    ``base``), timed, and score them; the run is called ``name`` (default: the strategy)."""
    captioner = base.with_options(replace(base.options, strategy=strategy))
    t0 = time.perf_counter()
    captions = captioner.caption_embeddings(vectors)
    seconds = time.perf_counter() - t0
    by_id = dict(zip(ids, captions, strict=True))
    scores = score_captions(references, {i: c.caption for i, c in by_id.items()}, metrics=metrics)
    return StrategyRun(name or strategy, by_id, scores, seconds)


def summary_rows(experiment: Experiment, extra: dict[str, dict[str, float]] | None = None
                 ) -> dict[str, dict[str, float]]:
    """Per strategy: its caption metrics plus extra score columns in [0, 1] (e.g. attribute accuracy)."""
    return {name: {**run.metrics, **(extra or {}).get(name, {})} for name, run in experiment.runs.items()}


def speeds(experiment: Experiment) -> dict[str, float]:
    """Images per second of each strategy after the image embeddings (projection + decoding)."""
    return {name: round(len(run.captions) / run.seconds, 1) if run.seconds else float("nan")
            for name, run in experiment.runs.items()}
