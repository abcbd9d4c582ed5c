"""Turns, the line that gives an API process's places to clients in turn, and FairShare, the middleware
that puts requests with a bearer token in it (tests/chaos, "load", measures what it is for)."""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from app.core.config import get_settings
from app.core.fair_share import FairShare, Turns

A, B, C, D = b"a", b"b", b"c", b"d"


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(test) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


async def a_and_b_running_then_waiting(keys: tuple[bytes, ...]) -> tuple[Turns, list[asyncio.Task], list[bytes]]:
    """Two places, taken by A and B; then a request of each of `keys` waits, in that order. The list
    gets each waiting key as it is given a place."""
    turns, order = Turns(2), []
    await turns.take(A)
    await turns.take(B)

    async def wait(key: bytes) -> None:
        await turns.take(key)
        order.append(key)

    tasks = [asyncio.create_task(wait(key)) for key in keys]
    await settle()
    return turns, tasks, order


def test_places_up_to_the_limit_are_free_and_a_key_with_one_running_waits_for_one_to_be_given_back():
    async def test():
        turns = Turns(2)
        await turns.take(A)
        await turns.take(B)
        another = asyncio.create_task(turns.take(A))
        await settle()
        assert not another.done()
        turns.give(B)
        await settle()
        assert another.done() and turns.running == {A: 2}

    run(test)


def test_keys_with_requests_waiting_take_one_place_each_in_turn():
    async def test():
        turns, tasks, order = await a_and_b_running_then_waiting((A, A, A, B, B))
        for _ in tasks:
            turns.give(next(iter(turns.running)))
            await settle()
        assert order == [A, B, A, B, A]  # not A, A, A, B, B as they arrived

    run(test)


def test_a_key_with_nothing_running_takes_the_place_kept_past_the_limit_or_goes_to_the_front_of_the_line():
    async def test():
        turns, burst, order = await a_and_b_running_then_waiting((A, A, B, B))
        await asyncio.wait_for(turns.take(C), 0.1)  # C has nothing running: the kept place, at once
        single = asyncio.create_task(turns.take(D))  # that place is C's: D is next, not after A and B
        await settle()
        assert not single.done()
        turns.give(A)
        await settle()
        assert single.done() and order == []
        turns.give(C)  # B, D and A's second run: the limit for keys with something running
        await settle()
        assert order == []
        turns.give(D)
        await settle()
        assert order == [A]
        for task in burst:
            task.cancel()

    run(test)


def test_a_waiter_that_leaves_gives_up_its_turn_and_a_place_it_was_just_given():
    async def test():
        turns = Turns(1)
        await turns.take(A)
        await turns.take(B)  # the place kept past the limit
        gone = asyncio.create_task(turns.take(C))
        after = asyncio.create_task(turns.take(D))
        await settle()
        gone.cancel()  # left while waiting: forgotten, D is next
        await settle()
        assert C not in turns.waiting and C not in turns.quiet
        turns.give(A)
        await settle()
        assert after.done() and turns.running == {B: 1, D: 1}

        late = asyncio.create_task(turns.take(C))
        await settle()
        turns.give(D)  # C is given the place...
        late.cancel()  # ...and leaves before it runs: the place is free again, not lost
        await settle()
        assert turns.running == {B: 1} and not turns.waiting and not turns.quiet
        await turns.take(A)  # free at once

    run(test)


def request(app, path: str, token: str | None, body: list[bytes] | None = None) -> tuple[asyncio.Task, list[dict]]:
    """`app` called as a server would, in a task: the request's `body` in parts (after the last one the
    client stalls, unless the list ends with b""), then a client that stays connected. The list gets
    the messages the app sends."""
    sent: list[dict] = []
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {"type": "http", "method": "POST" if body else "GET", "path": path, "headers": headers, "query_string": b""}
    parts = list(body or [b""])

    async def receive():
        if not parts:
            await asyncio.Event().wait()
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts) or part != b""}

    async def send(message):
        sent.append(message)

    return asyncio.create_task(app(scope, receive, send)), sent


def test_the_middleware_holds_a_tokens_requests_until_their_responses_start(monkeypatch):
    monkeypatch.setattr(get_settings(), "requests_at_once", 2)

    async def test():
        release, seen = asyncio.Event(), []

        async def slow(request: Request) -> PlainTextResponse:  # holds its place until released
            seen.append(request.headers.get("authorization", "none"))
            await release.wait()
            return PlainTextResponse("done")

        async def stream(request: Request) -> StreamingResponse:  # starts at once, ends when released
            async def body():
                yield b"started"
                await release.wait()

            return StreamingResponse(body())

        app = FairShare(Starlette(routes=[Route("/slow", slow), Route("/stream", stream)]))
        burst = [request(app, "/slow", "bursty") for _ in range(3)]
        await settle()
        assert seen == ["Bearer bursty"] * 2  # two places; the third waits
        request(app, "/slow", None)  # no token: never held
        await settle()
        assert seen[2:] == ["none"]
        other, _ = request(app, "/slow", "other")
        await settle()
        assert seen[3:] == ["Bearer other"]  # nothing of its own running: the place kept past the limit
        release.set()
        await asyncio.gather(other, *(task for task, _ in burst))
        assert seen[4:] == ["Bearer bursty"]

        # A streaming answer gives its place back once it has started, not when it ends.
        release.clear()
        streams = [request(app, "/stream", "bursty") for _ in range(2)]
        await settle()
        assert all([m["type"] for m in sent] == ["http.response.start", "http.response.body"] for _, sent in streams)
        seen.clear()
        request(app, "/slow", "bursty")
        await settle()
        assert seen == ["Bearer bursty"]  # it would wait if the open streams held the two places
        release.set()
        await asyncio.gather(*(task for task, _ in streams))

    run(test)


def test_a_request_takes_its_turn_once_its_body_has_arrived_and_a_stalled_body_is_a_408(monkeypatch):
    monkeypatch.setattr(get_settings(), "requests_at_once", 1)
    monkeypatch.setattr(get_settings(), "upload_idle_seconds", 0.5)

    async def test():
        async def echo(request: Request) -> PlainTextResponse:
            return PlainTextResponse(str(len(await request.body())))

        app = FairShare(Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"])]))
        slow, slow_sent = request(app, "/echo", "slow", body=[b"x" * 10])  # the rest never comes
        await settle()
        quick, quick_sent = request(app, "/echo", "quick")
        await asyncio.wait_for(quick, 0.4)  # the one place was free: the slow body did not hold it
        assert quick_sent[0]["status"] == 200
        await slow
        assert slow_sent[0]["status"] == 408

        whole, whole_sent = request(app, "/echo", "slow", body=[b"x" * 10, b"y" * 5, b""])
        await whole
        assert whole_sent[1]["body"] == b"15"  # the app reads the body that arrived before its turn

    run(test)
