"""What every `distill` command shares: the Typer app, exit codes and the one error handler, the
common options, JSON output, and the API client of the client commands. The server package adds its
commands to the same app (distill_client.cli.plugins)."""

from __future__ import annotations

import json
import os
from enum import IntEnum
from typing import TYPE_CHECKING, Optional

import typer
from typer.core import TyperGroup

try:  # click's usage errors: typer 0.24 and newer (Python 3.10+) carry click inside, with this name
    from typer import TyperException as UsageError
except ImportError:  # older typer (what Python 3.9 installs) uses click itself
    from click import ClickException as UsageError

from ..status import JobStatus
from .plugins import local_server

if TYPE_CHECKING:
    from ..api import Client


class ExitCode(IntEnum):
    """What `distill` exits with; EXIT_CODES says what each means."""

    OK = 0
    FAILED = 1
    USAGE = 2
    CANCELLED = 3
    NOT_FOUND = 4
    UNAVAILABLE = 5
    UNAUTHORIZED = 6
    TIMED_OUT = 7


# The same table is in README.md (tests/service/test_cli.py compares them).
EXIT_CODES = {
    ExitCode.OK: "done; with --wait or --follow, the job succeeded",
    ExitCode.FAILED: "the job failed, or the command did (a file it could not write, say)",
    ExitCode.USAGE: "bad usage or a bad spec: an option, a spec the server refuses (422), an Idempotency-Key "
    "used before with another spec (409), a delete of a job not ended or of a dataset it reads (409), a user name "
    "that exists",
    ExitCode.CANCELLED: "the job was cancelled",
    ExitCode.NOT_FOUND: "no such job, checkpoint, user, token or key",
    ExitCode.UNAVAILABLE: "the server unreachable or failing (connection refused, timeouts, 5xx) after retrying, "
    "a limit reached (429), or a download that arrived broken: try again later",
    ExitCode.UNAUTHORIZED: "no token, or one that is wrong, expired or revoked (401, 403)",
    ExitCode.TIMED_OUT: "--wait --timeout passed before the job ended (the job runs on)",
}
# A job's final status as the exit code of a command that waited for it.
OUTCOMES = {
    JobStatus.SUCCEEDED: ExitCode.OK,
    JobStatus.FAILED: ExitCode.FAILED,
    JobStatus.CANCELLED: ExitCode.CANCELLED,
}


class Failure(Exception):
    """A command's error: one line for people, and the exit code of its kind."""

    def __init__(self, message: str, code: ExitCode):
        super().__init__(message)
        self.code = code


class _Commands(TyperGroup):
    """Runs every command under one error handler. A known error becomes one line on stderr (with
    --json, a JSON document) and its exit code; anything else is a bug, whose traceback typer prints
    without local variables (they would show the token in CI logs)."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except UsageError as err:  # typer shows them with the usage line
            if not ctx.meta.get("json"):
                raise
            _report(True, err.format_message(), err.exit_code, {})
        except Exception as err:
            known = _known(err)
            if known is None:
                raise
            _report(ctx.meta.get("json", False), *known)


def _known(err: Exception) -> Optional[tuple[str, ExitCode, dict]]:
    """A known error's message, exit code and, for --json, details; None for anything else."""
    import httpx
    import pydantic

    from ..api import ApiError, ChecksumMismatch, SpecFileError

    if isinstance(err, Failure):
        return str(err), err.code, {}
    if isinstance(err, ApiError):
        by_status = {
            401: ExitCode.UNAUTHORIZED,
            403: ExitCode.UNAUTHORIZED,
            404: ExitCode.NOT_FOUND,
            429: ExitCode.UNAVAILABLE,
        }
        code = by_status.get(err.status_code, ExitCode.UNAVAILABLE if err.status_code >= 500 else ExitCode.USAGE)
        return str(err), code, {"status_code": err.status_code, "detail": err.detail}
    if isinstance(err, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
        return f"bad API address (--url, DISTILL_URL): {err}", ExitCode.USAGE, {}
    if isinstance(err, httpx.TransportError):  # what is left after the client's retries
        hint = "is a server running there? --url or DISTILL_URL names the API's address (`distill up` starts one on "
        hint += "a machine with the server package)"
        return f"cannot reach {err.request.url}: {type(err).__name__}: {err}; {hint}", ExitCode.UNAVAILABLE, {}
    if isinstance(err, ChecksumMismatch):
        return str(err), ExitCode.UNAVAILABLE, {}
    if isinstance(err, SpecFileError):
        return str(err), ExitCode.USAGE, {}
    if isinstance(err, pydantic.ValidationError) and err.title == "Settings":  # a DISTILL_ variable's value
        problems = "; ".join(f"DISTILL_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in err.errors())
        return f"bad setting: {problems}", ExitCode.USAGE, {}
    if isinstance(err, OSError):
        return str(err), ExitCode.FAILED, {}
    return None


def _report(as_json: bool, message: str, code: int, details: dict) -> None:
    document = json.dumps({"error": message, "exit_code": int(code), **details})  # one line, whole in any CI log
    typer.echo(document if as_json else f"error: {message}", err=True)
    raise typer.Exit(code)


cli = typer.Typer(
    cls=_Commands,
    no_args_is_help=True,
    add_completion=True,  # --install-completion and --show-completion, for bash, zsh, fish and PowerShell
    pretty_exceptions_show_locals=False,
    help="Distil large language models into small ones (MiniLLM).",
    epilog="Exit codes:\n\n" + "\n\n".join(f"{int(c)}  {meaning}" for c, meaning in EXIT_CODES.items()),
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"distill {version('distill-client')}")
        raise typer.Exit()


@cli.callback()
def _options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version, help="Print the version."),
) -> None:
    pass


def _errors_as_json(ctx: typer.Context, value: bool) -> bool:
    """--json turns errors into JSON too: noted where _Commands sees it (all contexts share `meta`)."""
    ctx.meta["json"] = value
    return value


UrlOption = typer.Option(None, "--url", envvar="DISTILL_URL", help="API address (https://...).")
TokenOption = typer.Option(None, "--token", envvar="DISTILL_TOKEN", help="API token.")
JsonOption = typer.Option(
    False,
    "--json",
    is_eager=True,
    callback=_errors_as_json,
    help="Print one JSON document on stdout (an error: one on stderr).",
)
ClearWebhookOption = typer.Option(False, "--clear", help="Remove the default webhook URL.")
NewSecretOption = typer.Option(
    False, "--new-secret", help="Make a new signing secret; the old one stops signing at once."
)
SetOption = typer.Option(
    [],
    "--set",
    metavar="PATH=VALUE",
    help="Set a spec field, e.g. --set training.steps=200 (repeatable; VALUE is read as YAML).",
)


def json_text(document) -> str:
    """`document` (pydantic models, lists and dicts of them, paths, datetimes) as indented JSON."""
    from pydantic_core import to_json

    return to_json(document, indent=2).decode()


def emit(as_json: bool, document, text: str) -> None:
    """A command's result on stdout: `document` as JSON with --json, else `text` for people."""
    typer.echo(json_text(document) if as_json else text)


def api_client(url: Optional[str], token: Optional[str]) -> Client:
    """The API at --url / DISTILL_URL with --token / DISTILL_TOKEN. Without an address: the server on
    this machine where the server package is installed (its plugin says where, with the token `distill
    up` saved), else a usage error at once. Failed requests to a given address are retried for
    DISTILL_RETRY_SECONDS (300 by default: a server restarting while a CI step waits for its job); to
    this machine's server, not at all unless DISTILL_RETRY_SECONDS says so (it is there or not)."""
    from ..api import Client

    default = "300"
    if not url:
        local = local_server()
        if local is None:
            raise Failure("no API address: give --url or set DISTILL_URL", ExitCode.USAGE)
        url, saved = local
        token, default = token or saved, "0"
    try:
        retry_seconds = float(os.environ.get("DISTILL_RETRY_SECONDS", default))
    except ValueError:
        raise Failure("DISTILL_RETRY_SECONDS must be a number of seconds", ExitCode.USAGE) from None
    return Client(url, token, retry_seconds=retry_seconds)


def score_table(scores: dict[str, dict[str, float]]) -> str:
    metrics = sorted({k for s in scores.values() for k in s})
    rows = [["model", *metrics]] + [
        [label, *(f"{s[m]:.3f}" if m in s else "-" for m in metrics)] for label, s in scores.items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def webhook_text(url: Optional[str], secret: Optional[str]) -> str:
    """A default webhook as `distill webhook` and `distill users webhook` print it; the secret only when just made."""
    return f"webhook: {url or '(none)'}" + (f"\nsigning secret (shown only now): {secret}" if secret else "")
