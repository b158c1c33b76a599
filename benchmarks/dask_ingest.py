"""Dask ingest benchmarks: figures and ratios against a baseline measured in the same run, never assertions.

    python benchmarks/dask_ingest.py ratio [--sentences 1536] [--chunk 256]        # run_ingest: 1 process vs workers=2
    python benchmarks/dask_ingest.py sweep [--workers-list 1 2 4 8 16]             # SIMULATED compute, N workers
    python benchmarks/dask_ingest.py ratio --quick ; python benchmarks/dask_ingest.py sweep --quick

Encoder: ``ViT-B-32:random`` (``--encoder``), open_clip's ViT-B-32 with deterministic random weights (seed 0),
built offline by decapflow's ``load_encoder`` exactly as ``benchmarks/ingest.py`` does: no weights are downloaded,
and a random-weight model costs the same per sentence as a trained one. Any spec ``load_encoder`` accepts offline
works (``MODEL.json:random``, a local weights file). Corpus: ``benchmarks/ingest.py``'s distinct caption-like
sentences. Everything runs on the CPU, under a fresh ``DECAPFLOW_HOME``/``PREFECT_HOME`` (temporary directories).

``ratio``: the same corpus and encoder are ingested into a fresh bank twice, each run in a fresh subprocess with
its own ``DECAPFLOW_HOME`` (no cache helps the second): (a) ``run_ingest(...)`` in one process, torch on
``--threads`` 2 threads; (b) ``run_ingest(..., workers=2)``: a local Dask cluster of 2 single-threaded worker
processes (``decapflow.bank.dask_embed.DaskEmbedder``). Reported for each: sentences/s over the whole ``run_ingest``
call (encoder loading, and for (b) cluster start-up and shutdown, included), the rate after start-up (from
"ready" to the last commit; ready = (a) bank opened and encoder loaded, (b) cluster up and the encoder loaded once
on a worker to learn its dimension), the time to the first commit, and for (b) the cluster start-up
(``LocalCluster``), the embedder start-up and the cluster's shutdown. On a 2-core machine both runs use the
same 2 cores, so expect (b)/(a) ~1x minus the start-up, the second worker loading its own copy of the encoder on
its first chunk, and pickling chunks/vectors between processes. ``--chunk`` is small (256, the default ingest
uses 4096) so the corpus makes several chunks and both workers get some.

``sweep``: how the design scales on a real cluster, measured on a machine with 2 cores. THIS IS A SIMULATION OF
THE COMPUTE WITH MEASURED DURATIONS. First, in the same run, the real per-chunk embedding time is calibrated:
``decapflow.bank.dask_embed.embed_texts`` (what a worker runs) on ``--calib-rows`` sentences, torch on 1 thread
(median of ``--calib-reps``), and the per-chunk commit time of ``MemoryBank.add`` at ``--chunk`` rows and at the
default chunk (4096 rows, random vectors, into a scratch bank). Then, for each N of ``--workers-list``, the real
pipeline runs: ``run_ingest(..., remote=...)`` with a real ``distributed.LocalCluster`` of N worker processes of
1 thread each (``DaskEmbedder`` itself, subclassed, so the cluster, the client and the ``window`` of 2N chunks in
flight are decapflow's), reading, deduplicating and committing every chunk in corpus order into a real LanceDB
bank. Only the worker task is replaced: instead of computing, it sleeps for the calibrated time (scaled to the
chunk's rows) and returns precomputed random unit float32 vectors of the encoder's dimension (scattered to every
worker once, so making them costs nothing per task; the texts still travel to the worker and the vectors back).
Sleeping uses no CPU, so N sleeping workers stand in for N machines. Not simulated: each real worker loading its
own encoder once (one does, to learn the dimension; the others would, once, on their first chunk), network
latency between machines, and the scheduler's CPU on a busier cluster. For each N: sentences/s, speed-up vs N=1,
efficiency (speed-up/N), the ideal N x chunk/compute rate, the measured per-chunk commit time on the client,
the commit-bound ceiling (chunk rows / median commit seconds) and the client-bound ceiling (chunk rows / client
busy seconds per chunk: reading, submitting, receiving and committing; time blocked on results excluded), which
is what limits scaling; also how many chunks each worker ran and how far apart the first N chunks started
(Dask's placement). Cluster start-up (and the one real encoder load) is reported, not counted in the rates.
``--chunk-seconds`` replaces the calibrated per-chunk time (e.g. to simulate GPUs).

Default corpus for ``sweep``: 2 chunks per worker at the largest N (8192 sentences at 16 x 256), halved when the
calibrated N=1 run would exceed ~150 s. ``--quick``: ``ratio`` on 768 sentences; ``sweep`` over N = 1 2 4 8 with
1 chunk per worker at N=8 (2048 sentences), 2 calibration repeats. Meant to stay under ~6 minutes per mode on a
quiet 2-core machine; on a busy one (load ~5) ``ratio --quick`` took 2.7 min and ``sweep --quick`` 5 min. Output:
human-readable lines, then one JSON line of the figures. Run on a quiet machine: on 2 cores another busy process
slows torch several times and makes the calibration (and so the simulated times) longer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # not distributed's INFO lines (workers inherit it)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import captions, write_lines  # noqa: E402

SPEC = "ViT-B-32:random"
N1_BUDGET_S = 150.0  # the default sweep corpus is halved when the N=1 run would take longer than this


def fresh_env(home: Path, threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "DECAPFLOW_HOME": str(home / "decapflow"), "PREFECT_HOME": str(home / "prefect"),
           "HF_HUB_OFFLINE": "1"}
    for name in ("DECAPFLOW_STORE", "PREFECT_API_URL", "PREFECT_PROFILES_PATH"):
        env.pop(name, None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


class Commits:
    """A ``write`` for ``run_ingest``: ``write_chunk``, timed. Times are seconds since ``t0``."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.spans: list[tuple[float, float, int]] = []  # (start, end, rows) per commit

    def __call__(self, bank: Any, sentences: list, *rest: Any, **kw: Any) -> int:
        from decapflow.bank.ingest import write_chunk

        start = time.perf_counter()
        written = write_chunk(bank, sentences, *rest, **kw)  # whatever run_ingest passes (vectors, added_at, ...)
        self.spans.append((start - self.t0, time.perf_counter() - self.t0, len(sentences)))
        return written

    def figures(self) -> dict[str, Any]:
        if not self.spans:
            return {}
        durations = [end - start for start, end, _ in self.spans]
        return {
            "chunks": len(self.spans),
            "first_commit_s": round(self.spans[0][1], 3),
            "last_commit_s": round(self.spans[-1][1], 3),
            "commit_median_s": round(statistics.median(durations), 4),
            "commit_first_s": round(durations[0], 4),
            "commit_last_s": round(durations[-1], 4),
            "commit_total_s": round(sum(durations), 3),
        }


# ------------------------------------------------------------------------------------------------ ratio
def child(args: argparse.Namespace) -> None:
    """One ingest in this (fresh) process; prints a JSON line."""
    import torch

    if args.how == "single":
        torch.set_num_threads(args.threads)
    from decapflow.bank import dask_embed
    from decapflow.bank.ingest import run_ingest

    marks: dict[str, float] = {}
    if args.how == "single":  # ready: the bank open and the encoder loaded (inside run_ingest)
        from decapflow.bank import ingest

        open_with_encoder = ingest.open_with_encoder

        def timed_open_bank(*a: Any, **k: Any) -> Any:
            opened = open_with_encoder(*a, **k)
            marks["ready_at_s"] = time.perf_counter() - commits.t0
            return opened

        ingest.open_with_encoder = timed_open_bank
    else:  # ready: the cluster up and the encoder loaded on one worker
        import distributed  # time the pieces of run_ingest(workers=...) without changing them

        class TimedCluster(distributed.LocalCluster):
            def __init__(self, *a: Any, **k: Any) -> None:
                start = time.perf_counter()
                super().__init__(*a, **k)
                marks["cluster_start_s"] = time.perf_counter() - start

        class TimedEmbedder(dask_embed.DaskEmbedder):
            def __init__(self, *a: Any, **k: Any) -> None:
                start = time.perf_counter()
                super().__init__(*a, **k)
                marks["embedder_start_s"] = time.perf_counter() - start
                marks["ready_at_s"] = time.perf_counter() - commits.t0

            def close(self) -> None:
                start = time.perf_counter()
                super().close()
                marks["close_s"] = time.perf_counter() - start

        distributed.LocalCluster = TimedCluster  # DaskEmbedder imports it from distributed when it starts one
        dask_embed.DaskEmbedder = TimedEmbedder  # run_ingest imports it from decapflow.bank.dask_embed when it runs
    commits = Commits()
    report = run_ingest(Path(args.corpus), "bench", args.encoder, chunk_size=args.chunk, batch_size=args.batch_size,
                        device="cpu", write=commits, workers=args.workers if args.how == "dask" else None)
    wall = time.perf_counter() - commits.t0
    figures = commits.figures()
    after = figures["last_commit_s"] - marks["ready_at_s"]
    print(json.dumps({"how": args.how, "written": report.written, "wall_s": round(wall, 3),
                      "report_seconds": round(report.seconds, 3), "sentences_per_s": round(report.written / wall, 1),
                      "after_startup_sentences_per_s": round(report.written / after, 1),
                      "torch_threads": torch.get_num_threads() if args.how == "single" else 1,
                      **figures, **{k: round(v, 3) for k, v in marks.items()}}))


def run_child(how: str, corpus: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"decapflow-bench-{how}-") as home:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_child", "--how", how, "--corpus", str(corpus),
               "--encoder", args.encoder, "--chunk", str(args.chunk), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--workers", str(args.workers)]
        start = time.perf_counter()
        done = subprocess.run(cmd, env=fresh_env(Path(home), args.threads if how == "single" else None),
                              stdout=subprocess.PIPE, text=True, cwd=home)
        process_s = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{how} run failed (exit {done.returncode}); its stdout:\n{done.stdout}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": round(process_s, 2)}


def ratio(args: argparse.Namespace) -> None:
    if args.quick:
        args.sentences = args.sentences or 768
    args.sentences = args.sentences or 1536
    with tempfile.TemporaryDirectory(prefix="decapflow-bench-corpus-") as tmp:
        corpus = write_lines(Path(tmp) / "corpus.txt", captions(args.sentences))
        print(f"ratio: {args.sentences} sentences, encoder {args.encoder}, chunks of {args.chunk}, cpu "
              f"({os.cpu_count()} cores); each run in a fresh process and DECAPFLOW_HOME")
        single = run_child("single", corpus, args)
        line("(a) single process", single, f"torch {single['torch_threads']} threads")
        dask = run_child("dask", corpus, args)
        line(f"(b) workers={args.workers}", dask, f"{args.workers} worker processes x 1 thread")
        print(f"    cluster start-up {dask.get('cluster_start_s', 0):.1f} s (LocalCluster); embedder start-up "
              f"{dask.get('embedder_start_s', 0):.1f} s (cluster + encoder loaded on one worker); cluster close "
              f"{dask.get('close_s', 0):.1f} s")
        print(f"    note: IngestReport.seconds of (b) is {dask['report_seconds']:.1f} s: it starts after the cluster is "
              f"up (the wall time above includes it)")
    rate = dask["sentences_per_s"] / single["sentences_per_s"]
    after = dask["after_startup_sentences_per_s"] / single["after_startup_sentences_per_s"]
    print(f"ratio (b)/(a): {rate:.2f}x sentences/s end to end, {after:.2f}x after start-up (from ready to the last "
          f"commit); time to first commit (a) {single['first_commit_s']:.1f} s, (b) {dask['first_commit_s']:.1f} s")
    print(json.dumps({"mode": "ratio", "sentences": args.sentences, "encoder": args.encoder, "chunk": args.chunk,
                      "cores": os.cpu_count(), "single": single, "dask": dask, "ratio": round(rate, 3),
                      "after_startup_ratio": round(after, 3)}))


def line(label: str, r: dict[str, Any], how: str) -> None:
    print(f"{label} ({how}): {r['written']} written in {r['wall_s']:.1f} s = {r['sentences_per_s']:.1f} sentences/s; "
          f"ready at {r['ready_at_s']:.1f} s, first commit at {r['first_commit_s']:.1f} s, last at "
          f"{r['last_commit_s']:.1f} s ({r['chunks']} chunks) -> {r['after_startup_sentences_per_s']:.1f} sentences/s "
          f"after start-up; commit median {1000 * r['commit_median_s']:.0f} ms; whole process {r['process_s']:.1f} s")


# ------------------------------------------------------------------------------------------------ sweep
def simulated_embed(texts: list[str], block: Any, seconds: float) -> tuple[Any, int, str, float]:
    """On a worker: stand-in for ``embed_texts``: sleep ``seconds`` (no CPU), return ``len(texts)`` unit vectors,
    0 truncated, and (for the report) which worker ran it and when it started (epoch seconds)."""
    import time

    from distributed import get_worker

    start = time.time()
    time.sleep(seconds)
    return block[: len(texts)], 0, get_worker().address, start


class TimedFuture:
    """A Dask future whose ``result()`` is ``(vectors, truncated)``, adding the time spent waiting for it to
    ``owner.blocked`` and where and when the task ran to ``owner.tasks``."""

    def __init__(self, future: Any, owner: Any) -> None:
        self.future, self.owner = future, owner

    def result(self) -> Any:
        start = time.perf_counter()
        try:
            vectors, truncated, worker, started = self.future.result()
        finally:
            self.owner.blocked += time.perf_counter() - start
        self.owner.tasks.append((worker, started))
        return vectors, truncated


def simulated_embedder(spec: str, workers: int, rows: int, seconds_per_row: float, batch_size: int) -> Any:
    """decapflow's DaskEmbedder (its cluster, client, spec/dim from a worker, window), with compute simulated."""
    import numpy as np

    from decapflow.bank.dask_embed import DaskEmbedder

    class SimulatedEmbedder(DaskEmbedder):
        def __init__(self) -> None:
            super().__init__(spec, "cpu", workers=workers, batch_size=batch_size)
            self.client.wait_for_workers(workers)
            rng = np.random.default_rng(0)
            vectors = rng.standard_normal((rows, self.dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            self.block = self.client.scatter(vectors, broadcast=True)
            self.blocked = 0.0
            self.tasks: list[tuple[str, float]] = []  # (worker, start time) per chunk

        def submit(self, texts: list[str]) -> Any:
            future = self.client.submit(simulated_embed, texts, self.block, seconds_per_row * len(texts), pure=False)
            return TimedFuture(future, self)

    return SimulatedEmbedder()


def calibrate(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Real seconds per chunk: embedding on 1 torch thread (what a worker runs), committing on the client."""
    import numpy as np

    from decapflow.bank.dask_embed import embed_texts
    from decapflow.bank.ingest import DEFAULT_CHUNK
    from decapflow.bank.memory import Registry

    texts = captions(args.calib_rows, seed=1)
    start = time.perf_counter()
    embed_texts(args.encoder, "cpu", texts[:8], args.batch_size, threads=1)  # loads the encoder (cached)
    load_s = time.perf_counter() - start
    times = []
    for _ in range(args.calib_reps):
        start = time.perf_counter()
        vectors, _ = embed_texts(args.encoder, "cpu", texts, args.batch_size, threads=1)
        times.append(time.perf_counter() - start)
    per_row = statistics.median(times) / len(texts)
    dim = vectors.shape[1]
    bank = Registry(str(tmp / "calib-store")).create("calib", args.encoder, dim)
    rng = np.random.default_rng(0)
    commit: dict[int, float] = {}
    done = 0
    for rows in (args.chunk, DEFAULT_CHUNK):
        spans = []
        for _ in range(3):
            vec = rng.standard_normal((rows, dim), dtype=np.float32)
            vec /= np.linalg.norm(vec, axis=1, keepdims=True)
            start = time.perf_counter()
            bank.add([f"h{done + i}" for i in range(rows)], [f"row {done + i}" for i in range(rows)], vec,
                     source="calib", added_at=datetime.now(timezone.utc))
            spans.append(time.perf_counter() - start)
            done += rows
        commit[rows] = statistics.median(spans)
    return {"encoder_load_s": round(load_s, 2), "embed_s": [round(t, 3) for t in times], "rows": len(texts),
            "seconds_per_row": per_row, "dim": dim, "commit_s": {str(k): round(v, 4) for k, v in commit.items()},
            "commit_ceiling": {str(k): round(k / v, 1) for k, v in commit.items()}}


def sweep(args: argparse.Namespace) -> None:
    import torch

    from decapflow.bank.ingest import run_ingest

    if args.quick:
        args.workers_list = args.workers_list or [1, 2, 4, 8]
        args.calib_reps = min(args.calib_reps, 2)
    args.workers_list = args.workers_list or [1, 2, 4, 8, 16]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="decapflow-bench-sweep-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ.update(fresh_env(tmp))
        for name in ("DECAPFLOW_STORE", "PREFECT_API_URL", "PREFECT_PROFILES_PATH"):
            os.environ.pop(name, None)
        print(f"sweep: SIMULATED compute (workers sleep for the measured embedding time), real cluster, real "
              f"ordered commits; encoder {args.encoder}, chunks of {args.chunk}, {os.cpu_count()} cores")
        cal = calibrate(args, tmp)
        per_row = cal["seconds_per_row"]
        if args.chunk_seconds:
            per_row = args.chunk_seconds / args.chunk
        chunk_s = per_row * args.chunk
        print(f"calibration (real): embed_texts on 1 thread, {cal['rows']} sentences in "
              f"{', '.join(f'{t:.2f}' for t in cal['embed_s'])} s (encoder load {cal['encoder_load_s']:.1f} s) -> "
              f"{1000 * cal['seconds_per_row']:.2f} ms/sentence, {cal['seconds_per_row'] * args.chunk:.2f} s per "
              f"{args.chunk}-row chunk, {1 / cal['seconds_per_row']:.1f} sentences/s per worker")
        if args.chunk_seconds:
            print(f"  --chunk-seconds: simulating {chunk_s:.2f} s per chunk instead")
        print("calibration (real): MemoryBank.add commit " + ", ".join(
            f"{rows} rows {1000 * s:.0f} ms (ceiling {cal['commit_ceiling'][rows]:,.0f} sentences/s)"
            for rows, s in cal["commit_s"].items()))
        top = max(args.workers_list)
        sentences = args.sentences
        if sentences is None:
            per_worker = 1 if args.quick else 2
            sentences = per_worker * top * args.chunk
            if per_worker > 1 and sentences * per_row > N1_BUDGET_S:
                sentences //= 2
                print(f"  corpus halved to {sentences} sentences to keep the N=1 run near {N1_BUDGET_S:.0f} s")
        corpus = write_lines(tmp / "corpus.txt", captions(sentences))
        print(f"corpus: {sentences} sentences = {-(-sentences // args.chunk)} chunks; N=1 needs >= "
              f"{sentences * per_row:.0f} s of simulated compute")
        runs = []
        for n in args.workers_list:
            start = time.perf_counter()
            with simulated_embedder(args.encoder, n, args.chunk, per_row, args.batch_size) as emb:
                start_s = time.perf_counter() - start
                commits = Commits()
                report = run_ingest(corpus, "sim", args.encoder, store=str(tmp / f"store-n{n}"),
                                    chunk_size=args.chunk, batch_size=args.batch_size, write=commits, remote=emb)
                wall = time.perf_counter() - commits.t0
                close_start = time.perf_counter()
            close_s = time.perf_counter() - close_start
            figures = commits.figures()
            busy = (wall - emb.blocked) / max(1, figures.get("chunks", 1))
            per_worker = [sum(1 for w, _ in emb.tasks if w == worker) for worker in {w for w, _ in emb.tasks}]
            starts = sorted(t for _, t in emb.tasks)
            run = {"workers": n, "written": report.written, "wall_s": round(wall, 3),
                   "sentences_per_s": round(report.written / wall, 1),
                   "ideal_sentences_per_s": round(n / per_row, 1), "start_s": round(start_s, 2),
                   "close_s": round(close_s, 2), "blocked_s": round(emb.blocked, 3),
                   "client_busy_per_chunk_s": round(busy, 4),
                   "client_ceiling": round(args.chunk / busy, 1),
                   "commit_ceiling": round(args.chunk / figures["commit_median_s"], 1),
                   "workers_used": len(per_worker), "chunks_per_worker_max": max(per_worker),
                   "chunks_per_worker_min": min(per_worker),
                   "first_wave_start_spread_s": round(starts[min(n, len(starts)) - 1] - starts[0], 3), **figures}
            base = runs[0]["sentences_per_s"] if runs else run["sentences_per_s"]
            base_n = runs[0]["workers"] if runs else n
            run["speedup"] = round(run["sentences_per_s"] / base, 2)
            run["efficiency"] = round(run["speedup"] / (n / base_n), 2)
            runs.append(run)
            print(f"N={n:>2}: {run['sentences_per_s']:7.1f} sentences/s (ideal {run['ideal_sentences_per_s']:7.1f}), "
                  f"speed-up {run['speedup']:5.2f}x, efficiency {run['efficiency']:.2f}; wall {wall:.1f} s, "
                  f"first commit {figures['first_commit_s']:.1f} s; commit median {1000 * figures['commit_median_s']:.0f}"
                  f" ms (last {1000 * figures['commit_last_s']:.0f}) -> commit ceiling {run['commit_ceiling']:,.0f}/s; "
                  f"client busy {1000 * busy:.0f} ms/chunk -> client ceiling {run['client_ceiling']:,.0f}/s; "
                  f"cluster+encoder start {start_s:.1f} s, close {close_s:.1f} s; chunks per worker "
                  f"{run['chunks_per_worker_min']}-{run['chunks_per_worker_max']} on {len(per_worker)} workers, first "
                  f"{min(n, len(starts))} chunks started within {run['first_wave_start_spread_s']:.2f} s")
        if args.workers_list[0] != 1:
            print(f"  (speed-up and efficiency are against N={args.workers_list[0]}, the first of --workers-list)")
        print("SIMULATED compute: the speed-ups say how far ordered commits on one client let N real workers "
              "scale; ceilings = chunk rows / seconds")
    print(json.dumps({"mode": "sweep", "simulated_compute": True, "encoder": args.encoder, "chunk": args.chunk,
                      "sentences": sentences, "cores": os.cpu_count(), "chunk_seconds": round(chunk_s, 3),
                      "calibration": cal, "runs": runs}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("ratio", "sweep", "_child"):
        p = sub.add_parser(name)
        p.add_argument("--encoder", default=SPEC)
        p.add_argument("--chunk", type=int, default=256, help="rows per chunk (one commit each)")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--sentences", type=int, default=None)
        p.add_argument("--quick", action="store_true")
        if name in ("ratio", "_child"):
            p.add_argument("--threads", type=int, default=2, help="torch threads of the single-process run")
            p.add_argument("--workers", type=int, default=2, help="local Dask workers (1 thread each)")
        if name == "_child":
            p.add_argument("--how", choices=["single", "dask"], required=True)
            p.add_argument("--corpus", required=True)
        if name == "sweep":
            p.add_argument("--workers-list", type=int, nargs="+", default=None)
            p.add_argument("--calib-rows", type=int, default=256)
            p.add_argument("--calib-reps", type=int, default=3)
            p.add_argument("--chunk-seconds", type=float, default=None,
                           help="simulate this many seconds per chunk instead of the calibrated time")
    args = parser.parse_args()
    {"ratio": ratio, "sweep": sweep, "_child": child}[args.what](args)


if __name__ == "__main__":
    main()
