"""``decapflow memory maintain``: keep a bank (or every bank of a store) fast and small on disk."""

from __future__ import annotations

import click

from decapflow.cli.banks import memory
from decapflow.cli.base import echo_json, json_option, store_option


@memory.command("maintain")
@click.argument("name", required=False)
@click.option("--all", "everything", is_flag=True,
              help="Every bank of the store, then the store's own tables (history, decoder records, evaluation sets).")
@click.option("--retain", default="7d", show_default=True, metavar="AGE",
              help="Keep versions younger than AGE (7d, 12h, 30m, 0: only the newest); tagged versions are always "
                   "kept.")
@store_option
@json_option
def memory_maintain(name: str | None, everything: bool, retain: str, store: str | None, as_json: bool) -> None:
    """Compact bank NAME, remove its old versions, bring its ANN index up to date.

    \b
    What it does, under the bank's lease (an ingest running meanwhile waits between two chunks and loses nothing;
    readers never wait):
      1. merges the small fragments each write leaves (one per ingest chunk, import, removal) into large ones,
         and rewrites fragments holding many deleted rows;
      2. removes the versions older than --retain, except tagged ones, with the files only they use;
      3. adds the rows written since 'memory index' built the ANN index to it.
    It prints versions removed, MB freed, fragments before -> after, unindexed rows and seconds. The rows and
    texts do not change; the bank gets a new version only when something was compacted or indexed.

    \b
    When: 'decapflow memory show NAME' says when a bank needs it (small fragments, unindexed rows, versions past
    the retention, deleted rows). A bank fed by many small ingests reads slower with each: 200 ingests of 50
    sentences read 7x slower than the same rows ingested once, as fast again after maintenance. The
    nightly-maintenance deployment of prefect.yaml runs it for every bank at 04:00 UTC.

    \b
    Retention: a version older than --retain is gone afterwards. A reader that asks for it fails (NAME@v12,
    'train --memory NAME@v12', a process still reading an old version), and 'memory restore --version N' can only
    go back to versions kept. Tag a version to keep it whatever its age:
      decapflow memory tag NAME prod --version 12
    --retain 0 keeps the newest version only: use it when nothing reads older versions (or to free the disk now).

    \b
    Examples:  decapflow memory maintain coco
               decapflow memory maintain coco --retain 30d
               decapflow memory maintain --all --retain 7d --json
    """
    from decapflow.lifecycle.maintenance import maintain_bank, maintain_store, parse_retention, summary_line

    if bool(name) == everything:
        raise click.UsageError("give a bank NAME, or --all for every bank of the store")
    parse_retention(retain)  # a bad retention is refused before anything runs
    if not everything:
        result = maintain_bank(name, retain, store)
        if as_json:
            echo_json(result)
            return
        click.echo(summary_line(result))
        for reason in result["needs"]:
            click.echo(f"  still: {reason}")
        return
    report = maintain_store(store, retain)
    if as_json:
        echo_json(report)
    else:
        if not report["banks"]:
            click.echo(f"no memory banks in {report['store']}")
        for line in (summary_line(r) for r in [*report["banks"], *report["tables"]]):
            click.echo(line)
        click.echo(f"{len(report['banks'])} bank(s) maintained (retain {report['retain']}), "
                   f"{report['mb_freed']:,.1f} MB freed")
    if report["failed"]:
        raise click.ClickException(f"maintenance failed for: {', '.join(report['failed'])}")
