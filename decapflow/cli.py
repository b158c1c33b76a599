"""The ``decapflow`` command line: a thin click shell over the library (heavy imports happen inside commands)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from decapflow import __version__

EXPECTED_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, RuntimeError, KeyError)


class Group(click.Group):
    """A click group that turns expected errors (bad input, missing bank, offline weights) into one clear line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except EXPECTED_ERRORS as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise click.ClickException(str(message)) from exc


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


store_option = click.option(
    "--store", envvar="DECAPFLOW_STORE", default=None, metavar="URI",
    help="LanceDB database of the banks: a path or an object-store URI (default: $DECAPFLOW_HOME/banks).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="decapflow")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """decapflow: turn plain text into image captioners (DeCap, ICLR 2023).

    \b
    1. decapflow ingest corpus.txt --memory coco     text -> CLIP embeddings -> memory bank
    2. decapflow train --memory coco                 train a decoder on the bank, text only
    3. decapflow caption --memory coco photo.jpg     image -> projection onto the bank -> caption

    State lives under $DECAPFLOW_HOME (default ~/.decapflow). Offline? Use --encoder world, the tiny CLIP
    trained on decapflow's synthetic world, or a local CONFIG.json:WEIGHTS checkpoint.
    """
    ctx.ensure_object(dict)["debug"] = debug


# ---------------------------------------------------------------------------------------------- ingest
@main.command()
@click.argument("corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--memory", "-m", help="Bank name (letters, digits, -, _). Default: the corpus file's stem.")
@click.option("--encoder", "-e", metavar="SPEC",
              help="CLIP encoder: NAME:PRETRAINED (default ViT-B-32:openai), hf-hub:ORG/REPO, "
                   "CONFIG.json:WEIGHTS, or 'world'. An existing bank uses its own encoder.")
@click.option("--format", "fmt", type=click.Choice(["txt", "jsonl", "csv", "tsv", "coco", "parquet"]),
              help="Corpus format (default: from the suffix; .gz is read transparently).")
@click.option("--field", help="jsonl field / csv column holding the text (default: caption, then text).")
@click.option("--errors", type=click.Choice(["replace", "skip"]), default="replace", show_default=True,
              help="Lines with invalid UTF-8: replace bad bytes with U+FFFD, or skip the line.")
@click.option("--chunk-size", default=4096, show_default=True, help="Sentences per committed chunk.")
@click.option("--batch-size", default=256, show_default=True, help="Sentences per encoder batch.")
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present).")
@click.option("--prefect", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Run as a Prefect flow (tasks, retries, run history): 'auto' when PREFECT_API_URL answers, "
                   "'on' always (a temporary local server when none is configured, ~8 s), 'off' never.")
@store_option
@json_option
def ingest(corpus: Path, memory: str | None, encoder: str | None, fmt: str | None, field: str | None,
           errors: str, chunk_size: int, batch_size: int, device: str | None, prefect: str,
           store: str | None, as_json: bool) -> None:
    """Ingest a text corpus into a memory bank.

    CORPUS is .txt (a sentence per line), .jsonl, .csv/.tsv, COCO captions .json or .parquet, optionally
    gzipped. Sentences are cleaned, deduplicated by content hash and embedded with the bank's CLIP encoder.
    Running it again adds only what is new; a killed ingest resumes where its last chunk was committed.

    \b
    Example (offline):  decapflow ingest corpora/world/corpus.txt.gz --memory world --encoder world
    """
    kwargs = dict(memory=memory, encoder=encoder, store=store, chunk_size=chunk_size, batch_size=batch_size,
                  fmt=fmt, field=field, errors=errors, device=device, progress=not as_json)
    report, overhead = run_maybe_in_prefect("ingest", prefect, path=str(corpus), **kwargs)
    if as_json:
        echo_json({**report, "prefect_seconds": overhead})
        return
    from decapflow.ingest import IngestReport

    click.echo(IngestReport(**report).summary())
    if overhead is not None:
        click.echo(f"prefect: flow run took {overhead:.1f} s beyond the work itself")


def run_maybe_in_prefect(flow: str, mode: str, **kwargs: Any) -> tuple[dict[str, Any], float | None]:
    """Run a flow through Prefect, or its library function in-process (see flows/prefect_env.py for ``mode``).

    Returns (result, seconds Prefect added beyond the work itself, or None when it did not run)."""
    from flows import prefect_env

    api, reason = prefect_env.configure(mode)
    if api is None:
        if mode == "auto":
            click.echo(f"prefect: {reason}; running in-process (--prefect on runs a flow)", err=True)
        return LIBRARY_RUNNERS[flow](**kwargs), None
    click.echo(f"prefect: running flow {flow!r} on {reason}", err=True)
    start = time.perf_counter()
    result = flow_function(flow)(**kwargs)
    total = time.perf_counter() - start
    return result, max(0.0, total - float(result.get("seconds", 0.0)))


def _ingest_in_process(path: str, **kwargs: Any) -> dict[str, Any]:
    from decapflow.ingest import run_ingest

    return run_ingest(Path(path), **kwargs).to_dict()


def _train_in_process(**kwargs: Any) -> dict[str, Any]:
    from decapflow.decoder.train import train_bank

    return train_bank(**kwargs)


LIBRARY_RUNNERS = {"ingest": _ingest_in_process, "train": _train_in_process}


def flow_function(flow: str) -> Any:
    if flow == "ingest":
        from flows.ingest import ingest_flow

        return ingest_flow
    if flow == "train":
        from flows.train import train_flow

        return train_flow
    raise KeyError(f"unknown flow {flow!r}")


# ---------------------------------------------------------------------------------------------- train
@main.command()
@click.option("--memory", "-m", required=True, help="The bank whose sentences the decoder learns.")
@click.option("--config", default="decap-small", show_default=True,
              help="Decoder architecture: decap-base (the paper's: 4 layers, width 768), decap-small, tiny, "
                   "or a JSON file.")
@click.option("--epochs", type=int, help="Passes over the bank (default 10).")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=int, help="Sentences per step (default 64; the paper: 128).")
@click.option("--lr", type=float, help="Peak learning rate (default 1e-3; the paper's recipe uses 1e-5).")
@click.option("--paper", is_flag=True, help="The paper's recipe: lr 1e-5, 1,000 warm-up steps, 10 epochs, "
                                            "no early stopping (for COCO-sized banks on a GPU).")
@click.option("--noise", type=float, default=0.0, show_default=True,
              help="Std of Gaussian noise on the prefix during training (CapDec-style); 0 = off.")
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present; bf16 autocast on CUDA).")
@click.option("--threads", type=int, help="CPU threads for torch (on 2 busy cores 1 can beat 2).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same data: same decoder.")
@click.option("--resume", is_flag=True, help="Continue the bank's latest training run from its last epoch.")
@click.option("--prefect", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Run as a Prefect flow: 'auto' when PREFECT_API_URL answers, 'on' always, 'off' never.")
@store_option
@json_option
def train(memory: str, config: str, epochs: int | None, max_steps: int | None, batch_size: int | None,
          lr: float | None, paper: bool, noise: float, device: str | None, threads: int | None, seed: int,
          resume: bool, prefect: str, store: str | None, as_json: bool) -> None:
    """Train a DeCap decoder on a memory bank, text only, and make it the bank's current decoder.

    The decoder learns to rebuild each sentence from its stored CLIP embedding (no CLIP needed). Defaults suit
    a CPU and a bank of ~20k short sentences (decap-small, lr 1e-3, early stopping: minutes); for COCO-sized
    banks on a GPU use --config decap-base --paper. Per-epoch metrics (JSON lines), a loss plot and
    checkpoints go to $DECAPFLOW_HOME/runs/BANK/.

    \b
    Example:  decapflow train --memory world --epochs 5
    """
    from decapflow.decoder.train import TrainRecipe

    base = TrainRecipe.paper() if paper else TrainRecipe()
    overrides = {k: v for k, v in {"epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "lr": lr,
                                   "device": device, "num_threads": threads}.items() if v is not None}
    recipe = {**base.to_dict(), **overrides, "seed": seed, "noise_std": noise}
    result, overhead = run_maybe_in_prefect("train", prefect, bank=memory, config=config, recipe=recipe,
                                            store=store, resume=resume, progress=not as_json)
    if as_json:
        echo_json({**result, "prefect_seconds": overhead})
        return
    last = result["history"][-1] if result["history"] else {}
    click.echo(f"decoder {result['decoder']} is now current for bank {memory!r}: best epoch {result['best_epoch']}, "
               f"val loss {result['best_val_loss']:.3f}, val token accuracy {last.get('val_acc', float('nan')):.3f}, "
               f"{result['steps']} steps in {result['seconds']:.0f} s")


@main.group(cls=Group)
def decoder() -> None:
    """List, import and choose the decoders of a memory bank."""


@decoder.command("list")
@click.argument("memory")
@json_option
def decoder_list(memory: str, as_json: bool) -> None:
    """The decoders trained or imported for bank MEMORY (the current one is marked *)."""
    from decapflow.decoder.checkpoint import list_decoders

    rows = list_decoders(memory)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"bank {memory!r} has no decoder yet; train one with: decapflow train --memory {memory}")
    for r in rows:
        metrics = r.get("metrics") or {}
        loss = metrics.get("val_loss")
        click.echo(f"{'*' if r['current'] else ' '} {r['id']}  bank v{r.get('bank_version', '?')}  "
                   f"{r.get('config', r.get('source', ''))}  val loss {loss if loss is None else round(loss, 3)}")


@decoder.command("use")
@click.argument("memory")
@click.argument("decoder_id")
def decoder_use(memory: str, decoder_id: str) -> None:
    """Make DECODER_ID the current decoder of bank MEMORY."""
    from decapflow.decoder.checkpoint import set_current

    set_current(memory, decoder_id)
    click.echo(f"bank {memory!r} now captions with decoder {decoder_id}")


@decoder.command("import")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--memory", "-m", required=True, help="The bank to register it with.")
@click.option("--encoder", default="ViT-B-32:openai", show_default=True,
              help="The CLIP the checkpoint was trained with (must match the bank's).")
@store_option
def decoder_import(checkpoint: Path, memory: str, encoder: str, store: str | None) -> None:
    """Import an official DeCap checkpoint (a torch.save'd state_dict, loaded with weights_only=True)."""
    from decapflow.decoder.checkpoint import import_official, register
    from decapflow.memory import Registry

    registry = Registry(store)
    if registry.exists(memory):
        registry.open(memory).check_encoder(encoder)
    model, vocab, meta = import_official(checkpoint)
    decoder_id = register(memory, model, vocab, {**meta, "encoder": encoder, "bank": memory})
    click.echo(f"imported {checkpoint.name} as decoder {decoder_id} of bank {memory!r} (now current)")


# ---------------------------------------------------------------------------------------------- caption
@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--memory", "-m", required=True, help="The bank to project onto (and whose decoder to use).")
@click.option("--strategy", type=click.Choice(["pd", "topk", "nnd", "vd", "clipre"]), default="pd",
              show_default=True,
              help="pd: projection onto the bank (DeCap); topk: projection onto the k nearest rows (large banks); "
                   "nnd: nearest bank embedding; vd: the raw image embedding; clipre: the nearest bank sentence.")
@click.option("--tau", default=0.01, show_default=True, help="Projection temperature.")
@click.option("--k", default=64, show_default=True, help="Neighbours for --strategy topk.")
@click.option("--beam", default=1, show_default=True, help="Beam width (1 = greedy).")
@click.option("--max-len", default=30, show_default=True, help="Maximum caption tokens.")
@click.option("--decoder", "decoder_id", help="A decoder id of the bank or a checkpoint folder (default: current).")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl", "coco"]), default="text", show_default=True,
              help="text: path<TAB>caption; jsonl: with the supporting bank sentences; coco: results JSON.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write here, not stdout.")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="COCO annotations: image ids for --format coco come from its file names.")
@click.option("--batch-size", default=64, show_default=True, help="Images per batch.")
@click.option("--device", help="cpu, cuda ... (default: cuda when present).")
@store_option
def caption(images: tuple[str, ...], memory: str, strategy: str, tau: float, k: int, beam: int, max_len: int,
            decoder_id: str | None, fmt: str, output: Path | None, annotations: Path | None, batch_size: int,
            device: str | None, store: str | None) -> None:
    """Caption IMAGES (files, folders, globs) against memory bank MEMORY.

    Unreadable or oversized images are reported and skipped; the exit code is then 3.

    \b
    Example:  decapflow caption --memory world photos/ --format jsonl
    """
    from decapflow.captioner import Captioner, Options, caption_paths
    from decapflow.images import collect_paths
    from decapflow.results import render

    paths = collect_paths(images)
    if not paths:
        raise click.ClickException("no images found")
    options = Options(strategy=strategy, tau=tau, k=k, beam=beam, max_len=max_len, batch_size=batch_size)
    captioner = Captioner.for_bank(memory, options, decoder=decoder_id, store=store, device=device)
    captions, failures = caption_paths(captioner, paths, progress=output is not None or len(paths) > batch_size)
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
@main.command("eval")
@click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="References: COCO captions JSON, or Karpathy's dataset_coco.json with --split.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of the annotated images: caption them with --memory, then score.")
@click.option("--results", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Score an existing COCO results file ([{image_id, caption}]) instead of captioning.")
@click.option("--memory", "-m", help="Bank (and its current decoder) for --images.")
@click.option("--strategy", type=click.Choice(["pd", "topk", "nnd", "vd", "clipre"]), default="pd",
              show_default=True, help="Strategy for --images.")
@click.option("--compare-strategies", is_flag=True, help="Run pd, topk, nnd, vd and clipre on the same images.")
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
                     strategy: str, compare_strategies: bool, split: str | None, limit: int | None, tau: float,
                     beam: int, no_meteor: bool, output_dir: Path | None, device: str | None, store: str | None,
                     as_json: bool) -> None:
    """Score captions against COCO-style references: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when its
    Java models are installed).

    \b
    Score a results file:      decapflow eval --annotations captions_val2014.json --results res.json
    Caption and score a set:   decapflow eval --annotations ann.json --images val2014/ --memory coco
    Compare the strategies:    ... --compare-strategies

    The paper's COCO Karpathy-test recipe is in the README ("Reproducing the paper").
    """
    from decapflow.evaluate import (
        METRIC_KEYS,
        load_coco_references,
        load_results,
        markdown_table,
        score_captions,
        write_report,
        write_results,
    )

    metrics = ("bleu", "rouge", "cider") if no_meteor else None
    if results is not None:
        references, _ = load_coco_references(annotations, split=split)
        table = {results.stem: score_captions(references, load_results(results), metrics=metrics)}
        extra: dict[str, Any] = {"annotations": str(annotations), "results": str(results)}
    else:
        if images is None or memory is None:
            raise click.UsageError("give --results FILE, or --images DIR with --memory NAME")
        from decapflow.captioner import Captioner, Options
        from decapflow.experiment import run_strategies, speeds

        strategies = ["pd", "topk", "nnd", "vd", "clipre"] if compare_strategies else [strategy]
        base = Captioner.for_bank(memory, Options(strategy=strategies[0], tau=tau, beam=beam), store=store,
                                  device=device)
        experiment = run_strategies(base, annotations, images, strategies, metrics=metrics, split=split,
                                    limit=limit)
        table = experiment.table()
        extra = {"annotations": str(annotations), "images": len(experiment.image_ids), "bank": memory,
                 "bank_version": base.bank.version, "decoder": base.decoder_path.name if base.decoder_path else None,
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


# ---------------------------------------------------------------------------------------------- demo
@main.command()
@click.option("--images", default=200, show_default=True, help="Held-out test images to caption.")
@click.option("--config", default="decap-small", show_default=True, help="Decoder architecture to train.")
@click.option("--epochs", default=6, show_default=True, help="Training epochs (early stopping may end sooner).")
@click.option("--max-steps", type=int, help="Cap on training steps (quick runs).")
@click.option("--retrain", is_flag=True, help="Train a new decoder even if a fitting one exists.")
@click.option("--no-meteor", is_flag=True, help="Skip METEOR (~8 s of Java start-up).")
@click.option("--threads", type=int, help="torch CPU threads for training.")
@click.option("--novel", is_flag=True, help="Use a bank without the test scenes' attribute combinations: "
                                            "captions must be composed, not recalled.")
@click.option("--check", is_flag=True, help="Exit 1 if pd's scores fall below the floors a working pipeline "
                                            "clears (CI uses this).")
@json_option
def demo(images: int, config: str, epochs: int, max_steps: int | None, retrain: bool, no_meteor: bool,
         threads: int | None, novel: bool, check: bool, as_json: bool) -> None:
    """Run the whole method offline on the synthetic world and print captions and metrics.

    Ingests the world's text corpus with its tiny CLIP (encoder 'world'), trains a decoder text-only, captions
    held-out rendered scenes with pd, topk, nnd, vd and clipre, and scores them (BLEU, METEOR, ROUGE-L, CIDEr,
    and attribute accuracy from the scene data). About 7 minutes on 2 CPU cores; a second run reuses the
    bank and decoder.
    """
    from decapflow.demo import DemoSettings, format_result, run_demo

    settings = DemoSettings(images=images, config=config, epochs=epochs, max_steps=max_steps,
                            meteor=not no_meteor, retrain=retrain, threads=threads, novel=novel)
    result = run_demo(settings, log=lambda line: click.echo(line, err=as_json))
    if as_json:
        echo_json({"table": result.table, "images_per_s": result.speeds, "examples": result.examples,
                   "timings_s": result.timings, "decoder": result.decoder, "report": str(result.report)})
    else:
        click.echo(format_result(result))
    if check:
        failed = result.failed_floors()
        if failed:
            raise click.ClickException("below the floors: " + "; ".join(failed))
        click.echo("check: pd clears every floor", err=True)


# ---------------------------------------------------------------------------------------------- memory
@main.group(cls=Group)
def memory() -> None:
    """List, inspect, search, export and delete memory banks."""


@memory.command("list")
@store_option
@json_option
def memory_list(store: str | None, as_json: bool) -> None:
    """List the memory banks with their size and encoder."""
    from decapflow.memory import Registry

    registry = Registry(store)
    banks = [registry.open(name) for name in registry.names()]
    rows = [{"name": b.name, "rows": len(b), "encoder": b.encoder, "dim": b.dim, "version": b.version}
            for b in banks]
    if as_json:
        echo_json(rows)
    elif not rows:
        click.echo(f"no memory banks in {registry.uri} yet; create one with: decapflow ingest CORPUS --memory NAME")
    else:
        for r in rows:
            click.echo(f"{r['name']:<24} {r['rows']:>10} rows  v{r['version']:<5} {r['encoder']} ({r['dim']}-d)")


@memory.command("show")
@click.argument("name")
@store_option
@json_option
def memory_show(name: str, store: str | None, as_json: bool) -> None:
    """Describe a bank: rows, encoder, size on disk, ingests and versions."""
    from decapflow.memory import Registry

    info = Registry(store).open(name).describe()
    if as_json:
        echo_json(info)
        return
    click.echo(f"bank      {info['name']}\nrows      {info['rows']}\nencoder   {info['encoder']} ({info['dim']}-d)")
    click.echo(f"on disk   {human_bytes(info['size_bytes'])}\ncreated   {info['created']}\nupdated   {info['updated']}")
    click.echo(f"version   {info['version']}")
    click.echo("ingests:")
    for i in info["ingests"]:
        click.echo(f"  {i['time']}  {i['rows']:>9} rows  from {i['source']}")
    click.echo("versions:")
    for v in info["versions"]:
        click.echo(f"  v{v['version']:<5} {v['time']}  {v['rows']:>9} rows")


@memory.command("search")
@click.argument("name")
@click.argument("query")
@click.option("-k", default=10, show_default=True, help="How many sentences.")
@click.option("--device", help="Device for the query encoder.")
@store_option
@json_option
def memory_search(name: str, query: str, k: int, device: str | None, store: str | None, as_json: bool) -> None:
    """Show the bank's sentences nearest to QUERY (embedded with the bank's encoder)."""
    from decapflow.encoders import load_encoder
    from decapflow.memory import Registry

    bank = Registry(store).open(name)
    vector = load_encoder(bank.encoder, device).encode_text([query])[0]
    hits = bank.search(vector, k)
    if as_json:
        echo_json([{"text": h.text, "score": round(h.score, 4), "row": h.row} for h in hits])
    else:
        for h in hits:
            click.echo(f"{h.score:.3f}  {h.text}")


@memory.command("export")
@click.argument("name")
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@store_option
def memory_export(name: str, output: Path, store: str | None) -> None:
    """Write a bank to OUTPUT: .jsonl (hash, text, source), .txt (texts) or .parquet (with vectors)."""
    from decapflow.memory import Registry

    n = Registry(store).open(name).export(output)
    click.echo(f"wrote {n} rows to {output}")


@memory.command("rm")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Delete without asking.")
@store_option
def memory_rm(name: str, yes: bool, store: str | None) -> None:
    """Delete a bank and all its versions (asks for confirmation unless --yes)."""
    from decapflow.memory import Registry

    registry = Registry(store)
    bank = registry.open(name)
    if not yes:
        click.confirm(f"Delete bank {name!r} ({len(bank)} rows, all versions)?", abort=True)
    registry.delete(name)
    click.echo(f"deleted bank {name!r}")


if __name__ == "__main__":
    main()
