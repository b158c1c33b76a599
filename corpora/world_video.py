"""Short videos of the synthetic world: a scene's shapes move across a few frames; captions as for its images.

A video shows one :class:`~corpora.world.Scene`: every object keeps its grid cell, size and colour, and slides in
a straight line between two points of its cell (so objects never overlap, as in :func:`corpora.world.render`),
drawn at 4x and downsampled like the still images. Its reference captions are the scene's captions, so a world
bank and decoder caption the videos with no new training. Everything is seeded: video ``i`` of split ``seed`` is
always the same scene, motion and caption draws.

``write_video_set(folder, n)`` writes ``world_video_<id>.mp4`` (ids 1..n), ``captions.json`` (COCO captions:
``images[].file_name`` carries the id) and ``scenes.json``, like :func:`corpora.world.write_image_set`. Videos are
encoded with PyAV (``mpeg4`` by default: in every PyAV wheel, fast, and close to lossless at the bit rate used).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from corpora.world import COLOURS, GRID, SCALE, Scene, _draw_shape, layout, make_split

#: The split of the world videos (scene ``i`` uses ``scene_seed(VIDEO_SEED, i)``; no other split uses 4).
VIDEO_SEED = 4
DEFAULT_FRAMES = 12
DEFAULT_FPS = 8
SUFFIX_BY_CODEC = {"mpeg4": ".mp4", "libx264": ".mp4", "h264": ".mp4", "libvpx": ".webm", "libvpx-vp9": ".webm",
                   "mjpeg": ".avi", "ffv1": ".mkv"}


def render_frames(scene: Scene, frames: int = DEFAULT_FRAMES, size: int = 64) -> list[Image.Image]:
    """``frames`` RGB images of ``scene`` with its objects moving in straight lines inside their cells.

    Deterministic (layout, colours and paths come from ``scene.layout_seed``). Frame 0 and the last frame are the
    two ends of every path."""
    if frames < 1:
        raise ValueError(f"a video needs at least 1 frame, got {frames}")
    rng, side, bg, placed = layout(scene, size)
    cell, scale = side / GRID, SCALE
    paths = []  # (shape, radius, fill, start, end) per object
    for g, c in placed:
        radius = cell * (0.42 if g.size == "large" else 0.21) * rng.uniform(0.92, 1.05)
        slack = max(0.0, cell / 2 - radius - scale)
        centre = ((c % GRID + 0.5) * cell, (c // GRID + 0.5) * cell)
        start, end = ((centre[0] + rng.uniform(-slack, slack), centre[1] + rng.uniform(-slack, slack))
                      for _ in range(2))
        fill = tuple(max(0, min(255, v + rng.randint(-12, 12))) for v in COLOURS[g.colour])
        paths.append((g.shape, radius, fill, start, end))
    out = []
    for t in range(frames):
        a = t / (frames - 1) if frames > 1 else 0.0
        image = Image.new("RGB", (side, side), bg)
        draw = ImageDraw.Draw(image)
        for shape, radius, fill, (x0, y0), (x1, y1) in paths:
            _draw_shape(draw, shape, x0 + a * (x1 - x0), y0 + a * (y1 - y0), radius, fill)
        out.append(image.resize((size, size), Image.Resampling.BOX))
    return out


def write_video(path: str | Path, frames: Sequence[Image.Image], fps: int = DEFAULT_FPS, codec: str = "mpeg4",
                bit_rate: int = 2_000_000) -> Path:
    """Encode RGB ``frames`` (all the same even size) into ``path`` with PyAV's ``codec`` (yuv420p)."""
    import av

    if not frames:
        raise ValueError("no frames to write")
    if codec not in av.codecs_available:
        raise ValueError(f"codec {codec!r} is not in this PyAV build; try mpeg4 or libx264")
    width, height = frames[0].size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = bit_rate
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image.convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)
    return path


def video_file_name(video_id: int, codec: str = "mpeg4") -> str:
    """COCO-like file name; the trailing integer is the video id."""
    return f"world_video_{video_id:012d}{SUFFIX_BY_CODEC.get(codec, '.mp4')}"


def write_video_set(folder: str | Path, n: int, seed: int = VIDEO_SEED, frames: int = DEFAULT_FRAMES,
                    size: int = 64, fps: int = DEFAULT_FPS, codec: str = "mpeg4") -> Path:
    """Write ``n`` videos of split ``seed`` into ``folder`` with ``captions.json`` (COCO captions, 5 per video,
    ids 1..n) and ``scenes.json`` (id -> scene dict, for :func:`corpora.world.attribute_accuracy`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    videos, annotations, scenes = [], [], {}
    for i, (scene, texts) in enumerate(make_split(n, seed)):
        video_id = i + 1
        name = video_file_name(video_id, codec)
        write_video(folder / name, render_frames(scene, frames, size), fps, codec)
        videos.append({"id": video_id, "file_name": name})
        for text in texts:
            annotations.append({"image_id": video_id, "id": len(annotations) + 1, "caption": text})
        scenes[str(video_id)] = scene.to_dict()
    info = {"description": f"decapflow synthetic world videos, split seed {seed}, {n} videos of {frames} frames "
                           f"at {size}px, {codec}"}
    (folder / "captions.json").write_text(json.dumps({"info": info, "images": videos, "annotations": annotations}))
    (folder / "scenes.json").write_text(json.dumps(scenes))
    return folder
