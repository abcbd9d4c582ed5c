"""The keys that sign download links. Every link names its key by id, several keys are accepted at
once and only the newest signs, so a rotation never breaks the links already handed out.

The keys come from DISTILL_SECRET_KEY when it is set, else from files in data_dir/keys (one file a
key, named by its id, 0600 from birth). The folder is read on every use rather than cached: a key
that `distill keys` rotates or retires, on this machine or on another replica sharing the volume,
counts at once, and reading a tiny file costs little beside the download it guards.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .config import KEY_ID, get_settings
from .files import create_private_once


@dataclass(frozen=True)
class SigningKey:
    kid: str
    secret: bytes
    created: datetime | None  # None for keys from the setting


class KeysFromSetting(Exception):
    """The keys are DISTILL_SECRET_KEY's, which only its owner can change."""

    def __init__(self) -> None:
        super().__init__(
            "the keys come from DISTILL_SECRET_KEY: put a new KID:SECRET first in it to rotate, "
            "remove an entry to retire it, then restart the API"
        )


def keys_dir() -> Path:
    return get_settings().data_dir / "keys"


def _read(path: Path) -> SigningKey | None:
    try:
        return SigningKey(
            path.stem, path.read_text().strip().encode(), datetime.fromtimestamp(path.stat().st_mtime, UTC)
        )
    except FileNotFoundError:  # retired between listing and reading
        return None


def all_keys() -> list[SigningKey]:
    """Every accepted key, the one that signs first."""
    setting = get_settings().secret_key
    if setting:
        return [SigningKey(kid, secret.encode(), None) for kid, secret in setting]
    folder = keys_dir()
    # Key ids begin with their creation time, so the newest key sorts first.
    paths = (
        sorted((p for p in folder.glob("*.key") if KEY_ID.fullmatch(p.stem)), reverse=True) if folder.is_dir() else []
    )
    return [key for key in map(_read, paths) if key is not None]


def accepted_key(kid: str) -> SigningKey | None:
    """The key with this id if links it signed are still accepted."""
    setting = get_settings().secret_key
    if setting:
        return next((SigningKey(k, secret.encode(), None) for k, secret in setting if k == kid), None)
    if not KEY_ID.fullmatch(kid):  # the id comes from a URL: never a path outside the folder
        return None
    return _read(keys_dir() / f"{kid}.key")


def signing_key() -> SigningKey:
    """The newest key. The first link ever signed creates one; replicas racing to do so each create
    their own, which is harmless: all are accepted, and the newest signs from then on."""
    keys = all_keys()
    return keys[0] if keys else accepted_key(rotate())


def rotate() -> str:
    """Create a key that signs from now on; the id of the new key."""
    if get_settings().secret_key:
        raise KeysFromSetting()
    folder = keys_dir()
    folder.mkdir(mode=0o700, exist_ok=True)
    kid = f"{datetime.now(UTC):%Y%m%d%H%M%S%f}-{secrets.token_hex(3)}"  # microseconds: names sort by age
    create_private_once(folder / f"{kid}.key", secrets.token_hex(32))
    return kid


def retire(kid: str) -> None:
    """Stop accepting links signed by key `kid`; its secret is deleted. The key that signs cannot be
    retired (rotate first), or the next link would be signed with an older key."""
    if get_settings().secret_key:
        raise KeysFromSetting()
    keys = all_keys()
    if kid not in [key.kid for key in keys]:
        raise LookupError(f"no key {kid!r}; `distill keys list` shows them")
    if keys[0].kid == kid:
        raise ValueError(f"key {kid} signs new links; run `distill keys rotate` first, then retire it")
    (keys_dir() / f"{kid}.key").unlink()
