"""Finding and safely opening images: files, folders and globs in; RGB images or a reason for failure out."""

from __future__ import annotations

import glob
import re
import warnings
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: Refuse images above this many pixels before decoding them (a decompression bomb guard): 16k x 8k.
MAX_PIXELS = 128_000_000
#: Images are decoded at no more than this size on their short side when the format allows (JPEG draft mode):
#: CLIP looks at 224 px, so decoding a 24-megapixel photo in full is wasted work.
DRAFT_SIZE = 448


@dataclass(frozen=True)
class ImageFailure:
    path: str
    reason: str


def collect_paths(inputs: Iterable[str | Path], suffixes: Collection[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders (recursively, files with ``suffixes`` only,
    sorted) and glob patterns. Raises FileNotFoundError for an input that names nothing. (Images and videos:
    ``suffixes=decapflow.caption.video.MEDIA_SUFFIXES``.)"""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file()))
        elif path.is_file():
            paths.append(path)
        elif glob.has_magic(str(item)):
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"no files match {str(item)!r}")
            paths.extend(matches)
        else:
            raise FileNotFoundError(f"no such image, folder or pattern: {str(item)!r}")
    seen: set[Path] = set()
    return [p for p in paths if not (p in seen or seen.add(p))]  # de-duplicated, order kept


def load_image(source: Path | BinaryIO, max_pixels: int = MAX_PIXELS, name: str | None = None
               ) -> Image.Image | ImageFailure:
    """Open an image (a file path or a binary file object) as RGB, or say why not (unreadable, corrupt,
    truncated, or larger than ``max_pixels``: the size is read from the header before any pixel is decoded)."""
    path = name or (str(source) if isinstance(source, (str, Path)) else getattr(source, "name", "<bytes>"))
    try:
        with Image.open(source) as im:
            width, height = im.size
            if width * height > max_pixels:
                return ImageFailure(path, f"{width}x{height} exceeds the {max_pixels:,}-pixel limit")
            im.draft("RGB", (DRAFT_SIZE, DRAFT_SIZE))
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return im.convert("RGB")
    except UnidentifiedImageError:
        return ImageFailure(path, "not an image (unrecognised format)")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return ImageFailure(path, f"{type(exc).__name__}: {exc}")


def trailing_int(path: str | Path) -> int | None:
    """The trailing integer of a file's stem, as in COCO names: ``COCO_val2014_000000391895.jpg`` -> 391895."""
    match = re.search(r"(\d+)$", Path(path).stem)
    return int(match.group(1)) if match else None
