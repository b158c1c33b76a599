"""``memory import`` against a bare LanceDB write of the same rows, same run (issue 10, part 2).

Writes N synthetic unit vectors (512-d) with distinct texts to a parquet file, then times
1. baseline: read the parquet with pyarrow and ``lancedb.create_table`` it in one go (no cleaning, no dedupe, no lock);
2. ``run_import`` into a fresh bank (clean, hash, dedupe, normalise check, one locked commit per 4,096-row chunk).
Prints seconds, rows/s, the ratio and the peak RSS of this process.

    .venv/bin/python benchmarks/import_speed.py --rows 200000
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="decapflow-import-"))
    os.environ["DECAPFLOW_HOME"] = str(work / "home")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = [f"sentence number {i} about a thing" for i in range(args.rows)]
    table = pa.table({"caption": texts, "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()),
                                                                                    args.dim)})
    src = work / "emb.parquet"
    pq.write_table(table, src)
    del table, vectors

    import lancedb

    start = time.perf_counter()
    lancedb.connect(str(work / "raw")).create_table("raw", pq.read_table(src))
    raw = time.perf_counter() - start

    from decapflow.bank.importer import run_import

    start = time.perf_counter()
    report = run_import(src, "bench", "bench:none")
    ours = time.perf_counter() - start
    assert report.written == args.rows, report
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.rows:,} rows x {args.dim}-d: bare LanceDB write {raw:.1f} s ({args.rows / raw:,.0f} rows/s); "
          f"memory import {ours:.1f} s ({args.rows / ours:,.0f} rows/s); ratio {ours / raw:.2f}x; "
          f"peak RSS {peak_mb:,.0f} MB")


if __name__ == "__main__":
    main()
