"""Commands that curate a bank: ``memory history|remove|restore|tag|clone``."""

from __future__ import annotations

from pathlib import Path

import click

from decapflow.cli.banks import memory
from decapflow.cli.base import echo_json, json_option, store_option


@memory.command("history")
@click.argument("name")
@click.option("--limit", type=click.IntRange(min=1), help="Show only the newest N changes.")
@click.option("--all", "everything", is_flag=True,
              help="Also the changes of earlier banks of the same name (before a 'memory rm').")
@store_option
@json_option
def memory_history(name: str, limit: int | None, everything: bool, store: str | None, as_json: bool) -> None:
    """Every change to bank NAME, oldest first: what made it (ingest of which file and its SHA-256, import,
    remove, purge, restore, clone, tag, maintain), the versions it made, rows added and removed, when, by which
    user on which host, in which Prefect flow run.

    \b
    Example:  decapflow memory history coco --limit 20
    """
    from decapflow.bank.history import history
    from decapflow.bank.refs import BankRef
    from decapflow.bank.store import get_store

    entries = history(get_store(store), BankRef.parse(name).name, current=not everything)
    if not entries:
        raise click.ClickException(f"bank {name!r} has no recorded history in this store")
    entries = entries[-limit:] if limit else entries
    if as_json:
        echo_json(entries)
        return
    for e in entries:
        versions = f"v{e['version']}" if e["version_from"] == e["version"] else f"v{e['version_from']}-v{e['version']}"
        rows = " ".join(x for x in (f"+{e['rows_added']:,}" if e["rows_added"] else "",
                                    f"-{e['rows_removed']:,}" if e["rows_removed"] else "") if x) or "±0"
        click.echo(f"{e['time'][:19]}Z  {e['op']:<8} {versions:<11} {rows:>16} -> {e['rows']:>10,} rows  "
                   f"{_what(e)}  by {e['user']}@{e['host']}" + (f"  flow run {e['flow_run']}" if e["flow_run"] else ""))


def _what(entry: dict) -> str:
    """One entry's own details, for a person."""
    d, op = entry["details"], entry["op"]
    if op in ("ingest", "import"):
        commits = f" in {entry['commits']} commits" if entry["commits"] > 1 else ""
        return f"from {entry['source'] or '?'}{' ' + entry['content_hash'][:19] if entry['content_hash'] else ''}{commits}"
    if op == "remove":
        stale = {k: v for k, v in (d.get("stale") or {}).items() if v}
        return ("where " + ", ".join(f"{k} {v!r}" for k, v in (d.get("criteria") or {}).items())
                + (f" (stale decoders: {len(stale)})" if stale else ""))
    if op == "restore":
        return f"to v{d.get('restored')}" + (f" (tag {d['tag']})" if d.get("tag") else "")
    if op == "tag":
        return f"tag {d.get('tag')} {d.get('action', '')}" + (f" (was v{d['previous']})" if d.get("previous") else "")
    if op == "clone":
        return f"cloned from {d.get('source')} v{d.get('source_version')}"
    if op in ("maintain", "purge"):
        return (f"{d.get('versions_removed', 0)} old versions removed, {d.get('bytes_freed', 0) / 1e6:.1f} MB freed, "
                f"fragments {d.get('fragments_before', '?')} -> {d.get('fragments', '?')}")
    if op == "create":
        return f"encoder {d.get('encoder')} ({d.get('dim')}-d)"
    return ""


@memory.command("remove")
@click.argument("name")
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Remove the sentences of this file, read and cleaned exactly as ingest reads it (so a file that "
                   "was ingested is removed with that same file).")
@click.option("--format", "fmt", type=click.Choice(["txt", "jsonl", "csv", "tsv", "coco", "parquet"]),
              help="The file's format (default: from its suffix, as ingest).")
@click.option("--field", help="The file's text field (jsonl, csv), as ingest.")
@click.option("--source", help="Remove what ingests of this file name brought (the 'from' of memory show/history).")
@click.option("--added-at", metavar="TIME", help="With --source: only the ingest run that started at TIME "
                                                 "(as memory show prints it).")
@click.option("--match", "pattern", metavar="REGEX",
              help="Remove sentences matching this regular expression (RE2: no look-around; (?i) ignores case).")
@click.option("--where", metavar="FILTER",
              help="Remove rows matching a LanceDB SQL filter over text, source, added_at, hash, "
                   "e.g. \"source = 'feed-07.txt' AND text LIKE '%@%'\".")
@click.option("--all", "everything", is_flag=True, help="Remove every row (needed to empty a bank).")
@click.option("--dry-run", is_flag=True, help="Print how many rows match and a sample; change nothing.")
@click.option("--purge", is_flag=True,
              help="Also erase the removed text from disk: rewrite the files, remove every older version of the "
                   "bank, its index and the local caches that hold it. Irreversible (no restore to before it).")
@click.option("--drop-tags", is_flag=True, help="With --purge: delete the tags that pin versions holding the rows.")
@click.option("--yes", is_flag=True, help="Purge without asking.")
@store_option
@json_option
def memory_remove(name: str, file: Path | None, fmt: str | None, field: str | None, source: str | None,
                  added_at: str | None, pattern: str | None, where: str | None, everything: bool, dry_run: bool,
                  purge: bool, drop_tags: bool, yes: bool, store: str | None, as_json: bool) -> None:
    """Remove sentences from bank NAME: a new version without them (undo with 'memory restore').

    Criteria combine: every one given must hold. Decoders trained on the removed rows are marked in 'decoder
    list', the rows leave the bank's evaluation set, servers stop returning them from their next request, and a
    decapflow.bank.removed event lets the retrain deployment train a gated replacement. Versions pinned by tags
    still hold them until those tags move; --purge erases them from disk.

    \b
    Examples: decapflow memory remove coco --file bad-lines.txt --dry-run
              decapflow memory remove coco --source feed-2026-12-06.txt
              decapflow memory remove coco --match '(?i)\\b[\\w.]+@[\\w.]+\\b' --purge
    """
    from decapflow.bank.matching import Criteria
    from decapflow.lifecycle.removal import remove

    criteria = Criteria(file=file, fmt=fmt, field=field, source=source, added_at=added_at, pattern=pattern,
                        where=where, everything=everything)
    if not criteria.given():
        raise click.UsageError("say which rows: --file, --source, --match, --where, or --all")
    if drop_tags and not purge:
        raise click.UsageError("--drop-tags goes with --purge")
    if purge and not dry_run and not yes:
        click.confirm(f"Purge erases the removed rows of bank {name!r} from disk for good, with every older version "
                      f"of the bank (only tagged versions are kept). Go on?", abort=True, err=True)
    report = remove(name, criteria, store=store, dry_run=dry_run, purge=purge, drop_tags=drop_tags)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(report.summary())


@memory.command("restore")
@click.argument("name")
@click.option("--version", "version", type=click.IntRange(min=1), help="The version to bring back.")
@click.option("--tag", help="Bring back the version this tag pins.")
@store_option
@json_option
def memory_restore(name: str, version: int | None, tag: str | None, store: str | None, as_json: bool) -> None:
    """Roll bank NAME back: a new version equal to an earlier one ('memory show' lists the versions kept;
    'memory history' says what made each). Nothing is lost: the versions in between stay until maintenance
    removes them, so a restore can itself be undone with another restore.

    Writers wait for it on the bank's lease; an ingest that was running writes again, when it ends, what the
    restore took out of its file.

    \b
    Examples: decapflow memory restore coco --version 41
              decapflow memory restore coco --tag prod
    """
    from decapflow.lifecycle.rollback import restore

    result = restore(name, version=version, tag=tag, store=store)
    if as_json:
        echo_json(result)
        return
    click.echo(f"bank {result['bank']!r}: restored version {result['restored']} as version {result['version']} "
               f"({result['rows']:,} rows: {result['rows_added']:,} back, {result['rows_removed']:,} gone)")
    marked = {d: n for d, n in result["stale"].items() if n}
    if marked:
        click.echo("  decoders trained on rows the bank no longer holds: "
                   + ", ".join(f"{d} ({n:,} rows)" for d, n in marked.items()))


@memory.command("tag")
@click.argument("name")
@click.argument("tag", required=False)
@click.option("--version", "version", type=click.IntRange(min=1), help="The version to pin (default: the newest).")
@click.option("--list", "listing", is_flag=True, help="List the bank's tags.")
@click.option("--delete", is_flag=True, help="Delete TAG (its version may then be cleaned up by maintenance).")
@store_option
@json_option
def memory_tag(name: str, tag: str | None, version: int | None, listing: bool, delete: bool, store: str | None,
               as_json: bool) -> None:
    """Pin a version of bank NAME under TAG (creating or moving it), list the tags, or delete one.

    Every reader takes NAME@TAG (caption --memory coco@prod, the API's memory field, eval, train): a server
    asked for coco@prod follows the tag when it moves. Maintenance never removes a tagged version.

    \b
    Examples: decapflow memory tag coco prod              pin the newest version as 'prod'
              decapflow memory tag coco prod --version 41  move 'prod' back to version 41
              decapflow memory tag coco --list
    """
    from decapflow.lifecycle.rollback import list_tags, remove_tag
    from decapflow.lifecycle.rollback import tag as set_tag

    if listing or tag is None:
        if delete or version:
            raise click.UsageError("--list takes no TAG, --version or --delete")
        tags = list_tags(name, store=store)
        if as_json:
            echo_json(tags)
        elif not tags:
            click.echo(f"bank {name!r} has no tags; pin a version with: decapflow memory tag {name} NAME")
        for t in [] if as_json else tags:
            what = f"pins the files of clone {t['clone']}" if "clone" in t else ""
            click.echo(f"{t['tag']:<24} v{t['version']:<6} {t['rows'] or 0:>10,} rows  {what}")
        return
    if delete:
        if version:
            raise click.UsageError("--delete takes no --version")
        result = remove_tag(name, tag, store=store)
        message = f"bank {result['bank']!r}: deleted tag {tag!r} (it pinned version {result['version']})"
    else:
        result = set_tag(name, tag, version=version, store=store)
        moved = (f", moved from version {result['previous']}" if result["previous"] not in (None, result["version"])
                 else "")
        message = f"bank {result['bank']!r}: tag {tag!r} pins version {result['version']}{moved}; read it as " \
                  f"{result['bank']}@{tag}"
    if as_json:
        echo_json(result)
    else:
        click.echo(message)


@memory.command("clone")
@click.argument("name")
@click.argument("new")
@click.option("--version", "version", type=click.IntRange(min=1), help="Clone this version (default: the newest).")
@click.option("--tag", help="Clone the version this tag pins.")
@store_option
@json_option
def memory_clone(name: str, new: str, version: int | None, tag: str | None, store: str | None,
                 as_json: bool) -> None:
    """Branch bank NAME as NEW, sharing its files (no row is copied): try a corpus change beside the bank in
    production. NEW gets a copy of NAME's current decoder, its evaluation sets and its image mean, then evolves
    on its own. NAME keeps a pin on the shared version and cannot be deleted while NEW exists.

    \b
    Examples: decapflow memory clone coco coco-trial
              decapflow memory clone coco@prod coco-hotfix
    """
    from decapflow.lifecycle.cloning import clone

    result = clone(name, new, version=version, tag=tag, store=store)
    if as_json:
        echo_json(result)
        return
    click.echo(f"bank {new!r}: cloned from {result['source']!r} version {result['source_version']} "
               f"({result['rows']:,} rows, files shared) in {result['seconds']:.2f} s; "
               + (f"decoder {result['decoder']} current" if result["decoder"] else "no decoder yet")
               + (f", {len(result['eval_sets'])} evaluation set(s)" if result["eval_sets"] else "")
               + (", image mean" if result["image_mean"] else ""))
