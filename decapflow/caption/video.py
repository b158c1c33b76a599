"""Videos: finding them, sampling frames safely with PyAV, and one CLIP embedding per video.

DeCap captions a video from its frames' CLIP embeddings: ``--frames N`` frames are sampled uniformly over the
video (the middle frame of each of N equal segments, :func:`sample_indices`), embedded with the bank's image
encoder, averaged and re-normalised (:func:`mean_embedding`). That one unit vector then goes through any
strategy like an image embedding does (``Captioner.caption_embeddings``).

Reading is guarded like images are (:mod:`decapflow.caption.images`): a file that is not a video, has no video stream,
is truncated or corrupt, or whose frames are larger than ``max_pixels`` (read from the stream header before any
frame is decoded) becomes an :class:`~decapflow.caption.images.ImageFailure` with a reason, never an exception. Files are
handed to FFmpeg as Python file objects, so a file name is never read as an FFmpeg protocol or URL.

The frame count comes from the container header (MP4, MOV, AVI) or, where the header has none (WebM, MKV), from
one pass over the packets (no decoding). Frames are then decoded in order up to the last sampled one; only the
sampled ones are converted to RGB (at most ``DRAFT_SIZE`` on the short side: CLIP looks at 224 px).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from decapflow.caption.images import DRAFT_SIZE, IMAGE_SUFFIXES, MAX_PIXELS, ImageFailure, load_image

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".avi", ".mov", ".webm", ".mkv"})
#: What ``decapflow caption`` collects from folders: images and videos.
MEDIA_SUFFIXES = frozenset(IMAGE_SUFFIXES) | VIDEO_SUFFIXES
DEFAULT_FRAMES = 8
#: The most frames one video may be sampled at (``--frames``).
MAX_FRAMES = 256


def is_video(path: str | Path) -> bool:
    """Whether ``path`` names a video, by its suffix (``.mp4 .m4v .avi .mov .webm .mkv``)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def looks_like_video(data: bytes) -> bool:
    """Whether ``data`` starts like an MP4/MOV (``ftyp`` box), WebM/MKV (EBML) or AVI (``RIFF....AVI``) file."""
    head = bytes(data[:12])
    return head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:11] == b"AVI")


def sample_indices(total: int, n: int) -> list[int]:
    """``n`` frame indices spread uniformly over ``total`` frames: the middle frame of each of ``n`` equal
    segments, ``floor((2i + 1) * total / (2n))``; every frame when ``total <= n``.

    >>> sample_indices(100, 4)
    [12, 37, 62, 87]
    """
    if n < 1:
        raise ValueError(f"frames must be at least 1, got {n}")
    if total <= n:
        return list(range(max(total, 0)))
    return [(2 * i + 1) * total // (2 * n) for i in range(n)]


def _name(source: Path | BinaryIO, name: str | None) -> str:
    return name or (str(source) if isinstance(source, (str, Path)) else getattr(source, "name", "<bytes>"))


@contextlib.contextmanager
def _open(source: Path | BinaryIO) -> Iterator[Any]:
    """An input container on ``source`` (a path is opened as a file object; a file object is rewound)."""
    import av

    with contextlib.ExitStack() as stack:
        if isinstance(source, (str, Path)):
            source = stack.enter_context(open(source, "rb"))
        source.seek(0)
        yield stack.enter_context(av.open(source, "r"))


def _count_frames(source: Path | BinaryIO) -> int:
    """Frames of the first video stream, from one pass over its packets (headers of WebM/MKV carry no count)."""
    with _open(source) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def read_frames(source: Path | BinaryIO, frames: int = DEFAULT_FRAMES, max_pixels: int = MAX_PIXELS,
                name: str | None = None) -> list[Any] | ImageFailure:
    """``frames`` RGB frames (PIL images) sampled uniformly (:func:`sample_indices`) from the first video stream
    of ``source`` (a path or a binary file object), or an :class:`ImageFailure` saying why not: not a video, no
    video stream, frames over ``max_pixels``, corrupt or truncated, no frame decodable."""
    import av

    path = _name(source, name)
    if not 1 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be between 1 and {MAX_FRAMES}, got {frames}")
    try:
        with _open(source) as container:
            if not container.streams.video:
                return ImageFailure(path, "no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                return ImageFailure(path, f"{width}x{height} frames exceed the {max_pixels:,}-pixel limit")
            total = stream.frames
        if total <= 0:
            total = _count_frames(source)
        if total <= 0:
            return ImageFailure(path, "the video has no frames")
        wanted = sample_indices(total, frames)
        picked: list[Any] = []
        last = None
        with _open(source) as container:
            stream = container.streams.video[0]
            position = iter(wanted)
            target = next(position)
            for index, frame in enumerate(container.decode(stream)):
                if frame.width * frame.height > max_pixels:  # a header that said less, or nothing
                    return ImageFailure(path, f"{frame.width}x{frame.height} frames exceed the "
                                              f"{max_pixels:,}-pixel limit")
                last = frame
                if index == target:
                    picked.append(_to_image(frame))
                    target = next(position, None)
                    if target is None:
                        break
        if not picked and last is not None:  # the header promised more frames than could be decoded
            picked.append(_to_image(last))
        if not picked:
            return ImageFailure(path, "no frame could be decoded")
        return picked
    except av.error.InvalidDataError:
        return ImageFailure(path, "not a readable video (unrecognised format, truncated or corrupt)")
    except (av.error.FFmpegError, OSError, ValueError, MemoryError) as exc:
        return ImageFailure(path, f"{type(exc).__name__}: {exc}")


def _to_image(frame: Any) -> Any:
    """A decoded frame as an RGB PIL image, shrunk to ``DRAFT_SIZE`` on its short side when larger."""
    width, height = frame.width, frame.height
    scale = DRAFT_SIZE / min(width, height)
    if scale < 1:
        width, height = max(2, round(width * scale)), max(2, round(height * scale))
        return frame.reformat(width=width, height=height, format="rgb24").to_image()
    return frame.to_image()


def mean_embedding(vectors: np.ndarray) -> np.ndarray:
    """The re-normalised mean of unit frame embeddings ``[n, D]`` -> ``[D]`` (float32)."""
    mean = np.asarray(vectors, dtype=np.float64).mean(axis=0)
    norm = np.linalg.norm(mean)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("the frame embeddings cancel out: their mean has no direction")
    return (mean / norm).astype(np.float32)


def embed_video(encoder: Any, frames: Sequence[Any], batch_size: int = 64) -> np.ndarray:
    """One video's unit embedding ``[D]``: its frames (PIL images or preprocessed tensors) embedded in batches
    with ``encoder`` and averaged (:func:`mean_embedding`)."""
    return mean_embedding(encoder.encode_image(list(frames), max(1, batch_size)))


def load_media(path: Path, encoder: Any, frames: int = DEFAULT_FRAMES, max_pixels: int = MAX_PIXELS,
               batch_size: int = 64) -> Any:
    """An image file as an RGB PIL image, a video file (:func:`is_video`) as its unit embedding ``[D]`` (frames
    are embedded right away, so a set of videos never holds its frames in memory), or an ImageFailure."""
    if not is_video(path):
        return load_image(path, max_pixels=max_pixels)
    picked = read_frames(path, frames, max_pixels)
    return picked if isinstance(picked, ImageFailure) else embed_video(encoder, picked, batch_size)


def embed_media(encoder: Any, items: Sequence[Any], batch_size: int = 64) -> np.ndarray:
    """Unit embeddings ``[n, D]`` of what :func:`load_media` returned: images (or preprocessed tensors) are
    embedded in batches, video embeddings (1-d arrays) pass through; the order is kept."""
    out = np.empty((len(items), encoder.dim), dtype=np.float32)
    images = [i for i, item in enumerate(items) if not isinstance(item, np.ndarray)]
    if images:
        out[images] = encoder.encode_image([items[i] for i in images], max(1, batch_size))
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            out[i] = item
    return out


def read_frames_from_bytes(data: bytes, name: str, frames: int = DEFAULT_FRAMES,
                           max_pixels: int = MAX_PIXELS) -> list[Any] | ImageFailure:
    """:func:`read_frames` of an uploaded video held in memory."""
    return read_frames(io.BytesIO(data), frames, max_pixels, name=name)

