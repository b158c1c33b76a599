"""A client of ``decapflow serve``: send image (or video) files, get :class:`~decapflow.caption.captioner.Caption` objects back.

``decapflow caption --server URL`` uses it, so many clients share one warm server and print what a local run
prints. An image the server cannot read is reported as a failure (like a local run), the rest still captioned.
A request the server lost to a restart of its compute worker (503 ``worker_restarted``) is sent once more, after
the server's Retry-After (at most :data:`MAX_RETRY_WAIT_S`); captioning is read-only, so that is safe.
"""

from __future__ import annotations

import mimetypes
import time
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from decapflow.caption.captioner import Caption
from decapflow.caption.images import ImageFailure

#: Error codes of a 503 that one more try is expected to get past (a new compute worker is already starting).
RETRIED_CODES = ("worker_restarted",)
#: The longest the client waits before that one retry, whatever Retry-After says.
MAX_RETRY_WAIT_S = 5.0


def retry_delay(value: str | None, default: float = 1.0) -> float:
    """Seconds to wait for a Retry-After header (delay-seconds or an HTTP date), within [0, MAX_RETRY_WAIT_S]."""
    seconds = default
    if value:
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, OverflowError):
                seconds = default
    return min(max(seconds, 0.0), MAX_RETRY_WAIT_S)


class ServerError(RuntimeError):
    """The server refused a request or could not be reached; the message says why."""

    def __init__(self, message: str, code: str = "", body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.body = code, body or {}


class _Retryable(Exception):
    def __init__(self, error: ServerError, wait: float) -> None:
        super().__init__(str(error))
        self.error, self.wait = error, wait


class ServeClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0,
                 on_retry: Callable[[str, float], None] | None = None) -> None:
        self.url = url.rstrip("/")
        self.on_retry = on_retry  # told (the server's message, seconds to wait) before a retry
        self.retries = 0  # requests sent again after a worker_restarted
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> ServeClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer; a 503 ``worker_restarted`` is retried once (see the module), other errors raise."""
        for attempt in range(2):
            try:
                return self._request_once(method, path, **kwargs)
            except _Retryable as exc:
                if attempt:
                    raise exc.error from None
                if self.on_retry:
                    self.on_retry(str(exc.error), exc.wait)
                self.retries += 1
                time.sleep(exc.wait)
        raise AssertionError("unreachable")

    def _request_once(self, method: str, path: str, **kwargs: Any) -> Any:
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
            failure = ServerError(f"server said {response.status_code}: "
                                  f"{error.get('message', response.text[:200])}", error.get("code", ""), error)
            if response.status_code == 503 and failure.code in RETRIED_CODES:
                raise _Retryable(failure, retry_delay(response.headers.get("Retry-After")))
            raise failure
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
