"""ASGI middleware at the door: the API key, request metrics, and the upload size limit.

The key is accepted as ``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or as the password of HTTP Basic auth
(any user name), so a browser asks for it once and the page then works; keys are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from typing import Any

from decapflow.serve.errors import error_response
from decapflow.serve.metrics import Metrics

Scope = dict[str, Any]

#: An over-limit body is read and dropped up to this many bytes so the client can read its 413, then cut off.
DRAIN_LIMIT = 256 * 2**20


def presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    if key := headers.get(b"x-api-key"):
        return key
    scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() == b"bearer":
        return value.strip()
    if scheme.lower() == b"basic":
        try:
            return base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return None
    return None


class Gate:
    """Refuses requests without the API key (when one is set) and records every request in the metrics."""

    def __init__(self, app: Any, api_key: str | None, metrics: Metrics, open_paths: set[str]) -> None:
        self.app, self.metrics, self.open_paths = app, metrics, open_paths
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_and_record(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.key is not None and scope["path"] not in self.open_paths and not self._allowed(scope):
                response = error_response(401, "unauthorized", "missing or wrong API key (send Authorization: "
                                          "Bearer KEY or X-API-Key: KEY)",
                                          headers={"WWW-Authenticate": 'Basic realm="decapflow"'})
                await response(scope, receive, send_and_record)
            else:
                await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", None) or ("unmatched" if status[0] == 404 else scope["path"])
            self.metrics.observe(route if status[0] != 401 else "unauthorized", scope["method"], status[0],
                                 time.perf_counter() - started)

    def _allowed(self, scope: Scope) -> bool:
        key = presented_key(dict(scope["headers"]))
        return key is not None and hmac.compare_digest(key, self.key or b"")


class BodyLimit:
    """Bodies over ``max_bytes`` get a 413 before the app sees them; bodies under it are read once and replayed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, seen, more = bytearray(), 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen <= self.max_bytes:
                body += chunk
            more = message.get("more_body", False)
            if seen > DRAIN_LIMIT:
                break
        if seen > self.max_bytes:
            mb = self.max_bytes / 2**20
            response = error_response(413, "upload_too_large", f"the request body is over the {mb:g} MB limit "
                                      f"(serve --max-upload-mb)", headers={"Connection": "close"})
            return await response(scope, receive, send)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
