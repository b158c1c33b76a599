"""Reading a caption request: images and videos (multipart files, or base64 in JSON) and validated captioning
parameters."""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.requests import Request

from decapflow.bank.refs import BankRef
from decapflow.caption.images import ImageFailure, load_image
from decapflow.serve.errors import ApiError, describe_validation


class CaptionParams(BaseModel):
    """Everything a caption request may set besides its images (the same in JSON and multipart)."""

    model_config = ConfigDict(extra="forbid")

    memory: str = Field(min_length=1, max_length=130,
                        description="A registered memory bank: NAME (its newest version), NAME@TAG (the version the "
                                    "tag pins, followed when the tag moves) or NAME@vN (version N).")
    decoder: str | None = Field(None, max_length=200, description="A decoder id (ID or BANK/ID); default: the "
                                                                   "bank's current decoder.")
    strategy: Literal["auto", "pd", "topk", "nnd", "vd", "clipre", "ms", "rerank", "fused"] = Field(
        "auto", description="auto: fused when the bank's decoder is retrieval-fused, else rerank when the bank has a "
                            "recorded mean image embedding, else topk on banks of 100k rows or more, else pd; each "
                            "result names the strategy that ran.")
    neighbours: int | None = Field(None, ge=1, le=64, description="Bank rows a retrieval-fused decoder reads per "
                                                                   "image (default: as many as it was trained with).")
    query: Literal["auto", "ms", "vd", "pd", "topk", "nnd"] = Field(
        "auto", description="A retrieval-fused decoder's query token: auto (ms with a recorded image mean, else vd) "
                            "or another single-prefix strategy.")
    tau: float = Field(0.01, gt=0, le=10, description="Projection temperature.")
    k: int = Field(64, ge=1, le=4096, description="Neighbours for strategy topk.")
    beam: int = Field(1, ge=1, le=16, description="Beam width (1 = greedy).")
    max_len: int = Field(30, ge=1, le=76, description="Maximum caption tokens.")
    n_support: int = Field(3, ge=0, le=64, description="Supporting bank sentences returned per image.")
    frames: int = Field(8, ge=1, le=64, description="Frames sampled uniformly over each video upload; the video "
                                                     "is captioned from their mean embedding (images ignore it).")

    @field_validator("memory")
    @classmethod
    def _reference(cls, value: str) -> str:
        return str(BankRef.parse(value))  # a bad name or tag: 422, saying what a reference looks like

    def options(self) -> tuple[tuple[str, Any], ...]:
        """The captioning options as hashable (name, value) pairs: a batch key, and ``Options(**dict(...))`` once
    ``frames`` is taken out (see :func:`decapflow.serve.worker.run_batch`)."""
        return tuple(self.model_dump(exclude={"memory", "decoder"}).items())


@dataclass
class Upload:
    name: str
    data: bytes


def _params(fields: dict[str, Any]) -> CaptionParams:
    try:
        return CaptionParams(**fields)
    except ValidationError as exc:
        raise ApiError(422, "invalid_parameter", describe_validation(exc.errors())) from exc


def _b64(value: Any, index: int) -> Upload:
    name = f"image-{index}"
    if isinstance(value, dict):
        name, value = str(value.get("name") or name), value.get("data")
    if not isinstance(value, str):
        raise ApiError(400, "bad_request", f"images[{index}] must be a base64 string or {{name, data}}")
    if value.startswith("data:"):  # a data URL: data:image/png;base64,....
        value = value.partition(",")[2]
    try:
        return Upload(name, base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "bad_request", f"images[{index}] is not valid base64: {exc}") from exc


async def read_caption_request(request: Request, max_images: int) -> tuple[CaptionParams, list[Upload]]:
    """The parameters and raw images of a ``POST /v1/captions`` (multipart form or JSON)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, "bad_request", f"malformed JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "the JSON body must be an object")
        raw = body.pop("images", None)
        if "image" in body:
            raw = [body.pop("image")] if raw is None else raw + [body.pop("image")]
        if raw is not None and not isinstance(raw, list):
            raise ApiError(400, "bad_request", "'images' must be a list")
        params = _params(body)
        if raw is not None and len(raw) > max_images:
            raise ApiError(413, "too_many_images", f"{len(raw)} images in one request; the limit is {max_images}")
        uploads = [_b64(v, i) for i, v in enumerate(raw or [])]
    elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=max_images, max_fields=32)
        files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        params = _params({k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)})
        uploads = [Upload(f.filename or f"image-{i}", await f.read()) for i, (_, f) in enumerate(files)]
    else:
        raise ApiError(415, "unsupported_media_type",
                       "send multipart/form-data (files under 'images') or application/json "
                       "({\"memory\": ..., \"images\": [base64, ...]})")
    if not uploads:
        raise ApiError(422, "no_images", "the request has no images")
    return params, uploads


def is_video_upload(upload: Upload) -> bool:
    """Whether an upload is a video: by its name's suffix (.mp4 .mov .webm ...) or its first bytes."""
    from decapflow.caption.video import is_video, looks_like_video

    return is_video(upload.name) or looks_like_video(upload.data)


def decode_video_upload(upload: Upload, max_pixels: int, frames: int) -> list[Any]:
    """``frames`` RGB frames sampled uniformly from a video upload, or a 422 ``invalid_video`` saying why not
    (empty, not a readable video, no video stream, frames over ``max_pixels``)."""
    from decapflow.caption.video import read_frames_from_bytes

    if not upload.data:
        raise ApiError(422, "invalid_video", "the upload is empty")
    picked = read_frames_from_bytes(upload.data, upload.name, frames, max_pixels)
    if isinstance(picked, ImageFailure):
        raise ApiError(422, "invalid_video", picked.reason)
    return picked


def decode_upload(upload: Upload, max_pixels: int) -> Any:
    """An upload as an RGB image, or a 422 saying why not (empty, not an image, truncated, too big)."""
    if not upload.data:
        raise ApiError(422, "invalid_image", "the upload is empty")
    image = load_image(io.BytesIO(upload.data), max_pixels=max_pixels, name=upload.name)
    if isinstance(image, ImageFailure):
        raise ApiError(422, "invalid_image", image.reason)
    return image
