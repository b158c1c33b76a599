"""Taking sentences out of a bank, and erasing them from disk (``decapflow memory remove``).

A removal makes a new bank version without the matching rows (:mod:`decapflow.bank.matching` says which) and
records it in the history (the criteria, never the sentences). Then everything that depends on the bank follows:

- the decoders trained on a version that held the rows are marked (:mod:`decapflow.lifecycle.stale`) and a
  ``decapflow.bank.removed`` event lets the retrain deployment train a gated challenger without them;
- the removed sentences leave the bank's text evaluation set (recorded again under a new id);
- every reader of the bank's newest version (a running server included) stops returning them from its next request
  on, since it reads the new version; readers of a tag or version pinned before the removal still see them, and the
  report names those tags.

A removal alone is not erasure: LanceDB marks rows deleted and keeps every older version's files. ``purge``
erases: it rewrites every fragment holding a deleted row, removes all versions but the newest except tagged ones
(a tag pinning a version that holds the rows is named, and the purge refuses unless told to drop it; a shallow
clone sharing such a version must be deleted first), rebuilds the ANN index (which holds the rows' vectors), cleans
the evaluation-set table's old versions, and deletes this machine's local copies of the bank's older versions and
its token cache. Copies on other machines (a server's own ``DECAPFLOW_HOME``) are theirs to delete: the next
version change makes them stale, and ``rm -r $DECAPFLOW_HOME/cache`` is always safe.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import pyarrow.compute as pc

from decapflow.bank import events, history
from decapflow.bank.cache import cache_root
from decapflow.bank.maintenance import optimize_bank, optimize_table
from decapflow.bank.matching import Criteria, match_rows
from decapflow.bank.memory import MemoryBank, Registry
from decapflow.bank.refs import CLONE_PIN, writable
from decapflow.bank.store import Store, get_store
from decapflow.bank.versions import count_present, delete_rows, delete_tag, hashes_at
from decapflow.config import cache_dir
from decapflow.errors import BankError, UnknownVersion
from decapflow.lifecycle.evalsets import drop_eval_sentences
from decapflow.lifecycle.stale import after_removal

__all__ = ["RemovalReport", "purge_bank", "remove"]

INDEX_MIN_ROWS = 4096  # MemoryBank.build_index refuses fewer rows


@dataclass
class RemovalReport:
    bank: str
    criteria: dict[str, Any]
    matched: int
    removed: int = 0
    version_before: int = 0
    version: int = 0
    rows: int = 0
    sample: list[str] = field(default_factory=list)
    dry_run: bool = False
    pinned: dict[str, int] = field(default_factory=dict)  # tags whose version still holds matched rows
    stale: dict[str, int] = field(default_factory=dict)  # decoder -> rows it learnt that the bank no longer holds
    eval_sets: list[str] = field(default_factory=list)  # text evaluation sets recorded again without the rows
    purged: dict[str, Any] | None = None
    event: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        what = ", ".join(f"{k} {v!r}" for k, v in self.criteria.items())
        if self.dry_run:
            lines = [f"bank {self.bank!r}: {self.matched:,} row(s) match ({what}); dry run, nothing removed"]
            lines += [f"  e.g. {t}" for t in self.sample]
        elif not self.removed:
            lines = [f"bank {self.bank!r}: no row matches ({what}); nothing removed, no new version"]
        else:
            lines = [f"bank {self.bank!r}: removed {self.removed:,} row(s) ({what}); version {self.version_before} -> "
                     f"{self.version}, {self.rows:,} rows now"]
        if self.stale and not self.dry_run:
            marked = ", ".join(f"{d} ({n:,} rows)" for d, n in self.stale.items() if n)
            if marked:
                lines.append(f"  decoders trained on rows since removed: {marked}; retrain with: decapflow train "
                             f"--memory {self.bank} --gate")
        if self.eval_sets:
            lines.append(f"  evaluation set(s) {', '.join(self.eval_sets)} recorded again without them")
        if self.pinned and not self.purged:
            tags = ", ".join(f"{self.bank}@{t} (v{v})" for t, v in self.pinned.items() if not t.startswith(CLONE_PIN))
            if tags:
                lines.append(f"  still readable through {tags}: move or delete those tags to stop that")
        if self.purged:
            p = self.purged
            lines.append(f"  purged: {p['versions_removed']} old version(s) and {p['bytes_freed'] / 1e6:.1f} MB "
                         f"removed, deletions rewritten ({p['fragments_before']} -> {p['fragments']} fragments)"
                         + (f", tags dropped: {', '.join(p['tags_dropped'])}" if p["tags_dropped"] else "")
                         + (", ANN index rebuilt" if p["index_rebuilt"] else "")
                         + f", {p['caches_removed']} local cache folder(s) deleted")
        return "\n".join(lines)


def _holding(bank: MemoryBank, hashes: list[str]) -> dict[str, int]:
    """Tags whose version holds any of ``hashes`` (or, with none given, any row the newest version lacks)."""
    now = None if hashes else hashes_at(bank)
    found = {}
    for tag, version in bank.tags().items():
        try:
            if hashes:
                held = count_present(bank, version, hashes)
            else:
                held = int(pc.sum(pc.invert(pc.is_in(hashes_at(bank, version), value_set=now))).as_py() or 0)
        except UnknownVersion:
            continue
        if held:
            found[tag] = version
    return found


def _refuse_pins(bank: MemoryBank, pinned: dict[str, int], drop_tags: bool) -> list[str]:
    """The user tags a purge must drop; raises when it may not (clone pins always, user tags without
    ``drop_tags``)."""
    clones = {t.removeprefix(CLONE_PIN): v for t, v in pinned.items() if t.startswith(CLONE_PIN)}
    if clones:
        shown = ", ".join(f"{c} (shares v{v})" for c, v in clones.items())
        raise BankError(f"cannot purge bank {bank.name!r}: shallow clone(s) {shown} read files of a version that "
                        f"holds these rows; delete the clone(s) first (decapflow memory rm NAME), then purge")
    tags = sorted(pinned)
    if tags and not drop_tags:
        shown = ", ".join(f"{t} (v{pinned[t]})" for t in tags)
        raise BankError(f"cannot purge bank {bank.name!r}: tag(s) {shown} pin versions that hold these rows, and a "
                        f"purge must remove those versions; move them (decapflow memory tag {bank.name} TAG), or "
                        f"add --drop-tags to delete them")
    return tags


def remove(bank_ref: str, criteria: Criteria, *, store: Store | str | None = None, dry_run: bool = False,
           purge: bool = False, drop_tags: bool = False) -> RemovalReport:
    """Remove the rows of bank ``bank_ref`` (a plain name: removals change the newest version) that meet
    ``criteria``; see the module docstring for what follows. Matching every row needs ``criteria.everything``.
    Bad input (unknown bank, a filter that does not parse, a purge that tags or clones forbid) raises before
    anything is written; a removal that matches nothing changes nothing (a purge still erases what earlier
    removals left on disk)."""
    start = time.perf_counter()
    store = get_store(store)
    bank = Registry(store).open(writable(bank_ref, "memory remove"))
    match = match_rows(bank, criteria)
    described = criteria.describe(redact=purge)
    report = RemovalReport(bank.name, described, match.count, version_before=bank.version, version=bank.version,
                           rows=len(bank), sample=match.sample, dry_run=dry_run)
    if match.count and match.count == report.rows and not criteria.everything:
        raise BankError(f"these criteria match every row ({match.count:,}) of bank {bank.name!r}: removing them "
                        f"empties it; add --all (everything=True) if that is what you mean")
    report.pinned = _holding(bank, match.hashes) if (match.count or purge) else {}
    drop = _refuse_pins(bank, report.pinned, drop_tags) if purge else []
    if dry_run:
        report.seconds = round(time.perf_counter() - start, 3)
        return report
    if match.count:
        report.stale = after_removal(bank, match.hashes)
        change = history.Change("remove", source=described.get("file", ""), content_hash=match.file_hash,
                                details={"criteria": described, "stale": report.stale, "purge": purge})
        only_all = criteria.everything and criteria.describe() == {"all": True}
        removed = delete_rows(bank, None if only_all else match.hashes, change)
        report.removed, report.version, report.rows = removed.rows_removed, removed.version, removed.rows
        report.eval_sets = drop_eval_sentences(bank, match.hashes, store)
        report.event = events.bank_rows_left("removed", bank.name, {
            "rows_removed": report.removed, "version": report.version, "rows": report.rows,
            "stale_decoders": {d: n for d, n in report.stale.items() if n}})
    if purge:
        report.purged = purge_bank(bank, drop)
        report.version = report.purged["version"]
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def purge_bank(bank: MemoryBank, drop_tags: list[str] = ()) -> dict[str, Any]:
    """Erase from disk every row the bank's newest version no longer holds (see the module docstring): drop
    ``drop_tags``, rewrite fragments with deleted rows and remove every other untagged version (with files no
    commit names), rebuild the ANN index, clean the evaluation-set table, delete this machine's local copies of
    older versions and the token cache. Returns what it did."""
    store = bank.store
    for tag in drop_tags:
        delete_tag(bank, tag, history.Change("purge", details={"dropped_tag": tag}))
    kind = bank.index_kind()
    change = history.Change("purge", details={"tags_dropped": list(drop_tags)})
    optimized = optimize_bank(bank, timedelta(0), materialize_all=True, delete_unverified=True, change=change)
    if kind is not None:  # the index keeps the removed rows' vectors: build it anew, then drop the old one's files
        with store.lock(f"bank-{bank.name}"):
            if len(bank) >= INDEX_MIN_ROWS:
                bank.build_index(kind)
            else:
                table = store.db.open_table(bank.name)
                for index in table.list_indices():
                    table.drop_index(index.name)
        optimized = optimize_bank(bank, timedelta(0), delete_unverified=True, change=change)
    try:  # older versions of the evaluation-set table keep the sentences taken out of a set
        optimize_table(store, "_evalsets", timedelta(0), materialize_all=True)
    except (FileNotFoundError, ValueError):
        pass  # no evaluation set in this store yet
    caches = 0
    root = cache_root(bank.name, bank.bank_id)
    for folder in sorted(root.glob("v*")) if root.is_dir() else []:
        if folder.name != f"v{bank.version}":
            shutil.rmtree(folder, ignore_errors=True)
            caches += 1
    tokens = cache_dir() / "tokens"
    if tokens.is_dir():
        shutil.rmtree(tokens, ignore_errors=True)
        caches += 1
    return {**optimized.to_dict(), "tags_dropped": list(drop_tags), "index_rebuilt": kind is not None,
            "caches_removed": caches}
