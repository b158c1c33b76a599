"""One prepared GPU check (issue 18): each figure against a baseline measured in the same run, < 5 minutes on one
H100/H200. Human lines as it goes, then one JSON line (also ``$OUT/gpu_check.json`` when ``OUT`` is set).

1. **train**: ``train_decoder`` (decap-small, then decap-base) on world-corpus sentences embedded by the ``world-gap``
   CLIP, batch 128, bf16 autocast as ``use_bf16("auto")`` decides; tokens/s of the epochs after the first, against
   the same training on CPU for a few steps (ratio).
2. **caption**: images/s of world images rendered in memory -> world-gap image tower -> exact ``pd`` through a
   DeviceBank over the corpus embeddings -> the trained decoder's batched ``decode_texts`` (batch 64), against the
   same pipeline on CPU as decapflow runs it there (numpy projection) on fewer images; per-stage seconds.
3. **pd**: exact projection over a synthetic bfloat16 bank made on the device (``--rows`` x ``--dim``, default
   6.2M x 512 = 6.35 GB): 65,536 random unit centres, each row ``normalize(centre + N(0, 0.75^2/D))`` (cosine
   ~0.8 to its centre, like caption embeddings); queries are a fresh text-like row plus noise (cosine ~0.3 to it,
   like CLIP images). Batch 1 and 64: ms/image and effective GB/s (bank bytes / time: the bank is read once per
   call) against a device-to-device ``copy_`` of a same-size tensor (its GB/s counts bytes read + written, 2x the
   size); a chunk-size sweep; TF32 on vs off (cosine, same support ids); a CPU numpy reference on the first
   ``reference_rows``; the streamed mode (two pinned slots, and the whole bank pinned) on the first
   ``stream_rows`` rows against a pinned host-to-device copy of the same bytes.
4. **kmeans**: a plain torch spherical (dot-product) k-means with LanceDB's sizing as ``MemoryBank.build_index``
   uses (partitions = min(4096, sqrt(rows), rows / 64), 64 sample rows per partition, 10 iterations) on the bank's
   sample, on the device, against the same on CPU for a smaller bank (and the device on that smaller bank too). It
   stands in for LanceDB's ``accelerator="cuda"`` build, which needs pylance (not installed).

Parts 3 and 4, the sizes and the timing helpers live in ``benchmarks/gpu_bank.py``. Both import only torch-side
decapflow (decoder, encoders, caption.projection/device_projection, bank.rows) and corpora.world: no lancedb,
prefect or fastapi (``tests/test_gpu_check.py`` runs the quick mode with those and other absent packages blocked).
Timings: ``torch.cuda.synchronize`` around each call (CUDA events for the copies), a warm-up call, the median of
``Sizes.repeats``; the seconds of each part are printed and in the JSON.

On this machine (every code path, tiny sizes, < 60 s)::

    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick

On a lent GPU machine (python3 3.12, torch 2.11 with CUDA, numpy, pyarrow, tqdm, matplotlib, threadpoolctl,
safetensors, pillow, regex, timm (hence torchvision), huggingface_hub; no open_clip_torch, ftfy, wcwidth), first
here, once: the three missing wheels into an ignored ``.whl/`` (2.4 MB: open_clip_torch 1.55 MB, wcwidth 0.82 MB
(an abi3 manylinux wheel, hence the platform tags), ftfy 0.04 MB)::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5

then on the device, with carry [".whl"] (a timeout_s of 420 leaves room)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:. HF_HUB_OFFLINE=1 DECAPFLOW_HOME=/tmp/h PYTHONUNBUFFERED=1 \\
        && python3 benchmarks/gpu_check.py

A part that fails prints its traceback, records ``errors[part]`` and the next part runs; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from corpora import world  # noqa: E402
from decapflow.caption import device_projection as dp  # noqa: E402
from decapflow.caption import projection  # noqa: E402
from decapflow.decoder.checkpoint import load_decoder  # noqa: E402
from decapflow.decoder.model import load_config  # noqa: E402
from decapflow.decoder.recipe import TrainRecipe  # noqa: E402
from decapflow.decoder.train import train_decoder, use_bf16  # noqa: E402
from decapflow.encoders import load_encoder  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_bank import QUICK, Sizes, log, part_kmeans, part_pd  # noqa: E402

#: Every figure the JSON must hold (dotted paths), checked by tests/test_gpu_check.py.
FIGURES = (
    "train.small.tokens_per_s", "train.small_cpu.tokens_per_s", "train.small_speedup",
    "train.base.tokens_per_s", "train.base_cpu.tokens_per_s", "train.base_speedup",
    "caption.device.images_per_s", "caption.cpu.images_per_s", "caption.speedup", "caption.same_captions",
    "pd.b1.ms_per_image", "pd.b64.ms_per_image", "pd.b1.effective_GBps", "pd.b64.effective_GBps",
    "pd.copy_GBps_read_write", "pd.b1.of_copy", "pd.tf32.min_cos", "pd.reference.min_cos",
    "pd.streamed.staged.b1.GBps", "pd.streamed.staged.b64.GBps", "pd.streamed.pinned_whole.b1.GBps",
    "pd.streamed.pinned_whole.b64.GBps", "pd.streamed.h2d_GBps", "pd.streamed.min_cos",
    "kmeans.device_full.seconds", "kmeans.device_small.seconds", "kmeans.cpu_small.seconds",
    "kmeans.speedup_same_size",
)


class Report:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {"seconds": {}, "errors": {}}

    @contextmanager
    def part(self, name: str) -> Iterator[dict[str, Any]]:
        log(f"== {name}")
        start = time.perf_counter()
        section = self.data.setdefault(name, {})
        try:
            yield section
        except Exception as exc:  # the next part still runs; the JSON says what failed
            traceback.print_exc()
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
        finally:
            self.data["seconds"][name] = round(time.perf_counter() - start, 1)
            log(f"   ({name}: {self.data['seconds'][name]:.1f} s)")


# ------------------------------------------------------------------------------------------- 1. training
def train_once(texts: list[str], vectors: np.ndarray, config: str, device: str, rows: int, epochs: int,
               batch: int, out: Path) -> dict[str, Any]:
    recipe = TrainRecipe(epochs=epochs, batch_size=batch, warmup_steps=10, val_fraction=0.02, patience=None,
                         device=device, amp="auto")
    start = time.perf_counter()
    result = train_decoder(texts, vectors, config=config, recipe=recipe, out_dir=out, progress=False,
                           rows=np.arange(min(rows, len(texts))))
    speeds = [h["tokens_per_s"] for h in result.history]
    warm = speeds[1:] or speeds
    return {"config": config, "device": device, "steps": result.steps, "epochs": len(speeds),
            "bf16": use_bf16("auto", torch.device(device), load_config(config)),
            "tokens_per_s": statistics.median(warm), "first_epoch_tokens_per_s": speeds[0],
            "val_loss": result.history[-1]["val_loss"], "wall_s": time.perf_counter() - start, "folder": str(out)}


def part_train(r: dict[str, Any], s: Sizes, device: torch.device, tmp: Path) -> tuple[list[str], np.ndarray, Path]:
    with gzip.open(ROOT / "corpora" / "world" / "corpus.txt.gz", "rt") as f:
        texts = [line.strip() for line in f if line.strip()][: s.corpus]
    encoder = load_encoder("world-gap", str(device))
    encoder.encode_text(texts[:64])  # warm-up
    start = time.perf_counter()
    vectors = encoder.encode_text(texts)
    r["embedded"] = {"sentences": len(texts), "sentences_per_s": len(texts) / (time.perf_counter() - start)}
    log(f"   embedded {len(texts):,} world sentences on {device}: {r['embedded']['sentences_per_s']:,.0f}/s")
    runs = (("small", "decap-small", str(device), *s.train), ("small_cpu", "decap-small", "cpu", *s.train_cpu),
            ("base", s.base_config, str(device), *s.base), ("base_cpu", s.base_config, "cpu", *s.base_cpu))
    for label, config, where, rows, epochs in runs:
        r[label] = run = train_once(texts, vectors, config, where, rows, epochs, s.batch, tmp / label)
        log(f"   {label:9s} {config} on {where} (bf16 {run['bf16']}): {run['tokens_per_s']:,.0f} tokens/s "
            f"({run['steps']} steps, first epoch {run['first_epoch_tokens_per_s']:,.0f}), loss {run['val_loss']:.3f}")
    for name in ("small", "base"):
        r[f"{name}_speedup"] = r[name]["tokens_per_s"] / r[f"{name}_cpu"]["tokens_per_s"]
        log(f"   {r[name]['config']}: {r[f'{name}_speedup']:.1f}x the CPU's tokens/s")
    return texts, vectors, Path(r["small"]["folder"]) / "last"


# ------------------------------------------------------------------------------------------- 2. captioning
def caption_run(images: list, encoder, project: Callable[[np.ndarray], np.ndarray], decoder, vocab,
                batch: int) -> tuple[list[str], dict[str, float]]:
    stages = {"encode_s": 0.0, "project_s": 0.0, "decode_s": 0.0}
    texts: list[str] = []
    for i in range(0, len(images), batch):
        t0 = time.perf_counter()
        v = encoder.encode_image(images[i : i + batch], batch)  # numpy: synchronised
        t1 = time.perf_counter()
        prefixes = project(v)
        t2 = time.perf_counter()
        texts += decoder.decode_texts(prefixes, vocab, batch_size=batch)
        stages["encode_s"] += t1 - t0
        stages["project_s"] += t2 - t1
        stages["decode_s"] += time.perf_counter() - t2
    return texts, stages


def part_caption(r: dict[str, Any], s: Sizes, device: torch.device, vectors: np.ndarray, folder: Path) -> None:
    images = [world.render(scene) for scene, _ in world.make_split(s.images, world.TEST_SEED)]
    bank = dp.DeviceBank(vectors, device)
    log(f"   bank of the corpus: {bank.placement.describe()}")
    setups = {
        "device": (load_encoder("world-gap", str(device)), lambda v: dp.project(v, bank, n_support=3).vectors,
                   *load_decoder(folder, str(device))[:2], images),
        "cpu": (load_encoder("world-gap", "cpu"), lambda v: projection.project(v, vectors, n_support=3).vectors,
                *load_decoder(folder, "cpu")[:2], images[: s.cpu_images]),
    }
    captions = {}
    for name, (encoder, project, decoder, vocab, batch_images) in setups.items():
        caption_run(batch_images[: s.caption_batch], encoder, project, decoder, vocab, s.caption_batch)  # warm-up
        start = time.perf_counter()
        captions[name], stages = caption_run(batch_images, encoder, project, decoder, vocab, s.caption_batch)
        seconds = time.perf_counter() - start
        r[name] = {"images": len(batch_images), "images_per_s": len(batch_images) / seconds,
                   **{k: round(v, 3) for k, v in stages.items()}}
        log(f"   {name:6s}: {r[name]['images_per_s']:,.1f} images/s over {len(batch_images)} images "
            f"(encode {stages['encode_s']:.2f} s, project {stages['project_s']:.2f} s, decode {stages['decode_s']:.2f} s)")
    r["speedup"] = r["device"]["images_per_s"] / r["cpu"]["images_per_s"]
    n = len(captions["cpu"])
    r["same_captions"] = sum(a == b for a, b in zip(captions["device"][:n], captions["cpu"], strict=True)) / n
    r["example"] = captions["device"][0]
    log(f"   {r['speedup']:.1f}x the CPU's images/s; same captions on {r['same_captions']:.0%} of the {n} shared "
        f"images (bf16 autocast in the CUDA image tower and the bf16 bank copy may flip a few); e.g. {r['example']!r}")


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (to try it out)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every code path in < 60 s on a CPU")
    parser.add_argument("--rows", type=int, help="rows of the synthetic pd bank (default 6.2M)")
    parser.add_argument("--dim", type=int, help="its width (default 512)")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU (use --device cpu to try it out)")
    s = QUICK if args.quick else Sizes()
    s = replace(s, rows=args.rows or s.rows, dim=args.dim or s.dim)
    report = Report()
    began = time.perf_counter()
    report.data["env"] = env = {
        "python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__, "device": str(device),
        "cpu_threads": torch.get_num_threads(), "quick": args.quick, "rows": s.rows, "dim": s.dim}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, free_GB=free / 1e9,
                   total_GB=total / 1e9)
    log(f"gpu_check: {json.dumps(env)}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        vectors = folder = rows = None
        with report.part("train") as r:
            _, vectors, folder = part_train(r, s, device, Path(tmp))
        with report.part("caption") as r:
            if folder is None:
                raise RuntimeError("no decoder: the train part failed")
            part_caption(r, s, device, vectors, folder)
    with report.part("pd") as r:
        rows = part_pd(r, s, device)
    with report.part("kmeans") as r:
        if rows is None:
            raise RuntimeError("no bank: the pd part failed")
        part_kmeans(r, s, device, rows)
    report.data["seconds"]["total"] = round(time.perf_counter() - began, 1)
    log(f"total {report.data['seconds']['total']:.1f} s; errors: {report.data['errors'] or 'none'}")
    text = json.dumps(report.data, default=float)
    for path in [args.json, Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None]:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    print(text, flush=True)
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
