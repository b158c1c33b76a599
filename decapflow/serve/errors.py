"""The server's one error shape, ``{"error": {"code", "message"}}``, and the handlers that give every failure it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from decapflow.errors import (
    BankError,
    EncoderUnavailable,
    NoDecoder,
    UnknownBank,
    UnknownDecoder,
    UnknownVersion,
)
from decapflow.serve.batcher import QueueFull

log = logging.getLogger("decapflow.serve")


class ApiError(Exception):
    """An error a client caused or can act on: an HTTP status, a stable code and a message for people; ``extra``
    goes into the error body, ``headers`` (e.g. Retry-After) onto the response."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra
        self.headers = headers

    def __reduce__(self) -> tuple:  # crosses the process boundary from the compute worker
        return _rebuild_api_error, (self.status, self.code, self.message, self.extra, self.headers)


def _rebuild_api_error(status: int, code: str, message: str, extra: dict[str, Any],
                       headers: dict[str, str] | None = None) -> ApiError:
    return ApiError(status, code, message, headers, **extra)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers)


#: Library exceptions and what they mean to a client (checked in order: subclasses first).
LIBRARY_ERRORS: list[tuple[type[Exception], int, str]] = [
    (UnknownVersion, 404, "unknown_version"),  # a subclass of UnknownBank: first
    (UnknownBank, 404, "unknown_bank"),
    (UnknownDecoder, 404, "unknown_decoder"),
    (NoDecoder, 409, "no_decoder"),
    (QueueFull, 503, "overloaded"),
    (EncoderUnavailable, 503, "encoder_unavailable"),
    (BankError, 409, "bank_error"),
]


def _library_handler(status: int, code: str) -> Any:
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return error_response(status, code, str(exc))

    return handle


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "upload_too_large"}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_parameter", describe_validation(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    for kind, status, code in LIBRARY_ERRORS:
        app.add_exception_handler(kind, _library_handler(status, code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", f"internal error ({type(exc).__name__}); see the server log")


def describe_validation(errors: Any) -> str:
    """Pydantic's error list as one line: ``tau: Input should be greater than 0; k: ...``."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
