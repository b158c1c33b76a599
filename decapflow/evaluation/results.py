"""Writing captions out: plain text, JSON lines, or a COCO results file (``[{"image_id", "caption"}]``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from decapflow.caption.captioner import Caption
from decapflow.caption.images import trailing_int
from decapflow.evaluation.evaluate import coco_results

FORMATS = ("text", "jsonl", "coco")


def coco_ids_from_annotations(annotations: Path) -> dict[str, int]:
    """File name -> image id from a COCO annotations file's ``images`` list."""
    data = json.loads(Path(annotations).read_text(encoding="utf-8"))
    return {Path(im["file_name"]).name: int(im["id"]) for im in data.get("images", [])}


def image_id(path: str, by_name: dict[str, int] | None) -> int:
    """The COCO image id of ``path``: from the annotations when given, else the file name's trailing integer."""
    name = Path(path).name
    if by_name is not None:
        if name not in by_name:
            raise ValueError(f"image {name!r} is not in the annotations file")
        return by_name[name]
    number = trailing_int(name)
    if number is None:
        raise ValueError(f"cannot tell the COCO image id of {name!r}: no trailing number; pass --annotations")
    return number


def render(captions: Sequence[Caption], fmt: str, annotations: Path | None = None) -> str:
    """Captions as text (``path<TAB>caption``), JSON lines (everything, with support), or COCO results JSON."""
    if fmt == "text":
        return "".join(f"{c.image}\t{c.caption}\n" for c in captions)
    if fmt == "jsonl":
        return "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in captions)
    if fmt == "coco":
        by_name = coco_ids_from_annotations(annotations) if annotations else None
        return coco_results((image_id(c.image or "", by_name), c.caption) for c in captions)
    raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
