"""Commands that caption and score: ``caption``, ``eval`` and ``demo``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from decapflow.caption.projection import STRATEGIES
from decapflow.cli.base import THREADS_HELP, echo_json, json_option, main, store_option


# ---------------------------------------------------------------------------------------------- caption
@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--memory", "-m", required=True, metavar="BANK[@TAG|@vN]",
              help="The bank to project onto (and whose current decoder to use): BANK reads its newest version, "
                   "BANK@TAG the version a tag pins (decapflow memory tag), BANK@vN version N.")
@click.option("--strategy", type=click.Choice(["auto", *STRATEGIES]), default="auto",
              show_default=True,
              help="auto: rerank when the bank has a recorded mean image embedding (or with --image-mean batch; "
                   "with a retrieval-fused decoder, 'train --fused', of its queries ms and vd), else fused when the "
                   "decoder is retrieval-fused, else topk on banks of 100k rows or more, else pd (stderr says which "
                   "ran). fused: the decoder reads the image's nearest bank "
                   "rows beside its query token. pd: projection onto the whole bank (DeCap), exact; topk: projection "
                   "onto the k nearest rows, "
                   "exact below 200k rows, APPROXIMATE above (neighbours from the bank's IVF index, built on first use "
                   "or by 'decapflow memory index'); nnd: nearest bank embedding; vd: the raw image embedding; "
                   "clipre: the nearest bank sentence; ms: the image moved across the modality gap (mean shift); "
                   "rerank: pd and ms decoded together, the caption CLIP ranks closer to the image "
                   "kept (ms and rerank need 'decapflow memory image-mean' once).")
@click.option("--image-mean", type=click.Choice(["recorded", "batch"]), default="recorded", show_default=True,
              help="The domain's mean image embedding for ms, rerank and auto: the bank's recorded one "
                   "('decapflow memory image-mean'), or 'batch': the mean of the files captioned now "
                   "(transductive: each caption then depends on the whole batch; give it dozens of images or more).")
@click.option("--tau", default=0.01, show_default=True, help="Projection temperature.")
@click.option("--k", default=64, show_default=True, help="Neighbours for --strategy topk.")
@click.option("--neighbours", type=click.IntRange(1, 64),
              help="Bank rows a retrieval-fused decoder reads per image (default: as many as it was trained with).")
@click.option("--query", type=click.Choice(["auto", "ms", "vd", "pd", "topk", "nnd"]), default="auto",
              show_default=True,
              help="A retrieval-fused decoder's query token: auto is ms with a recorded image mean, else vd.")
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Of the bank copy that pd/topk/nnd/clipre read: bfloat16 halves its memory (same projections to "
                   "cosine 1e-5) but is 0.66-0.83x as fast; auto uses it from 8 GiB of float32 vectors (4M rows at "
                   "512-d).")
@click.option("--beam", default=1, show_default=True, help="Beam width (1 = greedy).")
@click.option("--max-len", default=30, show_default=True, help="Maximum caption tokens.")
@click.option("--decoder", "decoder_id", help="A decoder id of the bank or a checkpoint folder (default: current).")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl", "coco"]), default="text", show_default=True,
              help="text: path<TAB>caption; jsonl: with the supporting bank sentences; coco: results JSON.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write here, not stdout.")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="COCO annotations: image ids for --format coco come from its file names.")
@click.option("--batch-size", default=64, show_default=True, help="Images per batch.")
@click.option("--frames", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Frames sampled uniformly over each video (the middle frame of N equal segments); the video is "
                   "captioned from their mean CLIP embedding, re-normalised.")
@click.option("--device", help="cpu, cuda ... (default: cuda when present).")
@click.option("--server", metavar="URL", envvar="DECAPFLOW_SERVER",
              help="Send the images to a running 'decapflow serve' (e.g. http://127.0.0.1:8000) instead of "
                   "loading models here; --decoder then takes a decoder id (ID or BANK/ID).")
@click.option("--api-key", envvar="DECAPFLOW_API_KEY", help="The server's API key (for --server).")
@store_option
def caption(images: tuple[str, ...], memory: str, strategy: str, image_mean: str, tau: float, k: int,
            neighbours: int | None, query: str, precision: str, beam: int,
            max_len: int,
            decoder_id: str | None, fmt: str, output: Path | None, annotations: Path | None, batch_size: int,
            frames: int, device: str | None, server: str | None, api_key: str | None, store: str | None) -> None:
    """Caption IMAGES (image and video files, folders, globs) against memory bank MEMORY (BANK, BANK@TAG or
    BANK@vN: the newest version, the one a tag pins, or version N).

    A video (.mp4 .m4v .mov .avi .webm .mkv) gets one caption: --frames frames are sampled uniformly over it,
    embedded with the bank's CLIP, averaged and re-normalised, and captioned like an image embedding with any
    --strategy. With --format coco its id is its file name's trailing number, as for images.

    Unreadable, corrupt or oversized images and videos are reported and skipped; the exit code is then 3.

    \b
    Example:  decapflow caption --memory world photos/ --format jsonl
    Pinned:   decapflow caption --memory world@prod photos/     (or --memory world@v12)
    Videos:   decapflow caption --memory world clip.mp4 videos/ --frames 16
    Through a warm server:  decapflow caption --server http://127.0.0.1:8000 --memory world photos/
    """
    from decapflow.caption.images import collect_paths
    from decapflow.caption.video import MEDIA_SUFFIXES
    from decapflow.evaluation.results import render

    paths = collect_paths(images, MEDIA_SUFFIXES)
    if not paths:
        raise click.ClickException("no images or videos found")
    if server:
        if image_mean == "batch":
            raise click.UsageError("--image-mean batch needs the files here; it does not go with --server")
        from decapflow.serve.client import ServeClient

        params = {"memory": memory, "decoder": decoder_id, "strategy": strategy, "tau": tau, "k": k, "beam": beam,
                  "max_len": max_len, "frames": frames, "query": query,
                  **({"neighbours": neighbours} if neighbours else {})}
        def retrying(message: str, wait: float) -> None:
            click.echo(f"{message}; retrying in {wait:g} s", err=True)

        with ServeClient(server, api_key, on_retry=retrying) as client:
            captions, failures = client.caption_paths(paths, params, batch_size=min(batch_size, 16))
    else:
        from decapflow.caption.captioner import Captioner, Options
        from decapflow.caption.files import caption_paths

        options = Options(strategy=strategy, tau=tau, k=k, beam=beam, max_len=max_len, batch_size=batch_size,
                          neighbours=neighbours, query=query)
        captioner = Captioner.for_bank(memory, options, decoder=decoder_id, store=store, device=device,
                                       precision=precision)
        batch_mean = image_mean == "batch"
        if captioner.bank.pinned:
            click.echo(f"bank {captioner.bank_ref}: version {captioner.bank_version}", err=True)
        if strategy == "auto":
            click.echo(f"strategy: {'rerank' if batch_mean else captioner.strategy} (auto: "
                       + ("the mean image embedding of these files, transductive" if batch_mean else
                          captioner.auto_reason() + ("" if captioner.image_mean else ", or pass --image-mean batch"))
                       + ")", err=True)
        captions, failures = caption_paths(captioner, paths, progress=output is not None or len(paths) > batch_size,
                                           frames=frames, image_mean="batch" if batch_mean else None)
    text = render(captions, fmt, annotations)
    if output:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {len(captions)} captions to {output}", err=True)
    else:
        click.echo(text, nl=False)
    for failure in failures:
        click.echo(f"skipped {failure.path}: {failure.reason}", err=True)
    if failures:
        sys.exit(3)


# ---------------------------------------------------------------------------------------------- eval
def _bank_sizes(ctx: click.Context, param: click.Parameter, value: str | None) -> list | None:
    if value is None:
        return None
    from decapflow.evaluation.memory_size import parse_sizes

    try:
        return parse_sizes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@main.command("eval")
@click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="References: COCO captions JSON, or Karpathy's dataset_coco.json with --split.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of the annotated images: caption them with --memory, then score.")
@click.option("--results", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Score an existing COCO results file ([{image_id, caption}]) instead of captioning.")
@click.option("--memory", "-m", metavar="BANK[@TAG|@vN]",
              help="Bank (and its current decoder) for --images: BANK (newest version), BANK@TAG (the version a tag "
                   "pins) or BANK@vN (version N); the report records the version read.")
@click.option("--strategy", type=click.Choice(["auto", *STRATEGIES]), default="auto",
              show_default=True, help="Strategy for --images (see decapflow caption --help; auto: rerank when the "
                                      "bank has a mean image embedding, else topk from 100k rows, else pd).")
@click.option("--compare-strategies", is_flag=True,
              help="Run pd, topk, nnd, vd and clipre on the same images, and ms and rerank when the bank has a mean "
                   "image embedding (decapflow memory image-mean).")
@click.option("--bank-sizes", callback=_bank_sizes, metavar="N,N,...,all",
              help="Memory-size study: caption the same images against random subsets of the bank with this many "
                   "rows (e.g. 1000,10000,100000,all; 10k works too), same decoder, with --strategy or "
                   "--compare-strategies, and write memory-size.md/.json plus memory-size.png (each metric against "
                   "memory size, log axis, a line per strategy). Subsets are nested: prefixes of one shuffle of the "
                   "bank drawn with --seed. 'all' is the whole bank; a size at or above the bank's rows is clipped "
                   "to 'all'.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the --bank-sizes subsets (the same seed gives the same rows).")
@click.option("--split", help="Karpathy split to score (e.g. test) when --annotations is dataset_coco.json.")
@click.option("--limit", type=int, help="Only the first N annotated images (quick checks).")
@click.option("--tau", default=0.01, show_default=True, help="Projection temperature.")
@click.option("--beam", default=1, show_default=True, help="Beam width (1 = greedy).")
@click.option("--no-meteor", is_flag=True, help="Skip METEOR (its Java start-up costs ~8 s).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where eval.json / eval.md (and per-strategy results) go (default: $DECAPFLOW_HOME/evals/...).")
@click.option("--device", help="cpu, cuda ...")
@store_option
@json_option
def evaluate_command(annotations: Path, images: Path | None, results: Path | None, memory: str | None,
                     strategy: str, compare_strategies: bool, bank_sizes: list | None, seed: int,
                     split: str | None, limit: int | None, tau: float,
                     beam: int, no_meteor: bool, output_dir: Path | None, device: str | None, store: str | None,
                     as_json: bool) -> None:
    """Score captions against COCO-style references: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when its
    Java models are installed).

    \b
    Score a results file:      decapflow eval --annotations captions_val2014.json --results res.json
    Caption and score a set:   decapflow eval --annotations ann.json --images val2014/ --memory coco
    ... at a pinned version:   ... --memory coco@prod   (or coco@v12)
    Compare the strategies:    ... --compare-strategies
    Scores against bank size:  ... --compare-strategies --bank-sizes 1000,10000,100000,all

    The paper's COCO Karpathy-test recipe is in the docs (docs/guides/paper.md, "Reproducing the paper").
    """
    from decapflow.evaluation.evaluate import (
        METRIC_KEYS,
        load_coco_references,
        load_results,
        markdown_table,
        score_captions,
        write_report,
        write_results,
    )

    metrics = ("bleu", "rouge", "cider") if no_meteor else None
    if bank_sizes and results is not None:
        raise click.UsageError("--bank-sizes captions images against bank subsets: give --images DIR and --memory "
                               "NAME, not --results")
    if results is not None:
        references, _ = load_coco_references(annotations, split=split)
        table = {results.stem: score_captions(references, load_results(results), metrics=metrics)}
        extra: dict[str, Any] = {"annotations": str(annotations), "results": str(results)}
    else:
        if images is None or memory is None:
            raise click.UsageError("give --results FILE, or --images DIR with --memory BANK (or BANK@TAG, BANK@vN)")
        from decapflow.caption.captioner import Captioner, Options
        from decapflow.evaluation.experiment import run_strategies, speeds

        strategies = list(STRATEGIES) if compare_strategies else [strategy]
        base = Captioner.for_bank(memory, Options(strategy=strategies[0], tau=tau, beam=beam), store=store,
                                  device=device)
        if compare_strategies and base.image_mean is None:
            strategies = [s for s in strategies if s not in ("ms", "rerank")]
        if compare_strategies and not base.decoder.fused:
            strategies = [s for s in strategies if s != "fused"]  # a plain decoder reads no bank rows
        strategies = [base.strategy if s == "auto" else s for s in strategies]  # the table names what ran
        if bank_sizes:
            _memory_size_study(base, annotations, images, bank_sizes, seed, strategies, metrics, split, limit,
                               output_dir or _default_eval_dir(memory), as_json)
            return
        experiment = run_strategies(base, annotations, images, strategies, metrics=metrics, split=split,
                                    limit=limit)
        table = experiment.table()
        extra = {"annotations": str(annotations), "images": len(experiment.image_ids), "bank": base.bank.name,
                 "ref": base.bank_ref, "bank_version": base.bank.version, "decoder": base.decoder_path.name if base.decoder_path else None,
                 "tau": tau, "beam": beam, "images_per_s": speeds(experiment),
                 "skipped_images": [f.path for f in experiment.failures]}
    out = output_dir or _default_eval_dir(memory or "results")
    json_path, md_path = write_report(table, out, extra)
    if results is None:
        for name, run in experiment.runs.items():
            write_results({i: c.caption for i, c in run.captions.items()}, out / f"results_{name}.json")
    if as_json:
        echo_json({"metrics": table, **extra, "report": str(md_path)})
        return
    click.echo(markdown_table(table), nl=False)
    click.echo(f"(scores x100; {', '.join(k for k in METRIC_KEYS if any(k in m for m in table.values()))})")
    click.echo(f"report: {md_path} and {json_path.name}")


def _default_eval_dir(name: str) -> Path:
    from decapflow.config import home

    return home() / "evals" / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _memory_size_study(base: Any, annotations: Path, images: Path, sizes: list, seed: int, strategies: list[str],
                       metrics: Any, split: str | None, limit: int | None, out: Path, as_json: bool) -> None:
    """``eval --bank-sizes``: the study (decapflow.evaluation.memory_size), its report, plot and per-run results files."""
    from decapflow.evaluation.evaluate import write_results
    from decapflow.evaluation.memory_size import markdown, study_annotated_images, write_study

    study, failures = study_annotated_images(base, annotations, images, sizes, seed, strategies, metrics, split,
                                             limit)
    extra = {"annotations": str(annotations), "bank": base.bank.name, "ref": base.bank_ref,
             "bank_version": base.bank.version, "tau": base.options.tau,
             "beam": base.options.beam, "skipped_images": [f.path for f in failures]}
    json_path, md_path, png_path = write_study(study, out, extra)
    for run in study.runs:
        write_results(run.captions, out / f"results_{run.strategy}_{run.size}.json")
    if as_json:
        echo_json({**study.to_dict(), **extra, "report": str(md_path), "plot": str(png_path)})
        return
    for note in study.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(markdown(study), nl=False)
    click.echo(f"(scores x100; {study.images} images; memory subsets seeded with {seed}, nested)")
    click.echo(f"report: {md_path} and {json_path.name}")
    click.echo(f"plot: {png_path}")


# ---------------------------------------------------------------------------------------------- demo
@main.command()
@click.option("--images", default=200, show_default=True, help="Held-out test images to caption.")
@click.option("--config", default="decap-small", show_default=True, help="Decoder architecture to train.")
@click.option("--epochs", default=6, show_default=True, help="Training epochs (early stopping may end sooner).")
@click.option("--max-steps", type=int, help="Cap on training steps (quick runs).")
@click.option("--retrain", is_flag=True, help="Train a new decoder even if a fitting one exists.")
@click.option("--no-meteor", is_flag=True, help="Skip METEOR (~8 s of Java start-up).")
@click.option("--threads", type=click.IntRange(min=1), help=THREADS_HELP)
@click.option("--novel", is_flag=True, help="Use a bank without the test scenes' attribute combinations: "
                                            "captions must be composed, not recalled.")
@click.option("--encoder", type=click.Choice(["world-gap", "world"]), default="world-gap", show_default=True,
              help="The world CLIP: world-gap has real CLIP's modality gap (~0.8); world, the first one, almost "
                   "none (0.08). Each has its own banks, named after it.")
@click.option("--fused", is_flag=True, help="Also train a retrieval-fused decoder (registered, not made current) "
                                            "and add its rows: fused, and rerank+fused (rerank's candidates decoded "
                                            "by it). About 5 more minutes on 2 CPU cores.")
@click.option("--check", is_flag=True, help="Exit 1 if pd's scores fall below the floors a working pipeline "
                                            "clears (CI uses this).")
@json_option
def demo(images: int, config: str, epochs: int, max_steps: int | None, retrain: bool, no_meteor: bool,
         threads: int | None, novel: bool, encoder: str, fused: bool, check: bool, as_json: bool) -> None:
    """Run the whole method offline on the synthetic world and print captions and metrics.

    Ingests the world's text corpus with its tiny CLIP (encoder 'world-gap', into bank 'world-gap'), trains a decoder text-only, captions
    held-out rendered scenes with pd, topk, nnd, vd, clipre, ms and rerank (after recording the mean embedding of
    500 unlabelled world images), and scores them (BLEU, METEOR, ROUGE-L, CIDEr, and attribute accuracy from the
    scene data). Then the memory-size study: pd, nnd and clipre against
    random subsets of 100, 1000 and 5000 bank rows and the whole bank, plotted next to the report
    (report-memory-size.png). About 7 minutes on 2 CPU cores; a second run reuses the bank and decoder.
    """
    from decapflow.lifecycle.demo import DemoSettings, format_result, run_demo

    settings = DemoSettings(images=images, config=config, epochs=epochs, max_steps=max_steps,
                            meteor=not no_meteor, retrain=retrain, threads=threads, novel=novel, encoder=encoder,
                            fused=fused)
    result = run_demo(settings, log=lambda line: click.echo(line, err=as_json))
    if as_json:
        echo_json({"table": result.table, "images_per_s": result.speeds, "examples": result.examples,
                   "timings_s": result.timings, "decoder": result.decoder, "report": str(result.report),
                   "memory_size": result.memory_size.to_dict() if result.memory_size else None,
                   "memory_plot": str(result.memory_plot) if result.memory_plot else None})
    else:
        click.echo(format_result(result))
    if check:
        failed = result.failed_floors()
        if failed:
            raise click.ClickException("below the floors: " + "; ".join(failed))
        click.echo("check: pd clears every floor", err=True)

