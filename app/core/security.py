"""Short-lived signed download links: a browser can hand a checkpoint download to its own download
manager (streamed to disk, resumable) although a plain link cannot carry the bearer token.
Each link names the key that signed it (`kid`), so keys can be rotated (see signing_keys), and the
API token it was made with (`tid`), so that it stops working when that token is revoked or expires."""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode

from .signing_keys import accepted_key, signing_key

LINK_SECONDS = 24 * 3600  # long enough to resume a multi-gigabyte download


def _signature(secret: bytes, kid: str, tid: int, path: str, expires: int) -> str:
    # The key id and the token id are signed too ('|' is in no id): a link cannot be moved to another key
    # or token.
    return hmac.new(secret, f"{kid}|{tid}|{path}|{expires}".encode(), hashlib.sha256).hexdigest()


def signed_url(path: str, tid: int, seconds: int = LINK_SECONDS) -> tuple[str, int]:
    """A link to `path` for `seconds`, on behalf of API token `tid`."""
    key, expires = signing_key(), int(time.time()) + seconds
    signature = _signature(key.secret, key.kid, tid, path, expires)
    return f"{path}?{urlencode({'expires': expires, 'kid': key.kid, 'tid': tid, 'signature': signature})}", expires


def valid_signature(path: str, expires: int, kid: str, tid: int, signature: str) -> bool:
    """Whether the link is unexpired and signed by key `kid`, which is still accepted (whether token `tid`
    still is, the caller asks the database)."""
    key = accepted_key(kid) if expires >= time.time() else None
    # As bytes: compare_digest refuses a str with non-ASCII characters (a TypeError, not a mismatch).
    return key is not None and hmac.compare_digest(
        _signature(key.secret, kid, tid, path, expires).encode(), signature.encode()
    )
