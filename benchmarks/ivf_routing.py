"""Does a LanceDB IVF index route image-like queries to their neighbours? A small, fast probe of issue 10's gap.

A LanceDB table of ``--rows`` clustered unit vectors (``--centres`` clusters, default one per 3,100 rows as in
``big_bank.py``), an IVF index of ``--partitions`` (default 1.24 per cluster, as at 6.2M rows) built with each
k-means setting of ``--kmeans`` (rounds,samples-per-partition), and 32 image-like queries (cosine ~0.28 to their
best row; ``--queries text`` for caption-like ones). Per index and nprobes it prints recall@64 against the exact 64 nearest rows (computed in the same run),
how many rows came back (k=64 asked per query), the mean cosine distance of the returned rows against that of
the exact ones, and ms per query against exact batched ``pd`` in the same run.

Measured on the dev machine (LanceDB 0.40, IVF_FLAT): 400k rows / 129 centres / 160 partitions: recall 1.0 at
nprobes 5. 2M rows / 645 centres / 800 partitions: recall 0.03-0.16, only 712 of 2,048 rows returned at nprobes 5,
returned rows at cosine distance 0.92 where the true neighbours sit at 0.72, i.e. the queries are routed to nearly
empty partitions.

    .venv/bin/python benchmarks/ivf_routing.py --rows 400000            # works (~1 minute)
    .venv/bin/python benchmarks/ivf_routing.py --rows 2000000           # breaks (~3 minutes per index)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from topk import clustered_rows, image_like_queries, unit_rows  # noqa: E402

from decapflow.projection import nearest, project  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--centres", type=int, default=None, help="default: rows / 3100")
    parser.add_argument("--partitions", type=int, default=None, help="default: 1.24 per centre")
    parser.add_argument("--kind", choices=["ivf_flat", "ivf_sq"], default="ivf_flat")
    parser.add_argument("--kmeans", nargs="+", default=["10,64", "50,256"], help="rounds,samples-per-partition")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--queries", choices=["image", "text"], default="image",
                        help="image: cosine ~0.28 to the bank; text: fresh rows of a cluster (cosine ~0.8 to its centre)")
    parser.add_argument("--metric", choices=["cosine", "dot"], default="cosine", help="the index's and the search's")
    parser.add_argument("--tmp", default=None)
    args = parser.parse_args()

    import lancedb
    import pyarrow as pa
    from lancedb.index import IvfFlat, IvfSq

    rng = np.random.default_rng(0)
    centres_n = args.centres or max(1, args.rows // 3100)
    partitions = args.partitions or max(1, round(centres_n * 1.24))
    centres = unit_rows(rng.standard_normal((centres_n, 512), dtype=np.float32))
    bank = np.concatenate([clustered_rows(min(200_000, args.rows - s), centres, rng)
                           for s in range(0, args.rows, 200_000)])
    queries = (image_like_queries if args.queries == "image" else clustered_rows)(32, centres, rng)
    project(queries[:1], bank[:1000])  # first-call set-up out of the timing
    start = time.perf_counter()
    project(queries, bank)
    exact_ms = (time.perf_counter() - start) / len(queries) * 1e3
    exact_ids, exact_sims = nearest(queries, bank, k=64)
    print(f"{args.rows:,} rows, {centres_n} centres, {partitions} partitions; exact pd {exact_ms:.1f} ms/query "
          f"(batch 32); exact neighbours at cosine distance {1 - exact_sims.mean():.3f}", flush=True)
    def dist(d: float) -> float:  # LanceDB's "dot" distance is 1 - dot; on unit vectors that is cosine distance
        return d

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        table = lancedb.connect(tmp).create_table("b", pa.table({
            "id": np.arange(args.rows),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(bank.reshape(-1)), 512)}))
        for setting in args.kmeans:
            rounds, samples = (int(x) for x in setting.split(","))
            config = (IvfFlat if args.kind == "ivf_flat" else IvfSq)(
                distance_type=args.metric, num_partitions=partitions, max_iterations=rounds, sample_rate=samples)
            start = time.perf_counter()
            table.create_index("vector", config=config, replace=True)
            build = time.perf_counter() - start
            for nprobes in args.nprobes:
                start = time.perf_counter()
                hits = (table.search(queries, vector_column_name="vector").metric(args.metric).nprobes(nprobes)
                        .limit(64).select(["id", "_distance"]).to_arrow())
                ms = (time.perf_counter() - start) / len(queries) * 1e3
                which, got = hits.column("query_index").to_numpy(), hits.column("id").to_numpy()
                recall = np.mean([len(set(got[which == i]) & set(e)) / 64 for i, e in enumerate(exact_ids)])
                print(f"  {args.kind} k-means ({rounds}, {samples}) built in {build:.0f} s, nprobes {nprobes:>3}: "
                      f"recall@64 {recall:.3f}, {hits.num_rows}/{64 * len(queries)} rows returned at cosine "
                      f"distance {dist(hits.column('_distance').to_numpy().mean()):.3f}, {ms:.1f} ms/query "
                      f"({exact_ms / ms:.1f}x exact pd)", flush=True)


if __name__ == "__main__":
    main()
