"""Bank growth (issue 29): a bank fed by many small ingests against the same rows ingested once, and the first bank
after ``decapflow memory maintain``: with a real retention (7d: what the nightly run leaves the first night, every
version still young) and with retain 0 (every old version gone).

    python benchmarks/bank_growth.py [--ingests 200] [--lines 50] [--repeats 5] [--keep DIR]

Ingests go through ``decapflow.bank.ingest.run_ingest`` with the offline ``world`` encoder, lines of
``corpora/world/corpus.txt.gz`` (--lines per ingest; duplicates within the corpus are stored once, so both banks
hold the same distinct rows). Per bank: versions, fragments, files and MB under its folder, ms to open it and read
its vectors (cold: a new store connection and ``Registry().open(...)`` + ``bank.arrays()``, no local vector copy;
median of --repeats), and one LanceDB search (k=10, exact) on a freshly opened bank (median). Every measurement of
the fed bank is interleaved with one of the one-ingest bank, and the ratios are against those (the baseline
measured in the same rounds). Run it on a quiet machine: two cores shared with another busy process make
millisecond timings swing by 30%.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def files_and_bytes(uri: str, name: str) -> tuple[int, int]:
    import pyarrow.fs as pafs

    from decapflow.bank.store import Store

    store = Store(uri)
    infos = store.fs.get_file_info(pafs.FileSelector(store.path(f"{name}.lance"), recursive=True))
    found = [i for i in infos if i.type == pafs.FileType.File]
    return len(found), sum(i.size or 0 for i in found)


def open_and_read(uri: str, name: str) -> tuple[float, int]:
    """Seconds to open bank ``name`` on a new connection and read every vector; rows read."""
    from decapflow.bank.memory import Registry
    from decapflow.bank.store import Store

    start = time.perf_counter()
    _, vectors = Registry(Store(uri)).open(name).arrays()
    return time.perf_counter() - start, len(vectors)


def one_search(uri: str, name: str, query) -> float:
    from decapflow.bank.memory import Registry
    from decapflow.bank.store import Store

    table = Registry(Store(uri)).open(name).table
    start = time.perf_counter()
    table.search(query, vector_column_name="vector").metric("dot").limit(10).to_arrow()
    return time.perf_counter() - start


def state(uri: str, name: str) -> dict:
    from decapflow.bank.memory import Registry
    from decapflow.bank.store import Store

    table = Registry(Store(uri)).open(name).table
    files, size = files_and_bytes(uri, name)
    return {"versions": len(table.list_versions()), "fragments": table.stats()["fragment_stats"]["num_fragments"],
            "files": files, "bytes": size, "rows": table.count_rows()}


def measure(uri: str, name: str, baseline: str, repeats: int, query) -> tuple[dict, dict]:
    """(``name``'s state and timings, the baseline's timings in the same rounds), interleaved."""
    read, base_read, search, base_search = [], [], [], []
    for _ in range(repeats):
        for target, reads, searches in ((name, read, search), (baseline, base_read, base_search)):
            seconds, _ = open_and_read(uri, target)
            reads.append(seconds)
            searches.append(one_search(uri, target, query))
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    return ({**state(uri, name), "read_ms": ms(read), "search_ms": ms(search)},
            {"read_ms": ms(base_read), "search_ms": ms(base_search)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ingests", type=int, default=200)
    parser.add_argument("--lines", type=int, default=50, help="corpus lines per small ingest")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="build the stores here and keep them (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="bank-growth-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["DECAPFLOW_HOME"] = str(work / "home")
    from decapflow.bank.ingest import run_ingest
    from decapflow.bank.memory import Registry
    from decapflow.lifecycle.maintenance import maintain_bank

    with gzip.open(ROOT / "corpora" / "world" / "corpus.txt.gz", "rt", encoding="utf-8") as handle:
        lines = [line.rstrip("\n") for _, line in zip(range(args.ingests * args.lines), handle, strict=False)]
    uri = str(work / "store")
    parts = work / "parts"
    parts.mkdir(exist_ok=True)
    start = time.perf_counter()
    for i in range(args.ingests):
        part = parts / f"part-{i:04d}.txt"
        part.write_text("\n".join(lines[i * args.lines:(i + 1) * args.lines]) + "\n", encoding="utf-8")
        run_ingest(part, "fed", "world", uri)
    fed_s = time.perf_counter() - start
    whole = work / "all.txt"
    whole.write_text("\n".join(lines) + "\n", encoding="utf-8")
    start = time.perf_counter()
    run_ingest(whole, "once", "world", uri)
    once_s = time.perf_counter() - start
    _, vectors = Registry(uri).open("once").arrays()
    query = vectors[0]
    print(f"{len(vectors):,} distinct rows from {len(lines):,} lines; {args.ingests} ingests of {args.lines} lines "
          f"took {fed_s:.1f} s, one ingest {once_s:.1f} s; store {uri}\n")

    rows = []
    fed, base = measure(uri, "fed", "once", args.repeats, query)
    rows.append((f"{args.ingests} small ingests", fed, base, None))
    for retain, label in (("7d", "after `maintain --retain 7d`"), ("0", "after `maintain --retain 0`")):
        done = maintain_bank("fed", retain, uri)
        fed, base = measure(uri, "fed", "once", args.repeats, query)
        rows.append((f"{label} ({done['seconds']:.2f} s)", fed, base, done))
    once = {**state(uri, "once"), "read_ms": statistics.median(b["read_ms"] for _, _, b, _ in rows),
            "search_ms": statistics.median(b["search_ms"] for _, _, b, _ in rows)}
    assert all(r[1]["rows"] == once["rows"] for r in rows), "the banks should hold the same rows"

    print(f"| bank ({once['rows']:,} rows) | versions | fragments | files | disk | read its vectors | one search |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| the same rows, one ingest (baseline) | {once['versions']} | {once['fragments']} | {once['files']} | "
          f"{once['bytes'] / 1e6:.1f} MB | {once['read_ms']:.1f} ms | {once['search_ms']:.1f} ms |")
    for label, fed, base, _ in rows:
        print(f"| {label} | {fed['versions']} | {fed['fragments']} | {fed['files']} | {fed['bytes'] / 1e6:.1f} MB "
              f"({fed['bytes'] / once['bytes']:.2f}x) | {fed['read_ms']:.1f} ms ({fed['read_ms'] / base['read_ms']:.2f}x"
              f" of {base['read_ms']:.1f}) | {fed['search_ms']:.1f} ms ({fed['search_ms'] / base['search_ms']:.2f}x) |")
    print("\nratios: against the one-ingest bank measured in the same rounds (disk: against its size). Goal after "
          "maintain: read and disk within 1.2x.")


if __name__ == "__main__":
    main()
