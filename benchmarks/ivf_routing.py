"""Does a LanceDB IVF index route noise queries (the stress case) to their neighbours? A probe of issue 10's ANN gap.

A LanceDB table of ``--rows`` clustered unit vectors (``--centres`` clusters, default one per 3,100 rows as in
``big_bank.py``), written in 200k-row commits, an IVF index per ``--partitions`` value (default 1.24 per cluster, as
at 6.2M rows) and k-means setting of ``--kmeans`` (rounds,samples-per-partition), and 32 noise queries (a text-like vector plus isotropic noise, cosine
~0.28 to their best row; ``--queries text`` for caption-like ones). Per index and nprobes it prints recall@64
against the exact 64 nearest rows (mean, minimum, 10th percentile over the queries), the cosine of the projection
onto the returned rows to the exact ``pd`` projection (mean, minimum), how many rows came back (k=64 asked), and
ms per query against exact batched ``pd`` in the same run. ``--two-pass`` adds a second search with each query's
projection onto its first hits (a text-like query) and keeps the best 64 of both by the image query's dot product.
Above 2M rows the exact reference reads a float16 copy of the bank (6.3 GB at 6.2M rows).

Measured on the dev machine (LanceDB 0.40, IVF_FLAT, 10 k-means rounds), recall@64 at nprobes 5 / 20 / 40 / 80:

- by cosine, 2M rows / 645 centres / 800 partitions: 0.03-0.16, queries routed to nearly empty partitions;
  by dot product on the same bank: 1.0 at nprobes 5. 400k rows / 129 centres / 160 partitions: 1.0 either way.
- by dot, 6.2M rows / 2,000 centres / 2,480 partitions: 0.849 / 0.866 / 0.872 / 0.890, the worst query 0.00 /
  0.02 / 0.02 / 0.05 and the 10th percentile 0.61-0.74: a few queries lose nearly all their neighbours whatever
  the probes. Cosine to exact pd 0.961-0.978 (worst 0.14-0.53). Two-pass adds 0.005.
- the same failure at 2M rows with the same 2,000 centres and 2,480 partitions (64 samples -> 16): 0.791 /
  0.826 / 0.851, so it follows the number of clusters and partitions, not the rows. 8,000 partitions on that bank
  are worse: 0.677 / 0.710 / 0.732.

    .venv/bin/python benchmarks/ivf_routing.py --rows 400000 --metric dot             # ~1 minute
    .venv/bin/python benchmarks/ivf_routing.py --rows 2000000 --centres 2000 --metric dot --kmeans 10,16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from topk import clustered_rows, noise_queries, unit_rows  # noqa: E402

from decapflow.caption.projection import nearest, project, project_subset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--centres", type=int, default=None, help="default: rows / 3100")
    parser.add_argument("--partitions", type=int, nargs="+", default=None, help="default: 1.24 per centre")
    parser.add_argument("--kind", choices=["ivf_flat", "ivf_sq"], default="ivf_flat")
    parser.add_argument("--kmeans", nargs="+", default=["10,64", "50,256"], help="rounds,samples-per-partition")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--queries", choices=["noise", "text"], default="noise",
                        help="noise (stress case): cosine ~0.28 to the bank; text: fresh rows of a cluster (cosine ~0.8 to its centre)")
    parser.add_argument("--metric", choices=["cosine", "dot"], default="cosine", help="the index's and the search's")
    parser.add_argument("--two-pass", action="store_true",
                        help="also: search again with each query's projection onto its first hits (a text-like "
                             "query), keep the best 64 of both searches by the image query's dot product")
    parser.add_argument("--tmp", default=None)
    args = parser.parse_args()

    import lancedb
    import pyarrow as pa
    from lancedb.index import IvfFlat, IvfSq

    rng = np.random.default_rng(0)
    centres_n = args.centres or max(1, args.rows // 3100)
    partition_counts = args.partitions or [max(1, round(centres_n * 1.24))]
    centres = unit_rows(rng.standard_normal((centres_n, 512), dtype=np.float32))
    queries = (noise_queries if args.queries == "noise" else clustered_rows)(32, centres, rng)
    keep = np.float32 if args.rows <= 2_000_000 else np.float16  # the exact reference's copy (6.3 GB at 6.2M)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        db, table, parts = lancedb.connect(tmp), None, []
        for s in range(0, args.rows, 200_000):
            chunk = clustered_rows(min(200_000, args.rows - s), centres, rng)
            data = pa.table({"id": np.arange(s, s + len(chunk)),
                             "vector": pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), 512)})
            table = db.create_table("b", data) if table is None else table
            if s:
                table.add(data)
            parts.append(chunk.astype(keep))
        bank = np.concatenate(parts)
        del parts
        project(queries[:1], bank[:1000])  # first-call set-up out of the timing
        start = time.perf_counter()
        exact = project(queries, bank).vectors
        exact_ms = (time.perf_counter() - start) / len(queries) * 1e3
        exact_ids, exact_sims = nearest(queries, bank, k=64)
        print(f"{args.rows:,} rows, {centres_n} centres; exact pd {exact_ms:.1f} ms/query "
              f"(batch 32, bank as {np.dtype(keep).name}); exact neighbours at cosine distance "
              f"{1 - exact_sims.mean():.3f}", flush=True)

        def search(q: np.ndarray, nprobes: int) -> tuple[np.ndarray, np.ndarray]:
            hits = (table.search(q, vector_column_name="vector").metric(args.metric).nprobes(nprobes)
                    .limit(64).select(["id", "vector"]).to_arrow())
            which, ids = hits.column("query_index").to_numpy(), hits.column("id").to_numpy()
            vectors = hits.column("vector").combine_chunks().values.to_numpy().reshape(-1, 512)
            return which, ids, vectors

        def report(label: str, per_query: list[tuple[np.ndarray, np.ndarray]], ms: float, returned: int) -> None:
            recall = np.array([len(set(ids) & set(e)) / 64 for (ids, _), e in zip(per_query, exact_ids, strict=True)])
            approx = np.stack([project_subset(q[None], vecs[None]).vectors[0] if len(vecs) else np.zeros(512)
                               for q, (_, vecs) in zip(queries, per_query, strict=True)])
            cos = (approx * exact).sum(1)
            print(f"  {label}: recall@64 mean {recall.mean():.3f} (min {recall.min():.2f}, 10th pct "
                  f"{np.percentile(recall, 10):.2f}), cos to exact pd mean {cos.mean():.4f} (min {cos.min():.3f}), "
                  f"{returned}/{64 * len(queries)} rows returned, {ms:.1f} ms/query ({exact_ms / ms:.1f}x exact pd)",
                  flush=True)

        for partitions, setting in ((p, k) for p in partition_counts for k in args.kmeans):
            rounds, samples = (int(x) for x in setting.split(","))
            config = (IvfFlat if args.kind == "ivf_flat" else IvfSq)(
                distance_type=args.metric, num_partitions=partitions, max_iterations=rounds, sample_rate=samples)
            start = time.perf_counter()
            table.create_index("vector", config=config, replace=True)
            print(f" {args.kind}, {partitions} partitions, k-means ({rounds}, {samples}) built in {time.perf_counter() - start:.0f} s",
                  flush=True)
            for nprobes in args.nprobes:
                start = time.perf_counter()
                which, ids, vectors = search(queries, nprobes)
                ms = (time.perf_counter() - start) / len(queries) * 1e3
                first = [(ids[which == i], vectors[which == i]) for i in range(len(queries))]
                report(f"nprobes {nprobes:>3}", first, ms, len(ids))
                if not args.two_pass:
                    continue
                start = time.perf_counter()
                text_side = np.stack([project_subset(q[None], v[None]).vectors[0] for q, (_, v) in
                                      zip(queries, first, strict=True)])
                which2, ids2, vectors2 = search(text_side, nprobes)
                merged = []
                for i, q in enumerate(queries):
                    both_ids = np.concatenate([first[i][0], ids2[which2 == i]])
                    both = np.concatenate([first[i][1], vectors2[which2 == i]])
                    both_ids, at = np.unique(both_ids, return_index=True)
                    best = np.argsort(-(both[at] @ q))[:64]
                    merged.append((both_ids[best], both[at][best]))
                ms2 = ms + (time.perf_counter() - start) / len(queries) * 1e3
                report(f"nprobes {nprobes:>3} two-pass", merged, ms2, sum(len(m[0]) for m in merged))


if __name__ == "__main__":
    main()
