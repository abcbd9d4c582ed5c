"""Rate limits: failed sign-ins per client address, submits and uploads per user (`limits`, a moving
window). A request past its limit is a 429 whose Retry-After says when the window has room again.

The counters live in `rate_limit_storage`: in each API process's memory by default, in a shared store
(Redis) when several replicas must count together.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache

from fastapi import HTTPException, status
from limits import parse, storage, strategies


@lru_cache
def _limiter(url: str) -> strategies.MovingWindowRateLimiter:
    return strategies.MovingWindowRateLimiter(storage.storage_from_string(url))


class RateLimited(HTTPException):
    def __init__(self, what: str, rate: str, retry_after: int):
        super().__init__(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"too many {what} ({rate} allowed); try again in {retry_after} s",
            {"Retry-After": str(retry_after)},
        )


def _retry_after(limiter: strategies.MovingWindowRateLimiter, rate: str, key: str) -> int:
    reset = limiter.get_window_stats(parse(rate), key).reset_time
    return max(1, math.ceil(reset - time.time()))


def hit(storage_url: str, rate: str, what: str, key: str) -> None:
    """Count one request of `key`; RateLimited if it is past `rate`."""
    limiter = _limiter(storage_url)
    if not limiter.hit(parse(rate), key):
        raise RateLimited(what, rate, _retry_after(limiter, rate, key))


def check(storage_url: str, rate: str, what: str, key: str) -> None:
    """RateLimited if `key` has used up `rate` already, without counting this request."""
    limiter = _limiter(storage_url)
    if not limiter.test(parse(rate), key):
        raise RateLimited(what, rate, _retry_after(limiter, rate, key))
