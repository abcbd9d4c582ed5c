"""A cap on request bodies, checked before a body is read whole: FastAPI parses a JSON body in
memory, and the 422 that refuses an oversize spec would echo all of it back."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.schemas import error_body


class BodyLimit:
    """A 413 for any request body over `limit` bytes, except on the routes in `exempt` ((method,
    path) pairs), which stream their bodies under a limit of their own (dataset uploads)."""

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[tuple[str, str], ...] = ()) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt
        upload = "datasets are uploaded to /api/v1/datasets"
        self.detail = f"the request body is over {limit} bytes, the most a request takes ({upload})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            # Answered here, outside the app and its exception handlers: in their shape all the same.
            await JSONResponse(error_body(413, self.detail), status_code=413)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            """A body sent without a Content-Length (chunked) is counted as it arrives; the route's
            exception handling answers the 413."""
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self.detail)
            return message

        await self.app(scope, counting_receive, send)
