"""A client of ``decapflow serve``: send image (or video) files, get :class:`~decapflow.caption.captioner.Caption` objects back.

``decapflow caption --server URL`` uses it, so many clients share one warm server and print what a local run
prints. An image the server cannot read is reported as a failure (like a local run), the rest still captioned.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from decapflow.caption.captioner import Caption
from decapflow.caption.images import ImageFailure


class ServerError(RuntimeError):
    """The server refused a request or could not be reached; the message says why."""

    def __init__(self, message: str, code: str = "", body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.body = code, body or {}


class ServeClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> ServeClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerError(f"no decapflow server answers at {self.url} ({type(exc).__name__}: {exc}); "
                              f"start one with: decapflow serve") from exc
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise ServerError(f"server said {response.status_code}: {error.get('message', response.text[:200])}",
                              error.get("code", ""), error)
        return body

    def caption(self, images: Sequence[tuple[str, bytes]], params: dict[str, Any]) -> dict[str, Any]:
        """One ``POST /v1/captions`` of (name, bytes) images with form ``params``; the server's JSON answer."""
        files = [("images", (name, data, mimetypes.guess_type(name)[0] or "application/octet-stream"))
                 for name, data in images]
        fields = {k: str(v) for k, v in params.items() if v is not None}
        return self.request("POST", "/v1/captions", data=fields, files=files)

    def caption_paths(self, paths: Sequence[Path], params: dict[str, Any], batch_size: int = 16
                      ) -> tuple[list[Caption], list[ImageFailure]]:
        """Caption image files in requests of ``batch_size``; images the server refuses become failures."""
        captions: list[Caption] = []
        failures: list[ImageFailure] = []
        for start in range(0, len(paths), max(1, batch_size)):
            batch = list(paths[start : start + batch_size])
            while batch:
                try:
                    answer = self.caption([(p.name, p.read_bytes()) for p in batch], params)
                except ServerError as exc:
                    bad = exc.body.get("image")
                    if exc.code not in ("invalid_image", "invalid_video") or not isinstance(bad, int) \
                            or not 0 <= bad < len(batch):
                        raise
                    failures.append(ImageFailure(str(batch[bad]), exc.body.get("message", str(exc))))
                    del batch[bad]
                    continue
                for path, result in zip(batch, answer["results"], strict=True):
                    support = [(s["text"], s["weight"]) for s in result["support"]]
                    captions.append(Caption(result["caption"], result["strategy"], support, str(path)))
                break
        return captions, failures
