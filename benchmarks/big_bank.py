"""A BookCorpus-sized memory bank (6.2M sentences, 512-d): import, exact projection, and ANN for image queries.

Everything is measured in one run, on synthetic data the script writes itself:

1. **Data**: ``--rows`` clustered unit vectors (``--centres`` random centres, each row a centre plus noise at
   cosine ~0.8, like caption embeddings) in clip-retrieval's layout (``text_emb/text_emb_<i>.npy`` float16 shards
   beside ``metadata/metadata_<i>.parquet``), with distinct texts ``"row <i>"``.
2. **Import**: ``decapflow memory import`` (in a subprocess: wall time and its peak RSS) against the baseline of
   bare LanceDB appending the same shards (same chunks, no cleaning, hashing, dedup or locks), also a subprocess.
3. **Exact projection** (``pd``) over the bank's bfloat16 copy (``bank.vector_cache("bfloat16")``), batches of 1
   and 64 noise queries, the stress case (a fresh text-like vector drowned in isotropic noise: cosine ~0.28 to its
   best bank row; their nearest rows are noise-aligned rows from everywhere, unlike real CLIP images, whose nearest
   captions describe them: ``benchmarks/big_world.py`` judges ``topk`` with those). Its bandwidth (bank bytes read / time) is compared with ``np.copyto`` of
   the same bank copy, and its arithmetic with a plain float32 matrix product of the same shape (BLAS), both in
   this run. float32 against bfloat16 on the first ``--f32-rows`` rows shows what the half-size copy costs.
4. **ANN** (``topk``): ``bank.build_index("ivf_flat")`` (timed) and ``bank.ann_neighbors`` + ``project_subset``
   for the same 64 queries, per ``--nprobes``: ms per image against exact batched ``pd``, recall@64 against the
   exact 64 nearest rows, and the cosine between the ANN projection and the exact one. The exact reference is
   computed from the float16 shards, which hold exactly the values stored in the bank.

    .venv/bin/python benchmarks/big_bank.py --rows 300000          # a quick pass (~3 minutes)
    .venv/bin/python benchmarks/big_bank.py                        # 6.2M rows: ~40 GB of disk, ~30 minutes

Needs a quiet machine (on 2 cores another busy process makes every number meaningless). Output: human-readable
lines and a final JSON line; ratios, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from topk import clustered_rows as clustered  # noqa: E402  (the same synthetic world as the topk benchmark)
from topk import noise_queries, unit_rows  # noqa: E402

SHARD_ROWS = 1_000_000
CHUNK = 16_384  # rows per commit, both for the import and for its bare-LanceDB baseline


def write_shards(folder: Path, rows: int, centres: np.ndarray, rng: np.random.Generator) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "text_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    shards = []
    for i, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        path = folder / "text_emb" / f"text_emb_{i}.npy"
        np.save(path, clustered(n, centres, rng).astype(np.float16))
        pq.write_table(pa.table({"caption": [f"row {j}" for j in range(start, start + n)]}),
                       folder / "metadata" / f"metadata_{i}.parquet")
        shards.append(path)
    return shards


def run_child(code: str, env: dict[str, str]) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last. Adds the child's peak RSS."""
    # VmHWM, not ru_maxrss: Linux carries the forking parent's high-water mark across exec into ru_maxrss
    tail = "\nimport re, json as _j; _hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])" \
           "\nprint(_j.dumps({**result, 'peak_rss_gb': _hwm / 1e6}))"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code + tail], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start}


IMPORT = """
import sys; sys.path.insert(0, {root!r})
from decapflow.bank.importer import run_import
report = run_import({src!r}, "big", encoder="synthetic-512", chunk_size={chunk})
result = {{"written": report.written, "rows": report.rows, "seconds": report.seconds}}
"""

BARE = """
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, lancedb, glob, time
start = time.perf_counter()
db = lancedb.connect({dest!r}); table = None; rows = 0
for shard in sorted(glob.glob({src!r} + "/text_emb/*.npy"), key=lambda p: int(p.rsplit("_", 1)[1][:-4])):
    vectors = np.load(shard, mmap_mode="r")
    texts = pq.read_table(shard.replace("text_emb/text_emb_", "metadata/metadata_").replace(".npy", ".parquet"))
    texts = texts.column("caption").to_pylist()
    for s in range(0, len(vectors), {chunk}):
        v = np.asarray(vectors[s:s + {chunk}], dtype=np.float32)
        batch = pa.table({{"text": texts[s:s + {chunk}],
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])}})
        table = db.create_table("bare", batch) if table is None else table
        if rows: table.add(batch)
        rows += len(v)
result = {{"rows": rows, "seconds": time.perf_counter() - start}}
"""


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=6_217_799, help="bank rows (BookCorpus: 6,217,799)")
    parser.add_argument("--centres", type=int, default=None,
                        help="clusters (default: one per 3,100 rows, BookCorpus-sized at 2,005; with far fewer rows per "
                             "cluster an image query's nearest rows are noise from everywhere and no IVF finds them)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--nprobes", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--f32-rows", type=int, default=1_000_000, help="rows for float32 vs bfloat16 (0: skip)")
    parser.add_argument("--threads", type=int, default=2, help="torch/BLAS threads")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare-LanceDB import baseline")
    parser.add_argument("--tmp", default=None, help="parent folder for the data (needs ~6.5 KB per row)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    args.centres = args.centres or max(1, args.rows // 3100)
    centres = unit_rows(rng.standard_normal((args.centres, args.dim), dtype=np.float32))
    figures: dict[str, float] = {"rows": args.rows, "centres": args.centres, "threads": args.threads}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "DECAPFLOW_HOME": str(tmp / "home"), "OMP_NUM_THREADS": str(args.threads)}
        os.environ["DECAPFLOW_HOME"] = env["DECAPFLOW_HOME"]
        start = time.perf_counter()
        shards = write_shards(tmp / "src", args.rows, centres, rng)
        print(f"data: {args.rows:,} x {args.dim} float16 in {len(shards)} shards, {time.perf_counter() - start:.0f} s",
              flush=True)

        # ---------------------------------------------------------------------------------------- import
        if not args.no_baseline:
            bare = run_child(BARE.format(dest=str(tmp / "bare"), src=str(tmp / "src"), chunk=CHUNK), env)
            shutil.rmtree(tmp / "bare")
            print(f"bare LanceDB append: {bare['seconds']:.0f} s, peak RSS {bare['peak_rss_gb']:.2f} GB", flush=True)
            figures.update(bare_import_s=bare["seconds"], bare_peak_rss_gb=bare["peak_rss_gb"])
        imp = run_child(IMPORT.format(root=str(ROOT), src=str(tmp / "src"), chunk=CHUNK), env)
        line = f"decapflow memory import: {imp['seconds']:.0f} s ({imp['rows'] / imp['seconds']:,.0f} rows/s), " \
               f"peak RSS {imp['peak_rss_gb']:.2f} GB"
        if not args.no_baseline:
            line += f"; {imp['seconds'] / bare['seconds']:.2f}x the bare append"
        print(line, flush=True)
        figures.update(import_s=imp["seconds"], import_peak_rss_gb=imp["peak_rss_gb"], import_rows=imp["rows"])

        from decapflow.bank.memory import Registry
        from decapflow.bank.rows import BF16Rows
        from decapflow.caption.projection import project, project_subset

        bank = Registry().open("big")
        start = time.perf_counter()
        half, _ = bank.vector_cache("bfloat16")
        figures["bf16_copy_s"] = time.perf_counter() - start
        print(f"bfloat16 copy: {half.nbytes / 1e9:.2f} GB written in {figures['bf16_copy_s']:.0f} s", flush=True)
        for i in range(0, len(half), 1 << 20):  # read it once, so every timing sees a warm page cache
            int(half.bits[i : i + (1 << 20)].max())

        # ----------------------------------------------------------------------------- exact reference
        queries = noise_queries(64, centres, rng)
        start = time.perf_counter()
        exact_vec, exact_ids, exact_sims = exact_reference(queries, [np.load(p, mmap_mode="r") for p in shards])
        print(f"exact reference (float16 source): {time.perf_counter() - start:.0f} s; best cosine to the bank "
              f"{exact_sims[:, 0].mean():.3f}, 64th {exact_sims[:, -1].mean():.3f}", flush=True)

        # ---------------------------------------------------------------------------- exact pd, bf16
        scratch = np.empty_like(half.bits)
        copy_s = best(lambda: np.copyto(scratch, half.bits), args.repeats)
        scratch = None
        copy_gbs = half.nbytes / copy_s / 1e9
        figures["copy_gbs"] = copy_gbs
        print(f"np.copyto of the bfloat16 copy: {copy_s:.2f} s = {copy_gbs:.2f} GB/s (baseline)", flush=True)
        pd_bf16 = project(queries, half)
        figures["pd_bf16_cos_min"] = float((pd_bf16.vectors * exact_vec).sum(1).min())
        for batch in (1, 64):
            q = queries[:batch]
            seconds = best(lambda q=q: project(q, half), args.repeats)
            gbs = half.nbytes / seconds / 1e9
            gemm = gemm_seconds(batch, half.shape, args.repeats)
            print(f"exact pd, bfloat16, batch {batch:>2}: {seconds:.2f} s = {seconds / batch * 1e3:.1f} ms/image, "
                  f"{gbs:.2f} GB/s = {gbs / copy_gbs:.0%} of copy; plain float32 GEMM of the same shape "
                  f"(scores + weighted sum) {gemm:.2f} s = {gemm / seconds:.0%} of pd's time", flush=True)
            figures.update({f"pd_b{batch}_s": seconds, f"pd_b{batch}_of_copy": gbs / copy_gbs,
                            f"pd_b{batch}_gemm_share": gemm / seconds})
        print(f"  cosine(pd over bfloat16, exact): min {figures['pd_bf16_cos_min']:.6f}", flush=True)

        rows = min(args.f32_rows, len(half))
        f32 = BF16Rows.decode(half.bits[:rows])
        sub = BF16Rows(half.bits[:rows])
        for batch in (1, 64) if rows else ():
            q = queries[:batch]
            t32 = best(lambda q=q: project(q, f32), args.repeats)
            t16 = best(lambda q=q: project(q, sub), args.repeats)
            print(f"first {rows:,} rows, batch {batch:>2}: float32 {t32:.3f} s, bfloat16 {t16:.3f} s "
                  f"({t32 / t16:.2f}x)", flush=True)
            figures[f"bf16_speedup_b{batch}"] = t32 / t16
        f32 = None

        # ---------------------------------------------------------------------------------------- ANN
        start = time.perf_counter()
        bank.build_index("ivf_flat")
        figures["index_build_s"] = time.perf_counter() - start
        print(f"IVF_FLAT index (dot product): built in {figures['index_build_s']:.0f} s", flush=True)
        exact_per_image = figures["pd_b64_s"] / 64
        for nprobes in args.nprobes:
            def ann(nprobes=nprobes):
                vectors, texts = bank.ann_neighbors(queries, 64, nprobes=nprobes)
                return project_subset(queries, vectors), texts

            (proj, texts), seconds = ann(), best(ann, args.repeats)
            found = [{int(t.split()[1]) for t in row if t} for row in texts]
            recall = float(np.mean([len(f & set(e.tolist())) / 64 for f, e in zip(found, exact_ids, strict=True)]))
            cos = (proj.vectors * exact_vec).sum(1)
            print(f"topk over IVF_FLAT, nprobes {nprobes:>3}: {seconds / 64 * 1e3:.1f} ms/image "
                  f"({exact_per_image / (seconds / 64):.1f}x faster than exact batched pd), recall@64 {recall:.3f}, "
                  f"cosine to exact mean {cos.mean():.4f} min {cos.min():.4f}", flush=True)
            figures.update({f"ann_np{nprobes}_ms": seconds / 64 * 1e3, f"ann_np{nprobes}_speedup": exact_per_image /
                            (seconds / 64), f"ann_np{nprobes}_recall": recall, f"ann_np{nprobes}_cos_min": float(cos.min())})
    print(json.dumps(figures))


def exact_reference(queries: np.ndarray, shards: list[np.ndarray], tau: float = 0.01, k: int = 64
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact projection (float64 softmax) and the exact k nearest rows over all shards as one bank, written
    independently of the library: (unit [B, D], ids [B, k], similarities [B, k])."""
    block = 65_536
    run_max = np.full((len(queries), 1), -np.inf)
    run_sum = np.zeros((len(queries), 1))
    acc = np.zeros(queries.shape)
    top_ids = np.zeros((len(queries), 0), np.int64)
    top_sims = np.zeros((len(queries), 0), np.float32)
    offset = 0
    for shard in shards:
        for i in range(0, len(shard), block):
            rows = np.asarray(shard[i : i + block], dtype=np.float32)
            sims = queries @ rows.T  # [B, c]
            logits = sims.astype(np.float64) / tau
            new_max = np.maximum(run_max, logits.max(1, keepdims=True))
            weights = np.exp(logits - new_max)
            scale = np.exp(run_max - new_max)
            run_sum = run_sum * scale + weights.sum(1, keepdims=True)
            acc = acc * scale + weights @ rows.astype(np.float64)
            run_max = new_max
            ids = np.concatenate([top_ids, np.arange(offset + i, offset + i + len(rows))[None].repeat(len(queries), 0)], 1)
            both = np.concatenate([top_sims, sims], 1)
            keep = np.argsort(-both, axis=1, kind="stable")[:, :k]
            top_ids, top_sims = np.take_along_axis(ids, keep, 1), np.take_along_axis(both, keep, 1)
        offset += len(shard)
    return acc / np.linalg.norm(acc, axis=1, keepdims=True), top_ids, top_sims


def gemm_seconds(batch: int, shape: tuple[int, int], repeats: int) -> float:
    """A plain float32 [batch, D] x [D, N] product and [batch, N] x [N, D] product over the bank's shape, in
    row blocks of the same size the library uses (the arithmetic floor of an exact projection)."""
    rows = 512
    block = np.random.default_rng(0).standard_normal((rows, shape[1]), dtype=np.float32)
    q = np.random.default_rng(1).standard_normal((batch, shape[1]), dtype=np.float32)
    blocks = shape[0] // rows

    def run() -> None:
        for _ in range(blocks):
            s = q @ block.T
            s @ block

    return best(run, repeats)


if __name__ == "__main__":
    main()
