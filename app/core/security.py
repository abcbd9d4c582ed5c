"""Short-lived signed download links: a browser can hand a checkpoint download to its own download
manager (streamed to disk, resumable) although a plain link cannot carry the bearer token.
Each link names the key that signed it (`kid`), so keys can be rotated (see signing_keys)."""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode

from .signing_keys import accepted_key, signing_key

LINK_SECONDS = 24 * 3600  # long enough to resume a multi-gigabyte download


def _signature(secret: bytes, kid: str, path: str, expires: int) -> str:
    # The key id is signed too ('|' is in no id): a link cannot be moved to another key.
    return hmac.new(secret, f"{kid}|{path}|{expires}".encode(), hashlib.sha256).hexdigest()


def signed_url(path: str, seconds: int = LINK_SECONDS) -> tuple[str, int]:
    key, expires = signing_key(), int(time.time()) + seconds
    query = {"expires": expires, "kid": key.kid, "signature": _signature(key.secret, key.kid, path, expires)}
    return f"{path}?{urlencode(query)}", expires


def valid_signature(path: str, expires: int, kid: str, signature: str) -> bool:
    """Whether the link is unexpired and signed by key `kid`, which is still accepted."""
    key = accepted_key(kid) if expires >= time.time() else None
    # As bytes: compare_digest refuses a str with non-ASCII characters (a TypeError, not a mismatch).
    return key is not None and hmac.compare_digest(
        _signature(key.secret, kid, path, expires).encode(), signature.encode()
    )
