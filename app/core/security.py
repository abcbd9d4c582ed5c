"""Short-lived signed download links: a browser can hand a checkpoint download to its own download
manager (streamed to disk, resumable) although a plain link cannot carry the bearer token."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from functools import lru_cache
from urllib.parse import urlencode

from .config import get_settings
from .files import create_private_once

LINK_SECONDS = 24 * 3600  # long enough to resume a multi-gigabyte download


@lru_cache
def _secret() -> bytes:
    settings = get_settings()
    if settings.secret_key:
        return settings.secret_key.encode()
    return create_private_once(settings.data_dir / "secret_key", secrets.token_hex(32)).strip().encode()


def _signature(path: str, expires: int) -> str:
    return hmac.new(_secret(), f"{path}|{expires}".encode(), hashlib.sha256).hexdigest()


def signed_url(path: str, seconds: int = LINK_SECONDS) -> tuple[str, int]:
    expires = int(time.time()) + seconds
    return f"{path}?{urlencode({'expires': expires, 'signature': _signature(path, expires)})}", expires


def valid_signature(path: str, expires: int, signature: str) -> bool:
    # As bytes: compare_digest refuses a str with non-ASCII characters (a TypeError, not a mismatch).
    return expires >= time.time() and hmac.compare_digest(_signature(path, expires).encode(), signature.encode())
