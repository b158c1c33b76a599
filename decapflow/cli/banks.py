"""Commands for memory banks: ``ingest`` and ``memory list|show|search|export|rm``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from decapflow.cli.base import Group, echo_json, human_bytes, json_option, main, store_option


# ---------------------------------------------------------------------------------------------- ingest
@main.command()
@click.argument("corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--memory", "-m", help="Bank name (letters, digits, -, _). Default: the corpus file's stem. A plain "
                                     "name: ingest writes the newest version, never BANK@TAG or BANK@vN.")
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
@click.option("--workers", type=click.IntRange(min=1), metavar="N",
              help="Embed on a local Dask cluster of N single-threaded worker processes (commits stay in order).")
@click.option("--cluster", metavar="ADDRESS",
              help="Embed on a running Dask cluster (tcp://scheduler:8786); one worker per GPU works best.")
@click.option("--prefect", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Run as a Prefect flow (tasks, retries, run history): 'auto' when PREFECT_API_URL answers, "
                   "'on' always (a temporary local server when none is configured, ~8 s), 'off' never. "
                   "With --workers/--cluster the flow embeds through prefect-dask's DaskTaskRunner.")
@store_option
@json_option
def ingest(corpus: Path, memory: str | None, encoder: str | None, fmt: str | None, field: str | None,
           errors: str, chunk_size: int, batch_size: int, device: str | None, workers: int | None,
           cluster: str | None, prefect: str, store: str | None, as_json: bool) -> None:
    """Ingest a text corpus into a memory bank.

    CORPUS is .txt (a sentence per line), .jsonl, .csv/.tsv, COCO captions .json or .parquet, optionally
    gzipped. Sentences are cleaned, deduplicated by content hash and embedded with the bank's CLIP encoder.
    Running it again adds only what is new; a killed ingest resumes where its last chunk was committed.

    \b
    Example (offline):  decapflow ingest corpora/world/corpus.txt.gz --memory world --encoder world
    On a Dask cluster:  decapflow ingest big.txt --memory big --cluster tcp://scheduler:8786 --device cuda
    """
    if workers and cluster:
        raise click.UsageError("--workers starts a local cluster; --cluster names a running one: give one")
    if memory:
        from decapflow.bank.refs import writable

        writable(memory, "ingest")  # before a Prefect run starts: BANK@TAG / BANK@vN are read-only
    kwargs = dict(memory=memory, encoder=encoder, store=store, chunk_size=chunk_size, batch_size=batch_size,
                  fmt=fmt, field=field, errors=errors, device=device, progress=not as_json, workers=workers,
                  cluster=cluster)
    report, overhead = run_maybe_in_prefect("ingest", prefect, path=str(corpus), **kwargs)
    if as_json:
        echo_json({**report, "prefect_seconds": overhead})
        return
    from decapflow.bank.ingest import IngestReport

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
    result = flow_function(flow, kwargs.get("workers"), kwargs.get("cluster"))(**kwargs)
    total = time.perf_counter() - start
    return result, max(0.0, total - float(result.get("seconds", 0.0)))


def _ingest_in_process(path: str, **kwargs: Any) -> dict[str, Any]:
    from decapflow.bank.ingest import run_ingest

    return run_ingest(Path(path), **kwargs).to_dict()


def _train_in_process(**kwargs: Any) -> dict[str, Any]:
    from decapflow.lifecycle.training import train_bank

    return train_bank(**kwargs)


LIBRARY_RUNNERS = {"ingest": _ingest_in_process, "train": _train_in_process}


def flow_function(flow: str, workers: int | None = None, cluster: str | None = None) -> Any:
    if flow == "ingest":
        from flows.ingest import dask_ingest_flow, ingest_flow

        return ingest_flow if not (workers or cluster) else dask_ingest_flow(workers, cluster)
    if flow == "train":
        from flows.train import train_flow

        return train_flow
    raise KeyError(f"unknown flow {flow!r}")


# ---------------------------------------------------------------------------------------------- memory
@main.group(cls=Group)
def memory() -> None:
    """List, inspect, search, curate (remove, restore, tag, clone, maintain), export and delete memory banks."""


@memory.command("list")
@store_option
@json_option
def memory_list(store: str | None, as_json: bool) -> None:
    """List the memory banks with their size and encoder."""
    from decapflow.bank.memory import Registry

    registry = Registry(store)
    rows = [registry.open(name).summary() for name in registry.names()]
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
    """Describe a bank (NAME, or NAME@TAG / NAME@vN at that version): rows, encoder, size on disk, ingests and
    versions, and whether it needs 'decapflow memory maintain' (small fragments, unindexed rows, old versions)."""
    from decapflow.bank.maintenance import health
    from decapflow.bank.memory import Registry

    opened = Registry(store).open(name)
    info = {**opened.describe(), "ref": str(opened.ref), "health": health(opened)}
    if as_json:
        echo_json(info)
        return
    click.echo(f"bank      {info['ref']}\nrows      {info['rows']}\nencoder   {info['encoder']} ({info['dim']}-d)")
    click.echo(f"on disk   {human_bytes(info['size_bytes'])}\ncreated   {info['created']}\nupdated   {info['updated']}")
    click.echo(f"version   {info['version']}")
    needs = info["health"]["needs"]
    where = f" --store {store}" if store else ""
    click.echo(f"maintenance needed: decapflow memory maintain {opened.name}{where}" if needs else "maintenance fine")
    for reason in needs:
        click.echo(f"  - {reason}")
    click.echo("ingests:")
    for i in info["ingests"]:
        click.echo(f"  {i['time']}  {i['rows']:>9} rows  from {i['source']}")
    click.echo("versions:")
    pins = {}
    for tag, version in info["tags"].items():
        pins.setdefault(version, []).append(f"clone {tag[7:]}" if tag.startswith("_clone-") else f"@{tag}")
    for v in info["versions"]:
        change = v.get("change") or {}
        made = f"{change.get('op', '')} {change.get('source', '')}".strip()
        click.echo(f"  v{v['version']:<5} {v['time']}  {v['rows']:>9} rows  {made or '-':<24} "
                   f"{' '.join(pins.get(v['version'], []))}".rstrip())
    click.echo(f"(what made each change: decapflow memory history {opened.name})")


@memory.command("search")
@click.argument("name")
@click.argument("query")
@click.option("-k", default=10, show_default=True, help="How many sentences.")
@click.option("--device", help="Device for the query encoder.")
@store_option
@json_option
def memory_search(name: str, query: str, k: int, device: str | None, store: str | None, as_json: bool) -> None:
    """Show the bank's sentences nearest to QUERY (embedded with the bank's encoder). NAME may pin a version:
    NAME@TAG or NAME@vN."""
    from decapflow.bank.memory import Registry
    from decapflow.encoders import load_encoder

    bank = Registry(store).open(name)
    if bank.pinned:
        click.echo(f"bank {bank.ref}: version {bank.version}", err=True)
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
    """Write a bank (NAME, or NAME@TAG / NAME@vN at that version) to OUTPUT: .jsonl (hash, text, source), .txt
    (texts) or .parquet (with vectors)."""
    from decapflow.bank.memory import Registry

    bank = Registry(store).open(name)
    n = bank.export(output)
    click.echo(f"wrote {n} rows of bank {bank.ref} (version {bank.version}) to {output}")


@memory.command("rm")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Delete without asking.")
@store_option
def memory_rm(name: str, yes: bool, store: str | None) -> None:
    """Delete a bank with all its versions, its decoders and its evaluation sets (asks unless --yes)."""
    from decapflow.bank.memory import Registry
    from decapflow.decoder.registry import list_decoders
    from decapflow.lifecycle.deletion import delete_bank

    registry = Registry(store)
    bank = registry.open(name)
    if not yes:
        click.confirm(f"Delete bank {name!r} ({len(bank)} rows, all versions) and its "
                      f"{len(list_decoders(name, store))} decoder(s)?", abort=True)
    gone = delete_bank(name, registry.store)
    click.echo(f"deleted bank {name!r}: {gone['rows']} rows, {gone['decoders']} decoder(s), "
               f"{gone['eval_sets']} evaluation set(s)")


@memory.command("index")
@click.argument("name")
@click.option("--kind", type=click.Choice(["ivf_flat", "ivf_pq"]), default="ivf_flat", show_default=True,
              help="LanceDB's index: ivf_flat: full vectors per partition, exact distances within the probed partitions "
                   "(the one that works for image queries; a second copy of the vectors on disk); ivf_pq: ~16x smaller, "
                   "but its compressed distances miss most neighbours of image queries (recall@64 0.2-0.75, measured).")
@click.option("--partitions", type=click.IntRange(min=1), help="IVF partitions of both indexes (default: sqrt(rows), "
                                                                 "at most 4096 for LanceDB's).")
@click.option("--iterations", type=click.IntRange(min=1), default=10, show_default=True,
              help="k-means rounds (LanceDB's index).")
@click.option("--sample-rate", type=click.IntRange(min=2), default=64, show_default=True,
              help="Rows sampled per partition to train LanceDB's k-means.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Train LanceDB's k-means on this device.")
@store_option
def memory_index(name: str, kind: str, partitions: int | None, iterations: int, sample_rate: int, device: str,
                 store: str | None) -> None:
    """Build bank NAME's indexes, used by --strategy topk and fused decoders on banks of 200k rows or more.

    Two indexes: LanceDB's, kept with the bank, and the in-process IVF over the bank's local vector copy (beside
    it, per bank version) that topk and fused search (10-30x faster than exact pd at 1M rows). Without them the
    first topk caption builds the IVF (seconds to minutes on millions of rows), and 'auto' takes the exact top-k
    (LanceDB's index while the bank has one but this version has no IVF). Rebuild after ingests and removals: a
    new version's IVF is built on first use by --strategy topk, reusing the earlier centroids.

    \b
    Example:  decapflow memory index bookcorpus --partitions 2048
    """
    from decapflow.bank.memory import Registry
    from decapflow.bank.refs import writable
    from decapflow.caption.captioner import bank_precision

    bank = Registry(store).open(writable(name, "memory index"))
    start = time.perf_counter()
    bank.build_index(kind, partitions=partitions, iterations=iterations, sample_rate=sample_rate,
                     accelerator="cuda" if device == "cuda" else None)
    click.echo(f"bank {name!r}: {kind} index over {len(bank):,} rows built in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    index = bank.build_ivf(bank_precision(bank), partitions=partitions, reuse=False, rebuild=True)  # its new version
    click.echo(f"bank {name!r}: in-process IVF ({index.partitions:,} partitions) of version {bank.version} built in "
               f"{time.perf_counter() - start:.1f} s")


@memory.command("eval-set")
@click.argument("name")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A COCO caption file (or Karpathy split file) of images to score decoders on.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The folder holding the annotated images (they are copied into the store).")
@click.option("--split", help="With a Karpathy file: the split to use (test, val, ...).")
@store_option
@json_option
def memory_eval_set(name: str, annotations: Path | None, images: Path | None, split: str | None,
                    store: str | None, as_json: bool) -> None:
    """Show bank NAME's evaluation sets, or add an annotated image set that gates its decoders.

    Every bank has a text set (held-out sentences, chosen when its first decoder is trained); with --annotations
    and --images the decoders are also scored by captioning those images with projection decoding (CIDEr), and
    the gate uses that score (decapflow train --gate, the retraining flows).

    \b
    Examples: decapflow memory eval-set coco
              decapflow memory eval-set coco --annotations captions_val2014.json --images val2014/
    """
    from decapflow.bank.memory import Registry
    from decapflow.bank.refs import writable
    from decapflow.lifecycle.gate import add_image_eval_set, eval_sets, text_eval_set

    bank = Registry(store).open(writable(name, "memory eval-set"))
    if bool(annotations) != bool(images):
        raise click.UsageError("--annotations and --images go together")
    if annotations and images:
        added = add_image_eval_set(bank, annotations, images, store, split)
        click.echo(f"bank {name!r}: added image evaluation set {added.id} ({added.info['images']} images, "
                   f"{added.info['captions']} captions)", err=as_json)
    else:
        text_eval_set(bank, store)
    sets = [s.describe() for s in eval_sets(name, store)]
    if as_json:
        echo_json(sets)
        return
    for s in sets:
        what = f"{s['size']} held-out sentences" if s["held_out"] else f"{s['size']} bank sentences (not held out)"
        click.echo(f"{s['id']:<28} {s['kind']:<7} {what if s['kind'] == 'text' else str(s['size']) + ' images'}  "
                   f"created {s['created']} at bank v{s['bank_version']}")


@memory.command("image-mean")
@click.argument("name")
@click.option("--images", required=True, multiple=True,
              help="Images of the kind you caption (files, folders, globs; no captions needed). Repeatable.")
@click.option("--limit", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Use at most this many (the first, sorted); the mean settles after a few hundred.")
@click.option("--device", help="cpu, cuda ...")
@store_option
def memory_image_mean(name: str, images: tuple[str, ...], limit: int, device: str | None, store: str | None) -> None:
    """Record the mean CLIP embedding of images of bank NAME's domain, for --strategy ms and rerank (and auto,
    the default, which then runs rerank); up to 300 of the images are kept as the gate's domain set.

    CLIP's images and texts lie in two cones (the modality gap); mean-shift (ms) moves an image by the offset
    between the image mean recorded here and the bank's text mean, and rerank uses that as one of its candidates.

    \b
    Example: decapflow memory image-mean coco --images train2014/ --limit 2000
    """
    from decapflow.bank.memory import Registry
    from decapflow.bank.refs import writable
    from decapflow.caption.images import ImageFailure, collect_paths, load_image
    from decapflow.caption.modality import record_image_mean
    from decapflow.encoders import load_encoder
    from decapflow.lifecycle.gate import add_domain_eval_set

    bank = Registry(store).open(writable(name, "memory image-mean"))
    paths = collect_paths(images)[:limit]
    loaded = [load_image(p) for p in paths]
    good = [im for im in loaded if not isinstance(im, ImageFailure)]
    for failure in (im for im in loaded if isinstance(im, ImageFailure)):
        click.echo(f"skipped {failure.path}: {failure.reason}", err=True)
    if not good:
        raise click.ClickException("no readable images")
    mean, gap, vectors = record_image_mean(bank, load_encoder(bank.encoder, device), good, ", ".join(images), store)
    domain = add_domain_eval_set(bank, vectors, ", ".join(images), store)
    click.echo(f"bank {name!r}: mean image embedding of {mean.images} images recorded; modality gap "
               f"|mu_img - mu_txt| = {gap:.3f}. Captions now default to --strategy rerank, and the gate scores "
               f"challengers on {domain.info['images']} of these images (CLIPScore, set {domain.id}) unless the bank "
               f"has an annotated image set.")


@memory.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--memory", "-m", required=True, help="The bank to import into (created when new).")
@click.option("--encoder", "-e", metavar="SPEC",
              help="The CLIP encoder that made the embeddings (required for a new bank; an existing bank refuses "
                   "any other than its own).")
@click.option("--text-field", help="Parquet column of the texts (default: caption, then text).")
@click.option("--vector-field", help="Parquet column of the vectors (default: vector, then embedding).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=16_384, show_default=True,
              help="Rows per committed chunk.")
@store_option
@json_option
def memory_import(source: Path, memory: str, encoder: str | None, text_field: str | None,
                  vector_field: str | None, chunk_size: int, store: str | None, as_json: bool) -> None:
    """Import precomputed text embeddings (no encoder run): a parquet file or folder with text and vector
    columns, or clip-retrieval's output folder (text_emb/text_emb_<i>.npy + metadata/metadata_<i>.parquet).

    Texts are cleaned and deduplicated like ingest; vectors are checked against the bank's dimension and
    stored as float32 unit vectors. Re-running imports only what is new.

    \b
    Example:  decapflow memory import clip_out/ --memory cc3m --encoder ViT-B-32:openai
    """
    from decapflow.bank.importer import run_import
    from decapflow.bank.refs import writable

    writable(memory, "memory import")
    report = run_import(source, memory, encoder, store, text_field=text_field, vector_field=vector_field,
                        chunk_size=chunk_size, progress=not as_json)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(report.summary())
