"""OpenAI-style errors: every failure leaves as ``{"error": {"message", "type", "param", "code"}}``.

Client mistakes are 4xx with a message that says what to fix; overload is 503 with Retry-After;
only our own bugs may be 500, and even those keep the JSON shape (and the replica alive).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answer; raised anywhere in a request, rendered by the app's exception handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad_request(message: str, *, code: str = "invalid_request", param: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def overloaded(message: str, retry_after_s: int) -> APIError:
    return APIError(503, message, code="overloaded", headers={"Retry-After": str(retry_after_s)})


def _loc(loc: tuple[Any, ...]) -> str:
    """pydantic's location tuple as a JSON path: ('messages', 0, 'content') -> messages[0].content."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(exc: ValidationError) -> APIError:
    """The first problem pydantic found, phrased for the client."""
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return bad_request(f"the body is not valid JSON: {first['msg']}", code="invalid_json")
    param = _loc(first["loc"]) or None
    return bad_request(f"{param or 'body'}: {first['msg']}", code=first["type"], param=param)


def install_handlers(app: FastAPI) -> None:
    """Route every error path (ours, FastAPI's, Starlette's, unexpected ones) to the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _fastapi_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = _loc(tuple(first.get("loc", ()))) or None
        return bad_request(f"{param or 'request'}: {first.get('msg')}", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()
