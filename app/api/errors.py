"""One error shape (app.schemas.ErrorOut) for every error the API answers, and its declaration in
the OpenAPI description, so that generated clients know each route's errors."""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.utils import is_body_allowed_for_status_code
from starlette.exceptions import HTTPException
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from app.schemas import ErrorOut, error_body, field_errors_body


def errors(*status_codes: int) -> dict[int, dict]:
    """The `responses=` of a route that may answer these errors: each with the one error model."""
    return {code: {"model": ErrorOut} for code in status_codes}


def install(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)


async def http_error(_request: Request, exc: HTTPException) -> Response:
    """Every HTTPException: the routes', the dependencies' (401, 403, 404, 429), and Starlette's own
    (an unknown path's 404, a wrong method's 405)."""
    if not is_body_allowed_for_status_code(exc.status_code):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 422 naming each bad field. An echoed input of 1e999 (read as inf) would otherwise fail to render (a 500)."""
    return JSONResponse(field_errors_body(_json_safe(jsonable_encoder(exc.errors()))), status_code=422)


async def server_error(_request: Request, _exc: Exception) -> JSONResponse:
    """A bug's 500, in the same shape. Starlette raises the exception on after this answer, so the
    server logs its traceback; the client never sees it."""
    return JSONResponse(error_body(500, "internal server error; the server's log has the cause"), status_code=500)


class FileDownload(FileResponse):
    """A FileResponse whose answers to a bad Range header are errors in the one shape (Starlette's own
    are plain text). Starlette parses the header while it sends the response, still inside the
    route's exception handling, and before anything is sent: an HTTPException raised here is answered
    by http_error."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader as exc:
            raise HTTPException(400, f"Range header {http_range[:100]!r}: {exc.content}") from None
        except RangeNotSatisfiable as exc:
            raise HTTPException(
                416,
                f"Range header {http_range[:100]!r}: the file has {exc.max_size} bytes",
                headers={"Content-Range": f"bytes */{exc.max_size}"},
            ) from None


def _json_safe(value):
    """`value` with every non-finite float as text: JSON has no inf or nan."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
