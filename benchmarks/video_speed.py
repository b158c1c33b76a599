"""Video captioning speed (issue 11): frames/s of ``caption_paths`` on world videos against captioning the same
frames as PNG images, measured in the same run with the same captioner.

* ``video``: ``caption_paths(captioner, videos, frames=F)``: per video, PyAV decodes up to the last of F uniformly
  sampled frames, the F frames are embedded by the CLIP image encoder, averaged and re-normalised, and the batch
  of video embeddings is projected (``pd``) and decoded: one caption per video. Frames/s = videos x F / seconds.
* ``images``: the very frames the video path samples, written as PNGs, captioned by ``caption_paths``: the same
  number of frames loaded and embedded, but one caption per frame.
* ``decode``: ``read_frames`` alone on the videos (PyAV decoding and sampling, no CLIP), for the breakdown.

The ratio ``video / images`` (frames/s) is printed last: above 1, video captioning pays for its decoding by
captioning once per F frames instead of once per frame.

The captioner: the shipped world CLIP (encoder spec ``world``), a bank of ``--corpus-scenes`` world captions
ingested into a temporary ``DECAPFLOW_HOME``, and a ``--config`` decoder with seeded random weights whose
``<end>`` token can never win (as in ``benchmarks/caption_speed.py``), so every caption is ``--max-len`` tokens on
both paths and only speed is measured. ``--memory BANK`` uses an existing bank and its current decoder instead.

    .venv/bin/python benchmarks/video_speed.py                 # 32 videos x 8 frames, best of 3 (about a minute)
    .venv/bin/python benchmarks/video_speed.py --videos 8 --frames 16 --video-frames 32

Run on a quiet machine with one thread (``--threads``; on 2 shared cores torch threads can spin 10x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))


def build_captioner(args: argparse.Namespace, tmp: Path):
    """The captioner: ``--memory``'s bank and current decoder, or a fresh world bank with a random decoder."""
    from decapflow.caption.captioner import Captioner, Options

    options = Options(strategy="pd", max_len=args.max_len, batch_size=args.batch_size)
    if args.memory:
        return Captioner.for_bank(args.memory, options, device="cpu")
    from caption_speed import bank_vocab, random_decoder

    from corpora.world import write_corpus
    from decapflow.bank.ingest import run_ingest
    from decapflow.bank.memory import Registry
    from decapflow.encoders import load_encoder

    os.environ["DECAPFLOW_HOME"] = str(tmp / "home")
    corpus = write_corpus(tmp / "corpus.txt", args.corpus_scenes)
    run_ingest(corpus, "bench", "world")
    bank = Registry().open("bench")
    _, texts = bank.vector_cache()
    vocab = bank_vocab(texts.to_pylist())
    decoder = random_decoder(vocab, bank.dim, args.config, args.seed, allow_end=False)
    return Captioner(load_encoder(bank.encoder, "cpu"), bank, decoder, vocab, options)


def timed(fn, repeats: int = 1):
    """(the last result, the fastest of ``repeats`` runs in seconds)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def line(path: str, frames: int, seconds: float, **extra: object) -> dict:
    row = {"path": path, "frames": frames, "seconds": round(seconds, 3), "frames_per_s": round(frames / seconds, 2),
           **extra}
    print(json.dumps(row), flush=True)
    return row


def run(args: argparse.Namespace) -> None:
    from corpora.world_video import write_video_set
    from decapflow.caption.files import caption_paths
    from decapflow.caption.images import ImageFailure
    from decapflow.caption.video import read_frames

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        captioner, setup_s = timed(lambda: build_captioner(args, tmp))
        folder = write_video_set(tmp / "videos", args.videos, frames=args.video_frames, size=args.size,
                                 codec=args.codec)
        videos = sorted(folder.glob("world_video_*"))
        pngs = []  # the frames the video path samples, as PNGs
        (tmp / "frames").mkdir()
        for video in videos:
            frames = read_frames(video, args.frames)
            assert not isinstance(frames, ImageFailure), frames
            for i, image in enumerate(frames):
                pngs.append(tmp / "frames" / f"{video.stem}_{i:03d}.png")
                image.save(pngs[-1])
        print(json.dumps({"setup": {"bank": captioner.bank.name, "bank_rows": len(captioner.vectors),
                                    "encoder": captioner.bank.encoder, "decoder": args.config if not args.memory
                                    else captioner.decoder_id, "videos": len(videos), "video_frames": args.video_frames,
                                    "sampled_frames": args.frames, "size": args.size, "codec": args.codec,
                                    "max_len": args.max_len, "batch_size": args.batch_size,
                                    "threads": torch.get_num_threads(), "setup_s": round(setup_s, 1)}}), flush=True)
        caption_paths(captioner, videos[:2], frames=args.frames)  # warm-up: both paths once
        caption_paths(captioner, pngs[:2])
        n_frames = len(pngs)
        r = args.repeats
        _, decode_s = timed(lambda: [read_frames(v, args.frames) for v in videos], r)
        (video_caps, video_fail), video_s = timed(lambda: caption_paths(captioner, videos, frames=args.frames), r)
        (image_caps, image_fail), image_s = timed(lambda: caption_paths(captioner, pngs), r)
        assert not video_fail and not image_fail and len(video_caps) == len(videos) and len(image_caps) == n_frames
        line("decode", n_frames, decode_s, videos=len(videos))
        video = line("video", n_frames, video_s, videos=len(videos), captions=len(video_caps),
                     videos_per_s=round(len(videos) / video_s, 2))
        image = line("images", n_frames, image_s, captions=len(image_caps))
        print(json.dumps({"summary": {"video_frames_per_s": video["frames_per_s"],
                                      "image_frames_per_s": image["frames_per_s"],
                                      "video_over_images": round(video["frames_per_s"] / image["frames_per_s"], 2),
                                      "decode_share_of_video": round(decode_s / video_s, 3)}}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=32, help="World videos to caption.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per path; the fastest counts.")
    parser.add_argument("--frames", type=int, default=8, help="Frames sampled per video (caption --frames).")
    parser.add_argument("--video-frames", type=int, default=16, help="Frames in each world video.")
    parser.add_argument("--size", type=int, default=64, help="Frame side in pixels.")
    parser.add_argument("--codec", default="mpeg4", help="PyAV encoder of the world videos.")
    parser.add_argument("--corpus-scenes", type=int, default=4000, help="World scenes whose captions form the bank.")
    parser.add_argument("--config", default="decap-small", help="Decoder architecture (random weights).")
    parser.add_argument("--memory", help="Use this bank (in $DECAPFLOW_HOME) and its current decoder instead.")
    parser.add_argument("--max-len", type=int, default=16, help="Caption tokens (every caption runs all of them).")
    parser.add_argument("--batch-size", type=int, default=64, help="Files per caption_paths batch.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--seed", type=int, default=0)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
