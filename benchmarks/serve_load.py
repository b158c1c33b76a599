"""Load on a real ``decapflow serve`` (issue 8): micro-batching against ``--max-batch 1``, same run, same machine.

1. The world bank (the synthetic world's corpus, encoder ``world``) and a decoder trained on it, in ``--home``
   (reused when already there; else a ``decap-small`` decoder trained ``--train-steps`` steps, ~2 minutes).
2. Baseline: the CLI's in-process path, one image at a time (read the PNG, ``Captioner.caption``), 1 thread:
   the time per image a server at concurrency 1 must stay within 1.5x of (p99).
3. For ``--max-batch`` 32 and 1: start ``decapflow serve --threads 1`` on 127.0.0.1, then send ``--requests``
   requests (one world scene PNG each, multipart) at each concurrency (1, 8, 32) with asyncio + httpx (after 50
   warm-up requests); record
   throughput, p50/p99 latency, errors and the batch sizes the server reports.
4. Soak (``--soak-s``, 0 to skip): concurrency 8 against the batching server; the RSS of the server process
   and of its compute worker at start and end.

Every request loop is bounded by ``--requests`` (or the soak's time) and sends only to 127.0.0.1.

    .venv/bin/python benchmarks/serve_load.py                        # 1,000 requests per point, 5-minute soak
    .venv/bin/python benchmarks/serve_load.py --requests 200 --soak-s 0   # a quick look (~3 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def ensure_world(steps: int) -> str:
    """Bank ``world`` and a current decoder for it in ``$DECAPFLOW_HOME``; returns the decoder id."""
    from decapflow.bank.ingest import run_ingest
    from decapflow.decoder.checkpoint import current_meta
    from decapflow.decoder.train import TrainRecipe
    from decapflow.encoders import WORLD_DIR
    from decapflow.lifecycle.training import train_from_bank

    run_ingest(WORLD_DIR / "corpus.txt.gz", "world", "world", progress=False)
    meta = current_meta("world")
    if meta is None:
        train_from_bank("world", config="decap-small", recipe=TrainRecipe(epochs=100, max_steps=steps, num_threads=1),
                        progress=True)
        meta = current_meta("world")
    return meta["id"]


def world_images(n: int) -> list[bytes]:
    from corpora.world import TEST_SEED, make_split, render

    images = []
    for scene, _ in make_split(n, TEST_SEED):
        buffer = io.BytesIO()
        render(scene).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def in_process_baseline(images: list[bytes]) -> dict[str, float]:
    """The CLI's path for one image at a time: decode the file's bytes, caption (encode, project, decode)."""
    import torch

    from decapflow.caption.captioner import Captioner, Options
    from decapflow.caption.images import load_image

    torch.set_num_threads(1)
    captioner = Captioner.for_bank("world", Options(batch_size=1))
    captioner.caption([load_image(io.BytesIO(images[0]))])  # warm-up
    times = []
    for data in images:
        start = time.perf_counter()
        captioner.caption([load_image(io.BytesIO(data))])
        times.append(time.perf_counter() - start)
    return {"images": len(times), "p50_ms": 1000 * statistics.median(times), "p99_ms": 1000 * percentile(times, 99),
            "mean_ms": 1000 * statistics.fmean(times)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_batch: int, log: Path, threads: int | None = 1) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "decapflow.cli", "serve", "--port", str(port), "--preload", "world",
           "--max-batch", str(max_batch), "--log-level", "warning"] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not get ready in 120 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(url: str, images: list[bytes], requests: int, concurrency: int, seconds: float | None = None
               ) -> dict[str, float]:
    """``requests`` requests (or as many as fit in ``seconds``) from ``concurrency`` workers; bounded both ways."""
    latencies: list[float] = []
    sizes: list[int] = []
    errors = 0
    counter = iter(range(requests))
    stop_at = time.monotonic() + seconds if seconds else None

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            if stop_at and time.monotonic() > stop_at:
                return
            start = time.perf_counter()
            try:
                r = await client.post("/v1/captions", data={"memory": "world"},
                                      files=[("images", (f"{i}.png", images[i % len(images)], "image/png"))])
                ok = r.status_code == 200
                if ok:
                    sizes.append(r.json()["results"][0]["batch"]["size"])
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"requests": len(latencies), "errors": errors, "seconds": round(wall, 2),
            "throughput": round(len(latencies) / wall, 2), "p50_ms": round(1000 * percentile(latencies, 50), 1),
            "p99_ms": round(1000 * percentile(latencies, 99), 1),
            "mean_batch": round(statistics.fmean(sizes), 2) if sizes else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, help="DECAPFLOW_HOME to use (default: a temporary one)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--soak-s", type=float, default=300)
    parser.add_argument("--train-steps", type=int, default=600,
                        help="steps of the decoder trained when the home has none (speed barely depends on it)")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="decapflow-serve-bench-"))
    os.environ["DECAPFLOW_HOME"] = str(home)
    decoder = ensure_world(args.train_steps)
    images = world_images(200)
    baseline = in_process_baseline(images[:100])
    print(json.dumps({"path": "in-process, 1 image at a time", **{k: round(v, 2) for k, v in baseline.items()}}))
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[tuple[int, int], dict[str, float]] = {}
    for max_batch in (32, 1):
        proc, url = start_server(max_batch, home / f"serve-{max_batch}.log")
        try:
            for c in levels:
                asyncio.run(load(url, images, min(50, args.requests), c))  # warm-up
                results[max_batch, c] = asyncio.run(load(url, images, args.requests, c))
                print(json.dumps({"max_batch": max_batch, "concurrency": c, **results[max_batch, c]}))
            if max_batch == 32 and args.soak_s > 0:
                worker = httpx.get(f"{url}/readyz").json()["worker"]["pid"]
                before = rss_mb(proc.pid), rss_mb(worker)
                soak = asyncio.run(load(url, images, 10**7, 8, seconds=args.soak_s))
                after = rss_mb(proc.pid), rss_mb(worker)
                print(json.dumps({"soak": True, "concurrency": 8, **soak,
                                  "server_rss_mb": [round(before[0], 1), round(after[0], 1)],
                                  "worker_rss_mb": [round(before[1], 1), round(after[1], 1)]}))
        finally:
            proc.terminate()
            proc.wait(30)
    top = max(levels)
    ratio = results[32, top]["throughput"] / results[1, top]["throughput"]
    low = results[32, min(levels)]["p99_ms"]
    print(json.dumps({"summary": True, "decoder": decoder,
                      f"throughput_ratio_batched_vs_batch1_at_c{top}": round(ratio, 2),
                      f"p99_c{min(levels)}_over_in_process_p50": round(low / baseline["p50_ms"], 2),
                      f"p99_c{min(levels)}_over_in_process_p99": round(low / baseline["p99_ms"], 2),
                      "errors": sum(r["errors"] for r in results.values())}))


if __name__ == "__main__":
    main()
