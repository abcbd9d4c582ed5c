"""A fair share of an API process for each client: requests are taken in turn from each client with
requests waiting, so that one client's burst waits behind its own requests, not in front of everyone's.

FastAPI runs sync routes and dependencies on a pool of threads in the order their requests arrived,
and Python runs one thread at a time: 200 submits sent at once by ten users filled that queue, and an
eleventh user's `GET /jobs` waited up to 9 s behind them (tests/chaos, "load"). Here an API process
works on DISTILL_REQUESTS_AT_ONCE requests at once; the others wait on the event loop, holding no
thread and no database connection, one queue per bearer token, and a free place goes to the next
token in turn (round robin). A token that sends one request at a time does not wait for a burst's
request to finish: one place past the limit is kept for it.

A request takes its turn once its body has arrived (each part within DISTILL_UPLOAD_IDLE_SECONDS, or
a 408), and holds its place until its response starts: the route's work (threads, the database) is
done by then, and a long body after it (an event stream, an archive download) no longer counts.
Requests without a token (health checks, the page's files) are not held. Counted per API process,
in memory, like the caps in slots.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter, deque
from weakref import WeakKeyDictionary

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import get_settings
from app.schemas import error_body


class Turns:
    """`limit` places, given to waiting keys in turn: a key with many waiters gets one place per round.
    A key that arrives with nothing running or waiting (a client that sends one request at a time) is
    quiet: it may take one more place kept past the limit, and if that is taken too, it goes to the
    front of the line. A quiet client thus never waits for a burst's request to finish."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running: Counter[bytes] = Counter()
        self.waiting: dict[bytes, deque[asyncio.Future]] = {}  # in the order keys take their turns
        self.quiet: set[bytes] = set()  # waiting keys that arrived quiet

    def _fits(self, quiet: bool) -> bool:
        return sum(self.running.values()) < self.limit + quiet

    async def take(self, key: bytes) -> None:
        quiet = not self.running[key] and key not in self.waiting
        if self._fits(quiet):  # no waiting key fits: give() hands out every place it can
            self.running[key] += 1
            return
        turn = asyncio.get_running_loop().create_future()
        if quiet:
            self.waiting = {key: deque([turn]), **self.waiting}
            self.quiet.add(key)
        else:
            self.waiting.setdefault(key, deque()).append(turn)
        try:
            await turn  # give() has counted the place as this key's
        except asyncio.CancelledError:  # the client went away while waiting
            if turn.cancelled():
                self._forget(key, turn)
            else:
                self.give(key)  # the place came just as it left: pass it on
            raise

    def give(self, key: bytes) -> None:
        """Free a place of `key`'s: the first key in line that fits gets it, and goes to the back of
        the line if it waits for more (no longer quiet)."""
        self.running[key] -= 1
        if not self.running[key]:
            del self.running[key]
        while fitting := next((k for k in self.waiting if self._fits(k in self.quiet)), None):
            queue = self.waiting.pop(fitting)
            self.quiet.discard(fitting)
            turn = queue.popleft()
            if queue:
                self.waiting[fitting] = queue
            if not turn.done():  # not cancelled meanwhile
                self.running[fitting] += 1
                turn.set_result(None)
                return

    def _forget(self, key: bytes, turn: asyncio.Future) -> None:
        queue = self.waiting.get(key)
        if queue is not None and turn in queue:
            queue.remove(turn)
            if not queue:
                del self.waiting[key]
                self.quiet.discard(key)


class FairShare:
    """Requests with a bearer token wait for their turn, except on the routes in `exempt` ((method,
    path) pairs) that hold their request for long while the client sends (uploads, which have a cap
    of their own)."""

    def __init__(self, app: ASGIApp, exempt: tuple[tuple[str, str], ...] = ()) -> None:
        self.app, self.exempt = app, exempt
        # One line per event loop, made on first use from the settings then in force: a server runs
        # one loop, but a test client may run each request on a loop of its own, and a loop's futures
        # must not be woken from another.
        self.turns: WeakKeyDictionary[asyncio.AbstractEventLoop, Turns] = WeakKeyDictionary()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = dict(scope.get("headers", ())).get(b"authorization")
        if scope["type"] != "http" or not authorization or (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        if loop not in self.turns:
            self.turns[loop] = Turns(get_settings().requests_at_once)
        turns = self.turns[loop]
        key = hashlib.sha256(authorization).digest()  # the token itself is kept nowhere
        # The body (at most BodyLimit's 1 MiB here) is received before the request takes its turn: a
        # client that sends slowly must not hold a place while everyone else waits.
        try:
            arrived = await _whole_body(receive, get_settings().upload_idle_seconds)
        except HTTPException as err:  # BodyLimit's 413, answered here as the app would
            await JSONResponse(error_body(err.status_code, err.detail), status_code=err.status_code)(
                scope, receive, send
            )
            return
        except TimeoutError:
            message = "the request body stopped arriving (DISTILL_UPLOAD_IDLE_SECONDS)"
            await JSONResponse(error_body(408, message), status_code=408)(scope, receive, send)
            return

        async def receive_arrived() -> Message:
            return arrived.popleft() if arrived else await receive()

        await turns.take(key)
        held = True

        async def give_back_when_answered(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and held:
                held = False
                turns.give(key)
            await send(message)

        try:
            await self.app(scope, receive_arrived, give_back_when_answered)
        finally:
            if held:
                turns.give(key)


async def _whole_body(receive: Receive, idle_seconds: float) -> deque[Message]:
    """The request's messages up to the end of its body (or the client's going away), each of which
    must arrive within `idle_seconds` (TimeoutError)."""
    arrived: deque[Message] = deque()
    while True:
        message = await asyncio.wait_for(receive(), idle_seconds)
        arrived.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return arrived
