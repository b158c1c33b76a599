"""Batch captioning flow: caption a folder of images and videos against a bank, write results (jsonl + COCO) and
a manifest."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from decapflow.caption.captioner import Captioner, Options
from decapflow.caption.files import caption_paths
from decapflow.caption.images import collect_paths
from decapflow.caption.video import DEFAULT_FRAMES, MEDIA_SUFFIXES, is_video
from decapflow.evaluation.results import render
from flows.prefect_env import STORE_RETRIES
from flows.report import caption_artifacts


@task(name="caption-batch", cache_policy=NO_CACHE)
def caption_task(captioner: Captioner, paths: list[Path], frames: int = DEFAULT_FRAMES
                 ) -> tuple[list[Any], list[Any]]:
    return caption_paths(captioner, paths, frames=frames)


@task(name="open-bank", cache_policy=NO_CACHE, **STORE_RETRIES)
def open_captioner(memory: str, options: Options, decoder: str | None, store: str | None) -> Captioner:
    """The bank, its decoder and its encoder (store reads: retried)."""
    return Captioner.for_bank(memory, options, decoder=decoder, store=store)


def caption_run_name() -> str:
    """``caption-REF-FOLDER`` (``caption-coco-photos``, ``caption-coco@prod-photos``)."""
    return f"caption-{flow_run.parameters['memory']}-{Path(flow_run.parameters['images']).resolve().name}"


@flow(name="decapflow-caption", flow_run_name=caption_run_name)
def caption_flow(images: str, memory: str, output_dir: str, strategy: str = "auto", decoder: str | None = None,
                 store: str | None = None, batch_size: int = 256, frames: int = DEFAULT_FRAMES) -> dict[str, Any]:
    """Caption every image and video under ``images`` with bank ``memory`` (``NAME``, or ``NAME@TAG`` / ``NAME@vN``
    for the version a tag or number pins; the manifest records the version read) (a video from the mean embedding of
    ``frames`` frames sampled uniformly over it); writes captions.jsonl, captions.coco.json (when the file names
    carry ids) and manifest.json under ``output_dir``; leaves ``caption-BANK`` (the first captions) and
    ``caption-BANK-results`` (a link to captions.jsonl). Returns the manifest."""
    start = time.perf_counter()
    options = Options(strategy=strategy)
    captioner = open_captioner(memory, options, decoder, store)
    paths = collect_paths([images], MEDIA_SUFFIXES)
    logger = get_run_logger()
    captions, failures = [], []
    for i in range(0, len(paths), batch_size):
        got, failed = caption_task(captioner, paths[i : i + batch_size], frames)
        captions += got
        failures += failed
        logger.info("captioned %d of %d files (%d failed) in %.1f s", len(captions) + len(failures), len(paths),
                    len(failures), time.perf_counter() - start)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "captions.jsonl").write_text(render(captions, "jsonl"), encoding="utf-8")
    files = ["captions.jsonl"]
    try:
        (out / "captions.coco.json").write_text(render(captions, "coco"), encoding="utf-8")
        files.append("captions.coco.json")
    except ValueError:
        pass  # file names without ids: no COCO results file
    manifest = {"images": images, "bank": captioner.bank.name, "ref": captioner.bank_ref,
                "bank_version": captioner.bank.version,
                "encoder": captioner.bank.encoder,
                "decoder": captioner.decoder_path.name if captioner.decoder_path else None, "options": asdict(options), "strategy": captioner.strategy, "captioned": len(captions),
                "videos": sum(map(is_video, paths)), "frames": frames,
                "failed": [asdict(f) for f in failures], "files": files,
                "seconds": round(time.perf_counter() - start, 2)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    caption_artifacts(captioner.bank.name, captions, out / "captions.jsonl")  # keyed by bank: one history
    return manifest
