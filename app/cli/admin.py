"""Administration on this machine's settings: `distill migrate`, `users ...`, `keys ...`."""

from __future__ import annotations

import typer

from distill_client.cli.core import (
    ClearWebhookOption,
    ExitCode,
    Failure,
    JsonOption,
    NewSecretOption,
    cli,
    emit,
    webhook_text,
)


@cli.command()
def migrate() -> None:
    """Bring the database schema up to date (alembic upgrade head)."""
    run_migrations()


def run_migrations() -> None:
    from alembic import command
    from alembic.config import Config

    from worker.engine.paths import PROJECT_ROOT

    command.upgrade(Config(str(PROJECT_ROOT / "alembic.ini")), "head")


users = typer.Typer(no_args_is_help=True, help="Manage users, their API tokens and webhooks.")
cli.add_typer(users, name="users")
keys = typer.Typer(no_args_is_help=True, help="Manage the keys that sign download links.")
cli.add_typer(keys, name="keys")


EXPIRES = typer.Option(
    None, "--expires-days", min=1, help="The token stops working after this many days (default: until revoked)."
)


def _expiry(days: int | None):
    from datetime import timedelta

    return timedelta(days=days) if days else None


@users.command("create")
def users_create(name: str, expires_days: int | None = EXPIRES, as_json: bool = JsonOption) -> None:
    """Create a user and print their API token (shown only this once)."""
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        try:
            _user, token = crud.create_user(session, name, _expiry(expires_days))
        except crud.NameTaken:
            raise Failure(
                f"a user named {name!r} exists; `distill users token {name}` gives them another token", ExitCode.USAGE
            ) from None
    emit(as_json, {"name": name, "token": token}, token)


@users.command("token")
def users_token(name: str, expires_days: int | None = EXPIRES, as_json: bool = JsonOption) -> None:
    """Print a new API token for an existing user (shown only this once); their other tokens stay valid."""
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        user = crud.user_named(session, name)
        if user is None:
            raise Failure(f"no user {name!r}", ExitCode.NOT_FOUND)
        token = crud.create_token(session, user, _expiry(expires_days))
    emit(as_json, {"name": name, "token": token}, token)


@users.command("tokens")
def users_tokens(name: str, as_json: bool = JsonOption) -> None:
    """List a user's tokens: id, created, expires, revoked (the tokens themselves are never stored)."""
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        tokens = crud.tokens_of(session, name)
    if tokens is None:
        raise Failure(f"no user {name!r}", ExitCode.NOT_FOUND)
    stamp = lambda d: d.strftime("%Y-%m-%d %H:%M:%S") if d else "-"  # noqa: E731
    rows = [f"{t.id:>6}  {stamp(t.created_at):<20} {stamp(t.expires_at):<20} {stamp(t.revoked_at)}" for t in tokens]
    emit(
        as_json,
        [
            {"id": t.id, "created_at": t.created_at, "expires_at": t.expires_at, "revoked_at": t.revoked_at}
            for t in tokens
        ],
        "\n".join([f"{'id':>6}  {'created':<20} {'expires':<20} revoked", *rows]),
    )


@users.command("revoke")
def users_revoke(token_id: int, as_json: bool = JsonOption) -> None:
    """Revoke a token by the id `distill users tokens` shows; it stops working at once."""
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        if not crud.revoke_token(session, token_id):
            raise Failure(f"no live token with id {token_id}", ExitCode.NOT_FOUND)
    emit(as_json, {"revoked": token_id}, f"revoked token {token_id}")


@users.command("webhook")
def users_webhook(
    name: str,
    url: str | None = typer.Argument(
        None, help="Where the user's jobs report their end (a job's notify.webhook_url overrides it)."
    ),
    clear: bool = ClearWebhookOption,
    new_secret: bool = NewSecretOption,
    as_json: bool = JsonOption,
) -> None:
    """Set a user's default webhook URL; without URL, show it. Prints the signing secret when one is
    made (the first time, or with --new-secret): the receiver checks each message with it."""
    from pydantic import ValidationError

    from app import crud, webhooks
    from app.core.config import get_settings
    from app.core.db import session_factory
    from app.schemas import Notify

    if url is not None:
        try:
            Notify(webhook_url=url)
        except ValidationError as err:
            raise Failure(f"{url}: {err.errors()[0]['msg'].removeprefix('Value error, ')}", ExitCode.USAGE) from None
    with session_factory()() as session:
        user = crud.user_named(session, name)
        if user is None:
            raise Failure(f"no user {name!r}", ExitCode.NOT_FOUND)
        try:
            secret = (
                webhooks.set_user_webhook(session, user, url, get_settings(), clear=clear, rotate=new_secret)
                if (url or clear or new_secret)
                else None
            )
        except webhooks.UrlRefused as refused:
            raise Failure(str(refused), ExitCode.USAGE) from None
        shown = {"name": name, "webhook_url": user.webhook_url, **({"secret": secret} if secret else {})}
    emit(as_json, shown, webhook_text(user.webhook_url, secret))


@keys.command("rotate")
def keys_rotate(as_json: bool = JsonOption) -> None:
    """Create a new key that signs links from now on; links signed by older keys keep working until retired."""
    from app.core import signing_keys

    try:
        kid = signing_keys.rotate()
    except signing_keys.KeysFromSetting as err:
        raise Failure(str(err), ExitCode.FAILED) from None
    emit(as_json, {"kid": kid}, kid)


@keys.command("list")
def keys_list(as_json: bool = JsonOption) -> None:
    """List the accepted keys: id, created, and the one that signs (the secrets are never shown)."""
    from app.core import signing_keys

    accepted = signing_keys.all_keys()  # the first signs
    stamp = lambda d: d.strftime("%Y-%m-%d %H:%M:%S") if d else "-"  # noqa: E731
    rows = [
        f"{key.kid:<24} {stamp(key.created):<20} {'yes' if n == 0 else ''}".rstrip() for n, key in enumerate(accepted)
    ]
    emit(
        as_json,
        [{"kid": key.kid, "created": key.created, "signs": n == 0} for n, key in enumerate(accepted)],
        "\n".join([f"{'id':<24} {'created':<20} signs", *rows]),
    )


@keys.command("retire")
def keys_retire(kid: str, as_json: bool = JsonOption) -> None:
    """Stop accepting links signed by key KID, at once; rotate first if it is the key that signs."""
    from app.core import signing_keys

    try:
        signing_keys.retire(kid)
    except signing_keys.KeysFromSetting as err:
        raise Failure(str(err), ExitCode.FAILED) from None
    except LookupError as err:
        raise Failure(str(err), ExitCode.NOT_FOUND) from None
    except ValueError as err:
        raise Failure(str(err), ExitCode.USAGE) from None
    emit(as_json, {"retired": kid}, f"retired key {kid}")
