"""Security headers on every response. The web page keeps a bearer token in localStorage, so no script
but its own may run on it and no other site may frame it; no response is sniffed into another type,
and no URL (a job's, a signed link's) leaks to other sites through the Referer header."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The page loads its own scripts and styles only (no inline ones: they are modules and a stylesheet),
# and talks to this origin only.
PAGE_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
# FastAPI's interactive docs load Swagger UI and ReDoc from a CDN and start them with an inline script;
# they hold no token (it is typed into them), so they keep only the rule against framing.
DOCS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
DOCS_POLICY = "frame-ancestors 'none'"


class SecurityHeaders:
    """Pure ASGI middleware, so that event streams and file downloads pass through untouched."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = DOCS_POLICY if scope["path"] in DOCS else PAGE_POLICY

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = policy
                headers["X-Frame-Options"] = "DENY"
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
            await send(message)

        await self.app(scope, receive, send_with_headers)
