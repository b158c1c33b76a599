"""``topk`` judged by its captions on a big bank with real geometry (issue 18), against exact ``pd`` in the same run.

The bank is ``--rows`` distinct sentences of the synthetic world (:mod:`corpora.world_text`: each true of a
rendered scene, with positions, relations and 60 phrasings) ingested with ``decapflow ingest --encoder world-gap``,
the world CLIP with a real-CLIP-sized modality gap (0.83). Its decoder is trained on the bank by ``decapflow train
--max-steps``. The queries are what users caption: the CLIP embeddings of ``--images`` rendered test images (split
TEST_SEED, 5 reference captions each), so an image's nearest sentences describe it. The old isotropic queries (a
bank row drowned in noise to cosine ~0.3: their nearest rows are whatever noise aligns with) are kept as the named
stress case ``noise``, scored only against ``pd``.

Per way of projecting, with tau 0.01 and k 64:

* ``pd``: exact projection over the bank's float32 copy, batches of 64 (what ``Captioner`` runs);
* ``exact top-k``: the exact 64 nearest rows (``nearest``) then ``project_subset``: the best any 64-row ANN can do;
* ``topk npN``: ``bank.ann_neighbors`` over LanceDB's IVF_FLAT index (``decapflow memory index``'s default) at
  nprobes N, then ``project_subset`` (what ``Captioner._topk`` ran on a bank of >= 200k rows before the in-process
  IVF);
* ``ivf npN``: the in-process IVF (:mod:`decapflow.bank.ivf`, built by ``decapflow memory index`` beside the local
  copy) searched at nprobes N, then ``project_subset`` over the local copy (what ``Captioner._topk`` runs now on a bank
  of >= 200k rows, at DEFAULT_NPROBES).

After the table: fused retrieval (each image's ``l`` = 5 and 9 nearest rows gathered from the local copy, the part
of ``fused`` that reads the bank) exact and through the IVF, against ``pd``; and what reusing an earlier version's
centroids costs in recall (centroids trained on the first half of the rows, every row assigned).

it prints ms/image of the projection (decoding is the same for all and timed once), recall@64 against the exact 64
nearest rows, the cosine of its prefixes to ``pd``'s, the share of captions identical to ``pd``'s, CIDEr (x100) and
attribute accuracy of the decoded captions. Ingest, decoder training and index build are run in subprocesses
(wall time and peak RSS). ``--home`` keeps the bank, decoder and index, so a second run measures only the
strategies (``--rebuild-index`` rebuilds both indexes).

    .venv/bin/python benchmarks/big_world.py --rows 20000 --steps 300 --images 64     # smoke run, ~3 minutes
    .venv/bin/python benchmarks/big_world.py --rows 1000000 --home /tmp/bigworld       # ~35 minutes the first time

Needs a quiet machine. Output: a markdown table and a final JSON line; ratios, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from big_bank import run_child  # noqa: E402  (a subprocess's result, wall time and peak RSS)

BANK = "bigworld"
K = 64
CLI = """
import sys; sys.path.insert(0, {root!r})
from decapflow.cli.base import main
try:
    main({args!r}, standalone_mode=False)
except SystemExit as exc:
    if exc.code: raise
result = {{}}
"""
INDEX = """
import sys, time; sys.path.insert(0, {root!r})
from decapflow.bank.memory import Registry
start = time.perf_counter(); Registry().open({bank!r}).build_index("ivf_flat")
result = {{"seconds": time.perf_counter() - start}}
"""
IVF = """
import sys, time; sys.path.insert(0, {root!r})
from decapflow.bank.memory import Registry
bank = Registry().open({bank!r}); bank.vector_cache()  # the local copy first: what a captioner has already
start = time.perf_counter(); index = bank.build_ivf(rebuild={rebuild!r})
result = {{"seconds": time.perf_counter() - start, "partitions": index.partitions, "meta": index.meta}}
"""


def prepare(home: Path, rows: int, steps: int, rebuild_index: bool) -> dict:
    """Corpus, ingest, decoder and index, each skipped when ``home`` already holds it."""
    from corpora.world_text import write_big_corpus
    from decapflow.bank.memory import BankError, Registry

    figures: dict = {}
    env = {**os.environ, "DECAPFLOW_HOME": str(home)}
    try:
        bank = Registry().open(BANK)
    except BankError:
        bank = None
    if bank is None:
        start = time.perf_counter()
        corpus = write_big_corpus(home / "corpus.txt.gz", rows)
        figures["corpus_s"] = time.perf_counter() - start
        print(f"corpus: {rows:,} distinct sentences in {figures['corpus_s']:.0f} s", flush=True)
        got = run_child(CLI.format(root=str(ROOT), args=["ingest", str(corpus), "--memory", BANK, "--encoder",
                                                          "world-gap", "--prefect", "off"]), env)
        figures.update(ingest_s=got["wall_s"], ingest_peak_rss_gb=got["peak_rss_gb"])
        print(f"decapflow ingest: {got['wall_s']:.0f} s ({rows / got['wall_s']:,.0f} sentences/s), peak RSS "
              f"{got['peak_rss_gb']:.2f} GB", flush=True)
        bank = Registry().open(BANK)
    figures["bank_rows"] = len(bank)
    from decapflow.decoder.registry import current_decoder

    if current_decoder(BANK) is None:
        got = run_child(CLI.format(root=str(ROOT), args=["train", "--memory", BANK, "--max-steps", str(steps),
                                                          "--prefect", "off"]), env)
        figures.update(train_s=got["wall_s"], train_peak_rss_gb=got["peak_rss_gb"])
        print(f"decapflow train --max-steps {steps}: {got['wall_s']:.0f} s, peak RSS {got['peak_rss_gb']:.2f} GB",
              flush=True)
    if rebuild_index or not bank.has_index():
        got = run_child(INDEX.format(root=str(ROOT), bank=BANK), env)
        figures.update(index_s=got["seconds"], index_peak_rss_gb=got["peak_rss_gb"])
        print(f"IVF_FLAT index: {got['seconds']:.0f} s, peak RSS {got['peak_rss_gb']:.2f} GB", flush=True)
        bank = Registry().open(BANK)  # the index made a new version
    if rebuild_index or not bank.has_ivf():
        got = run_child(IVF.format(root=str(ROOT), bank=BANK, rebuild=rebuild_index), env)
        figures.update(ivf_s=got["seconds"], ivf_peak_rss_gb=got["peak_rss_gb"], ivf_partitions=got["partitions"])
        print(f"in-process IVF: {got['partitions']} partitions in {got['seconds']:.0f} s (k-means "
              f"{got['meta']['train_s']:.0f} s, assignment {got['meta']['assign_s']:.0f} s), peak RSS "
              f"{got['peak_rss_gb']:.2f} GB", flush=True)
    return figures


def timed_batches(fn, queries: np.ndarray, repeats: int, batch: int = 64) -> tuple[list, float]:
    """``fn`` over ``queries`` in batches; (the results of the last pass, best seconds per query)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = [fn(queries[i : i + batch]) for i in range(0, len(queries), batch)]
        best = min(best, time.perf_counter() - start)
    return out, best / len(queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="distinct sentences in the bank")
    parser.add_argument("--steps", type=int, default=1500, help="decoder training steps (batch 64)")
    parser.add_argument("--images", type=int, default=300, help="rendered test images (split TEST_SEED)")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[5, 10, 20], help="of LanceDB's index")
    parser.add_argument("--ivf-nprobes", type=int, nargs="+", default=None,
                        help="of the in-process IVF (default: 4, 8, DEFAULT_NPROBES, 32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--home", type=Path, default=None, help="keep the bank, decoder and index here")
    parser.add_argument("--rebuild-index", action="store_true")
    parser.add_argument("--sizes", default="10000,100000,300000",
                        help="also caption against nested random subsets of these sizes (pd, exact top-k, nnd); "
                             "'' to skip")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        home = (args.home or Path(tmp_name) / "home").resolve()
        home.mkdir(parents=True, exist_ok=True)
        os.environ["DECAPFLOW_HOME"] = str(home)
        os.environ["DECAPFLOW_THREADS"] = str(args.threads)
        figures = {"rows": args.rows, "images": args.images, "threads": args.threads,
                   **prepare(home, args.rows, args.steps, args.rebuild_index)}
        measure(args, home, figures)
    print(json.dumps(figures))


def measure(args: argparse.Namespace, home: Path, figures: dict) -> None:
    import torch

    from corpora import world
    from decapflow.bank.ivf import DEFAULT_NPROBES
    from decapflow.caption.captioner import Captioner, Options
    from decapflow.caption.projection import nearest, project, project_subset
    from decapflow.evaluation.evaluate import load_coco_references, score_many
    from decapflow.lifecycle.demo import attribute_scores

    torch.set_num_threads(args.threads)
    captioner = Captioner.for_bank(BANK, Options(strategy="pd"), precision="float32")
    bank, vectors = captioner.bank, captioner.vectors
    row_of = {text: i for i, text in enumerate(captioner.texts.to_pylist())}
    images = world.write_image_set(home / f"images-{args.images}", args.images)
    files = sorted(images.glob("*.png"))
    refs, _ = load_coco_references(images / "captions.json")
    scenes = world.load_scenes(images)
    ids = [int(f.stem.rsplit("_", 1)[1]) for f in files]
    from PIL import Image

    queries = captioner.encoder.encode_image([Image.open(f).convert("RGB") for f in files])  # [n, D]
    rng = np.random.default_rng(0)
    rows = np.asarray(vectors[rng.choice(len(vectors), 64, replace=False)], dtype=np.float32)
    noise = rows + 3.2 * rng.standard_normal(rows.shape, dtype=np.float32) / np.sqrt(rows.shape[1])
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)  # the stress case: cosine ~0.3 to its source row

    def exact_pd(q):
        return project(q, vectors).vectors, None

    def exact_top(k):
        def run(q):
            near, _ = nearest(q, vectors, k=k)
            return project_subset(q, vectors, neighbor_ids=near).vectors, near if k == K else None
        return run

    def ann(nprobes):
        def run(q):
            got, texts = bank.ann_neighbors(q, K, nprobes=nprobes)
            padded = np.array([[t == "" for t in row] for row in texts])
            local = np.arange(got.shape[0] * K).reshape(-1, K)
            local[padded] = -1
            prefixes = project_subset(q, got.reshape(-1, got.shape[2]), neighbor_ids=local).vectors
            return prefixes, np.array([[row_of.get(t, -1) for t in row] for row in texts])
        return run

    index = bank.ivf(build=False)  # prepare() built it for this version
    ivf_nprobes = args.ivf_nprobes or sorted({4, 8, DEFAULT_NPROBES, 32})

    def ivf(nprobes):
        def run(q):
            found, _ = index.search(q, K, nprobes)
            return project_subset(q, vectors, neighbor_ids=found).vectors, found
        return run

    def nnd(q):
        near, _ = nearest(q, vectors, k=1)
        return np.asarray(vectors[near[:, 0]], dtype=np.float32), None

    ways = {"pd": exact_pd, "exact top-k": exact_top(K), **{f"topk np{n}": ann(n) for n in args.nprobes},
            **{f"ivf np{n}" + (" (default)" if n == DEFAULT_NPROBES else ""): ivf(n) for n in ivf_nprobes},
            "exact top-16": exact_top(16), "nnd": nnd}
    results: dict[str, dict] = {}
    exact_ids = {}
    for kind, q in (("images", queries), ("noise", noise)):
        exact_ids[kind] = nearest(q, vectors, k=K)[0]
        for name, fn in ways.items():
            out, seconds = timed_batches(fn, q, args.repeats)
            prefixes = np.concatenate([o[0] for o in out])
            found = None if out[0][1] is None else np.concatenate([o[1] for o in out])
            recall = None if found is None else float(np.mean(
                [len(set(f) & set(e)) / K for f, e in zip(found, exact_ids[kind], strict=True)]))
            results[f"{kind}/{name}"] = {"ms": seconds * 1e3, "prefixes": prefixes, "recall": recall}
            print(f"{kind:>6} {name:<12} {seconds * 1e3:7.2f} ms/query" +
                  ("" if recall is None else f", recall@64 {recall:.3f}"), flush=True)

    start = time.perf_counter()
    captions = {key: captioner.decoder.decode_texts(r["prefixes"], captioner.vocab, batch_size=64)
                for key, r in results.items()}
    decode_ms = (time.perf_counter() - start) / sum(len(c) for c in captions.values()) * 1e3
    scores = score_many({i: refs[i] for i in ids}, {key: dict(zip(ids, c, strict=True))
                                                    for key, c in captions.items() if key.startswith("images/")},
                        metrics=["cider"])
    figures["decode_ms_per_image"] = decode_ms
    pd_ms = results["images/pd"]["ms"]
    print(f"\nbank {len(vectors):,} x {vectors.shape[1]} (float32), {len(ids)} world images, tau 0.01, k {K}; "
          f"decoding {decode_ms:.1f} ms/image (all ways alike)\n")
    print("| queries | way | ms/image | x pd's speed | recall@64 | cos to pd (mean / min) | identical to pd | "
          "identical to exact top-k | CIDEr | attr |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for key, r in results.items():
        kind, name = key.split("/")
        base = results[f"{kind}/pd"]
        cos = (r["prefixes"] * base["prefixes"]).sum(1)
        same = float(np.mean([a == b for a, b in zip(captions[key], captions[f"{kind}/pd"], strict=True)]))
        kept = float(np.mean([a == b for a, b in zip(captions[key], captions[f"{kind}/exact top-k"], strict=True)]))
        row = {"ms": r["ms"], "speedup": pd_ms / r["ms"] if kind == "images" else base["ms"] / r["ms"],
               "recall": r["recall"], "cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "identical": same,
               "identical_to_exact_topk": kept}
        if kind == "images":
            row["cider"] = scores[key]["CIDEr"] * 100
            row["attr"] = attribute_scores(dict(zip(ids, captions[key], strict=True)), scenes)["attr-mean"] * 100
        figures[key] = row
        print(f"| {kind} | {name} | {row['ms']:.2f} | {row['speedup']:.1f} | "
              f"{'-' if row['recall'] is None else format(row['recall'], '.3f')} | "
              f"{row['cos_mean']:.4f} / {row['cos_min']:.4f} | {same:.1%} | {kept:.1%} | "
              f"{row.get('cider', float('nan')):.1f} | {row.get('attr', float('nan')):.1f} |")
    retrieval(index, vectors, queries, results["images/pd"]["ms"], ivf_nprobes, args.repeats, figures)
    reuse(home, index, vectors, queries, exact_ids["images"], ivf_nprobes, figures)
    if args.sizes:
        by_size(captioner, {i: refs[i] for i in ids}, ids, queries, scenes, args.sizes, figures)
    reranked(captioner, {i: refs[i] for i in ids}, ids, queries, scenes, figures)


def retrieval(index, vectors, queries: np.ndarray, pd_ms: float, nprobes: list[int], repeats: int, figures: dict
              ) -> None:
    """What ``fused`` reads from the bank: each image's l nearest rows, gathered from the local copy ([B, l, D])."""
    from decapflow.caption.projection import nearest

    print(f"\nfused retrieval: the l nearest rows of each image, gathered from the local copy (batches of 64; pd "
          f"{pd_ms:.2f} ms/image in the same run)\n")
    print("| l | way | ms/image | x pd's speed | recall@l |\n|---:|---|---:|---:|---:|")
    for rows in (5, 9):
        exact = nearest(queries, vectors, k=rows)[0]
        ways = {"exact": lambda q, r=rows: nearest(q, vectors, k=r)[0],
                **{f"ivf np{n}": lambda q, r=rows, n=n: index.search(q, r, n)[0] for n in nprobes}}
        for name, fn in ways.items():
            out, seconds = timed_batches(lambda q, fn=fn: _gathered(fn, q, vectors), queries, repeats)
            found = np.concatenate(out)
            recall = float(np.mean([len(set(f) & set(e)) / rows for f, e in zip(found, exact, strict=True)]))
            figures[f"fused-retrieval/l{rows}/{name}"] = {"ms": seconds * 1e3, "speedup": pd_ms / (seconds * 1e3),
                                                          "recall": recall}
            print(f"| {rows} | {name} | {seconds * 1e3:.3f} | {pd_ms / (seconds * 1e3):.1f} | {recall:.4f} |")


def _gathered(fn, q: np.ndarray, vectors) -> np.ndarray:
    from decapflow.caption.projection import gather_neighbors

    found = fn(q)
    gather_neighbors(vectors, found)
    return found


def reuse(home: Path, index, vectors, queries: np.ndarray, exact: np.ndarray, nprobes: list[int], figures: dict
          ) -> None:
    """Recall@64 when the centroids come from an earlier version: trained on the first half of the rows (the bank
    before its last ingest of the same size), every row assigned, against this version's own centroids."""
    import shutil

    from decapflow.bank.ivf import IvfIndex, train_centroids

    folder = home / "ivf-reuse-check"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    half = train_centroids(np.asarray(vectors[: len(vectors) // 2]), index.partitions)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    reused = IvfIndex.write(folder, vectors, "float32", centroids=half)
    assign_s = time.perf_counter() - start
    print(f"\ncentroids of the first {len(vectors) // 2:,} rows reused for all {len(vectors):,} (k-means {train_s:.0f} s, "
          f"assignment and sorting {assign_s:.0f} s): recall@64 of image queries\n")
    print("| nprobes | own centroids | reused centroids |\n|---:|---:|---:|")
    for n in nprobes:
        own, old = (float(np.mean([len(set(f) & set(e)) / K for f, e in
                                   zip(ix.search(queries, K, n)[0], exact, strict=True)])) for ix in (index, reused))
        figures[f"reuse/np{n}"] = {"own": own, "reused": old}
        print(f"| {n} | {own:.4f} | {old:.4f} |")
    shutil.rmtree(folder, ignore_errors=True)


def reranked(captioner, refs: dict, ids: list[int], queries: np.ndarray, scenes: dict, figures: dict) -> None:
    """rerank with pd or topk as its projection candidate, once the bank has a mean image embedding (500
    unlabelled world images, split UNLABELLED_SEED); ms/image includes decoding and embedding the candidates."""
    from dataclasses import replace

    from corpora import world
    from decapflow.caption.modality import record_image_mean
    from decapflow.evaluation.evaluate import score_many
    from decapflow.lifecycle.demo import attribute_scores

    unlabelled = [scene for scene, _ in world.make_split(500, world.UNLABELLED_SEED, n_captions=1)]
    mean, gap, _ = record_image_mean(captioner.bank, captioner.encoder, [world.render(s) for s in unlabelled],
                                     "world, unlabelled (benchmarks/big_world.py)")
    rerank = captioner.with_options(replace(captioner.options, strategy="rerank"))
    rerank.image_mean = mean
    sets = [("pd", "ms"), ("topk", "ms"), ("pd", "topk", "ms"), ("topk",), ("ms",)]
    runs, seconds = {}, {}
    for names in sets:
        start = time.perf_counter()
        captions = [c.caption for i in range(0, len(queries), 64)
                    for c in rerank._rerank(queries[i : i + 64], names)]
        seconds[names] = (time.perf_counter() - start) / len(queries)
        runs[names] = dict(zip(ids, captions, strict=True))
    scores = score_many(refs, runs, metrics=["cider"])
    print(f"\nrerank (image mean of 500 unlabelled images, gap {gap:.2f}): candidates, ms/image (with decoding), "
          "CIDEr, attr")
    print("| candidates | ms/image | CIDEr | attr |\n|---|---:|---:|---:|")
    for names in sets:
        attr = attribute_scores(runs[names], scenes)["attr-mean"] * 100
        figures[f"rerank/{'+'.join(names)}"] = {"ms": seconds[names] * 1e3, "cider": scores[names]["CIDEr"] * 100,
                                                "attr": attr}
        print(f"| {', '.join(names)} | {seconds[names] * 1e3:.1f} | {scores[names]['CIDEr'] * 100:.1f} | {attr:.1f} |")


def by_size(captioner, refs: dict, ids: list[int], queries: np.ndarray, scenes: dict, sizes: str, figures: dict
            ) -> None:
    """pd against the exact top-k projection (and nnd) on nested random subsets of the bank: where does
    truncating the softmax to the 64 nearest rows start to pay?"""
    from decapflow.evaluation.memory_size import parse_sizes, run_study
    from decapflow.lifecycle.demo import attribute_scores

    def attr(captions: dict) -> dict[str, float]:
        return {"attr": attribute_scores(captions, scenes)["attr-mean"]}

    study = run_study(captioner, refs, ids, queries, parse_sizes(sizes), strategies=("pd", "topk", "nnd"),
                      metrics=["cider"], extra_scores=attr)
    print("\n| bank rows | pd CIDEr | exact top-k CIDEr | nnd CIDEr | pd attr | top-k attr | nnd attr |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    table = study.table()
    for size in table["pd"]:
        row = {s: table[s][size] for s in ("pd", "topk", "nnd")}
        figures[f"size/{size}"] = {s: {"cider": r["CIDEr"] * 100, "attr": r["attr"] * 100} for s, r in row.items()}
        print(f"| {size} | " + " | ".join(f"{row[s]['CIDEr'] * 100:.1f}" for s in row) + " | "
              + " | ".join(f"{row[s]['attr'] * 100:.1f}" for s in row) + " |")


if __name__ == "__main__":
    main()
