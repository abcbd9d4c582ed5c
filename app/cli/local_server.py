"""Where `distill` goes without --url or DISTILL_URL where the server package is installed: the server
on this machine (`distill up`), with the token it saved (the entry point `distill.local_server`)."""

from __future__ import annotations


def local_server() -> tuple[str, str | None]:
    from app.core.config import Settings

    settings = Settings()  # not get_settings(), which makes the data folder: a client command leaves none behind
    saved = settings.data_dir / "token"
    return f"http://{settings.host}:{settings.port}", saved.read_text().strip() if saved.exists() else None
