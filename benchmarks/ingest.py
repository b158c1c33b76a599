"""Ingest benchmarks (issue 2). Each prints a ratio against a baseline measured in the same run.

    python benchmarks/ingest.py speed    [--sentences 1024]   # ViT-B-32 (random weights) vs a bare open_clip loop
    python benchmarks/ingest.py reingest [--lines 100000]     # second ingest of the same corpus vs the first
    python benchmarks/ingest.py memory   [--lines 1000000]    # peak RSS of ingesting a 1M-line corpus (tiny CLIP)

Run on a quiet machine (on 2 cores another busy process can slow torch 10x). Set threads with OMP_NUM_THREADS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SUBJECTS = "a man|a woman|two dogs|a cat|a group of people|a red bus|a young boy|an old car|three birds|a pizza".split("|")
VERBS = "sitting on|standing next to|riding|walking down|looking at|lying on|parked near|flying over|eating".split("|")
OBJECTS = ("a wooden bench|a busy street|a green field|a kitchen table|the beach|a snowy hill|a small boat|"
           "a tall building|a plate of food|a park").split("|")
EXTRAS = ["", " at night", " in the rain", " on a sunny day", " with a blue umbrella", " near the water"]
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def captions(n: int, seed: int = 0) -> list[str]:
    """n distinct caption-like sentences (~8-14 words), the way COCO captions look."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(EXTRAS)} {i}"
            for i in range(n)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def speed(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from decapflow.bank.ingest import run_ingest
    from decapflow.encoders import load_encoder

    texts = captions(args.sentences)
    enc = load_encoder("ViT-B-32:random", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DECAPFLOW_HOME"] = tmp
        corpus = write_lines(Path(tmp) / "corpus.txt", texts)
        report = run_ingest(corpus, "bench", "ViT-B-32:random", batch_size=args.batch_size)
        ours_rate = report.written / report.seconds  # includes reading, tokenising, writing to LanceDB
        from decapflow.bank.memory import Registry

        stored_texts, stored = Registry().open("bench").arrays()
    start = time.perf_counter()
    bare = []
    with torch.no_grad():
        for i in range(0, len(texts), args.batch_size):
            tokens = enc.tokenizer(texts[i : i + args.batch_size])
            bare.append(F.normalize(enc.model.encode_text(tokens), dim=-1).numpy())
    bare_rate = len(texts) / (time.perf_counter() - start)
    bare_by_text = dict(zip(texts, np.concatenate(bare), strict=True))
    diff = max(float(np.abs(stored[i] - bare_by_text[t]).max()) for i, t in enumerate(stored_texts))
    print(json.dumps({"sentences": len(texts), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                      "ingest_sentences_per_s": round(ours_rate, 1), "bare_loop_sentences_per_s": round(bare_rate, 1),
                      "speedup": round(ours_rate / bare_rate, 2), "max_abs_diff": diff}))


def reingest(args: argparse.Namespace) -> None:
    from decapflow.bank.ingest import run_ingest

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DECAPFLOW_HOME"] = tmp
        config = Path(tmp) / "tiny-clip.json"
        config.write_text(json.dumps(TINY))
        corpus = write_lines(Path(tmp) / "corpus.txt", captions(args.lines))
        first = run_ingest(corpus, "bench", f"{config}:random")
        second = run_ingest(corpus, "bench", None)
    print(json.dumps({"lines": args.lines, "first_s": round(first.seconds, 2), "written_first": first.written,
                      "second_s": round(second.seconds, 2), "written_second": second.written,
                      "speedup": round(first.seconds / second.seconds, 1)}))


def memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "tiny-clip.json"
        config.write_text(json.dumps(TINY))
        corpus = Path(tmp) / "corpus.txt"
        with corpus.open("w", encoding="utf-8") as out:  # written in pieces: the benchmark itself stays small
            for start in range(0, args.lines, 100_000):
                out.write("\n".join(captions(min(100_000, args.lines - start), seed=start)) + "\n")
        env = {**os.environ, "DECAPFLOW_HOME": tmp}
        cmd = [sys.executable, "-m", "decapflow.cli", "ingest", str(corpus), "--memory", "big",
               "--encoder", f"{config}:random", "--prefect", "off", "--json"]
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report = json.loads(done.stdout)
    print(json.dumps({"lines": args.lines, "written": report["written"], "wall_s": round(wall, 1),
                      "peak_rss_mb": round(peak_mb), "limit_mb": 1536, "within_limit": peak_mb < 1536}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--sentences", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=256)
    sub.add_parser("reingest").add_argument("--lines", type=int, default=100_000)
    sub.add_parser("memory").add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    {"speed": speed, "reingest": reingest, "memory": memory}[args.what](args)


if __name__ == "__main__":
    main()
