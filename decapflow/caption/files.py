"""Captioning files: image and video paths in batches -> CLIP embeddings -> a :class:`Captioner`'s captions."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from decapflow.caption import modality
from decapflow.caption.captioner import AUTO, Caption, Captioner, Options


def embed_paths(captioner: Captioner, paths: Sequence[Path], frames: int | None = None, progress: bool = False
                ) -> Iterator[tuple[list[Path], np.ndarray, list[Any]]]:
    """Image and video files in batches of ``options.batch_size``: (readable paths, their unit CLIP embeddings,
    failures). A video's embedding is the re-normalised mean of ``frames`` frames sampled uniformly over it."""
    from decapflow.caption.images import ImageFailure
    from decapflow.caption.video import DEFAULT_FRAMES, embed_media, load_media

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc=f"caption ({captioner.strategy})", unit=" file", dynamic_ncols=True)
    step = max(1, captioner.options.batch_size)
    try:
        for start in range(0, len(paths), step):
            batch = paths[start : start + step]
            loaded = [(p, load_media(p, captioner.encoder, frames or DEFAULT_FRAMES, batch_size=step)) for p in batch]
            good = [(p, im) for p, im in loaded if not isinstance(im, ImageFailure)]
            failed = [im for _, im in loaded if isinstance(im, ImageFailure)]
            vectors = (embed_media(captioner.encoder, [im for _, im in good], step) if good
                       else np.zeros((0, captioner.bank.dim), np.float32))
            yield [p for p, _ in good], vectors, failed
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


#: ``image_mean="batch"`` needs at least this many readable files. Measured on world images (world-gap CLIP, 50 draws
#: each): the mean of n test images lies |m - mu| = 0.67 / 0.32 / 0.15 / 0.13 / 0.09 from the mean of 500 unlabelled
#: ones at n = 1 / 4 / 16 / 32 / 64, against a modality gap of 0.74-0.83 that the mean shift corrects.
MIN_BATCH_MEAN = 32


def caption_paths(captioner: Captioner, paths: Sequence[Path], progress: bool = False, frames: int | None = None,
                  image_mean: str | None = None) -> tuple[list[Caption], list[Any]]:
    """Caption image and video files in batches; unreadable ones are skipped and returned as failures.

    ``image_mean="batch"``: use the mean embedding of these files themselves as the domain's image mean (for
    ``ms``, ``rerank`` and ``auto``; transductive: every caption then depends on the whole batch). All files are
    embedded first, then captioned; fewer than :data:`MIN_BATCH_MEAN` readable files are refused (ValueError)."""
    if image_mean not in (None, "batch"):
        raise ValueError(f"image_mean must be None or 'batch', not {image_mean!r}")
    captions: list[Caption] = []
    failures: list[Any] = []
    batches = embed_paths(captioner, paths, frames, progress)
    if image_mean == "batch":
        batches = list(batches)
        vectors = [v for _, v, _ in batches if len(v)]
        readable = sum(map(len, vectors))
        if readable < MIN_BATCH_MEAN:
            raise ValueError(f"--image-mean batch: {readable} readable file(s) are too few for their mean to stand for "
                             f"the domain's (at least {MIN_BATCH_MEAN}: the mean of fewer world images is off by more "
                             f"than 15% of the modality gap, and of one image it is the image itself); record the "
                             f"domain's mean once with 'decapflow memory image-mean', or caption without it")
        if vectors:
            mean = np.concatenate(vectors).astype(np.float64).mean(axis=0).astype(np.float32)
            captioner = copy.copy(captioner)
            captioner.image_mean = modality.ImageMean(mean, sum(map(len, vectors)), captioner.bank.encoder,
                                                      "the captioned files themselves (transductive)")
    for good, vectors, failed in batches:
        failures.extend(failed)
        if good:
            for path, cap in zip(good, captioner.caption_embeddings(vectors), strict=True):
                cap.image = str(path)
                captions.append(cap)
    return captions, failures


def caption_images(inputs: Sequence[str | Path], memory: str, strategy: str = AUTO, *, decoder: str | None = None,
                   store: str | None = None, device: str | None = None, frames: int | None = None,
                   errors: str = "raise") -> list[Caption]:
    """Caption image and video files against bank ``memory`` (``NAME``, or ``NAME@TAG`` / ``NAME@vN`` for the
    version a tag or number pins) with ``strategy`` (see
    :data:`decapflow.caption.projection.STRATEGIES`) and the bank's current decoder (or ``decoder``: an id or a
    checkpoint folder). ``inputs``: files, folders (searched recursively) or glob patterns. One
    :class:`Caption` per readable file, in input order. ``errors``: ``"raise"`` (a ValueError naming every
    unreadable file, after the others were captioned) or ``"skip"`` (leave them out). For many calls, build one
    :class:`Captioner` with :meth:`Captioner.for_bank` and use :func:`caption_paths`: this loads the bank copy,
    the encoder and the decoder each time."""
    from decapflow.caption.images import collect_paths
    from decapflow.caption.video import MEDIA_SUFFIXES

    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    paths = collect_paths(inputs, MEDIA_SUFFIXES)
    captioner = Captioner.for_bank(memory, Options(strategy=strategy), decoder=decoder, store=store, device=device)
    captions, failures = caption_paths(captioner, paths, frames=frames)
    if failures and errors == "raise":
        listed = "; ".join(f"{f.path}: {f.reason}" for f in failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        raise ValueError(f"{len(failures)} of {len(paths)} files could not be read: {listed}{more}")
    return captions
