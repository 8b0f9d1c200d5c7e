"""fleetctl: the operator's command line.

Exit codes: 0 success; 1 a deltafleet error that is not the operator's input (database
unreachable, key file unreadable, ...); 2 invalid usage or input (bad arguments, unknown name,
duplicate, invalid model file, database not initialised). Errors print one line,
``error: <message>``, on stderr, never a traceback; a usage error's line ends with the
``--help`` to read.

Start-up is kept short: this module imports only typer. Each command module is imported when
its command runs (or its own ``--help`` is asked); ``fleetctl --help`` lists the commands from
``_COMMANDS`` below without importing any of them, so sqlalchemy, alembic, onnx, numpy and the
codecs load only in the commands that need them.

Through the management API: with ``FLEET_API_URL`` (and a token) set, the commands that have
an endpoint fetch their data from the API and render it with the same code (``remote``); those
in ``LOCAL_ONLY`` and the few subcommands that call ``remote.local_only`` refuse in one line
(exit 2) instead of touching a local store.

Adding a command module: define ``app = typer.Typer(..., help=...)`` in ``cli/<noun>.py`` and
add ``(name, module, None, help)`` to ``_COMMANDS`` (or ``(name, module, function, help)`` for a
single top-level command). The help given here is what ``fleetctl --help`` lists.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Annotated, Any, NoReturn

import typer
from typer import _click as click
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

from deltafleet.shared import DeltafleetError
from deltafleet.shared import one_line as shared_one_line

EXIT_ERROR = 1
EXIT_USAGE = 2

# name, module under cli/, function (None: the module's ``app``), help for ``fleetctl --help``
_COMMANDS: list[tuple[str, str, str | None, str]] = [
    ("init", "init", "init",
     "Create FLEET_HOME, run the database migrations and create the Ed25519 signing key."),
    ("audit", "audit", "audit",
     "Show the audit log (oldest first): every change made through fleetctl."),
    ("server", "serve", "server", "Run the server in the foreground until SIGTERM/SIGINT."),
    ("db", "db", None, "Database schema migrations."),
    ("model", "model", None, "Model versions and their variants."),
    ("device", "device", None, "Devices in the fleet."),
    ("profile", "profile", None, "Device types, their benchmark baselines, bench requests."),
    ("group", "group", None, "Device groups (label and profile selectors)."),
    ("rollout", "rollout", None, "Roll model versions out to device groups."),
    ("delta", "delta", None, "Build and inspect model deltas."),
    ("keys", "keys", None, "Root of trust and manifest signing keys."),
    ("broker", "broker", None, "The MQTT broker's configuration."),
    ("store", "store", None, "The server's blob store."),
    ("token", "token", None, "Management API tokens and their roles."),
]
_BY_NAME = {c[0]: c for c in _COMMANDS}
# commands without an API endpoint: refused while FLEET_API_URL is set (``remote``)
LOCAL_ONLY = frozenset({"init", "server", "db", "broker", "store", "profile"})


def one_line(e: BaseException) -> str:
    return shared_one_line(e, limit=None)


def exit_code_for(e: DeltafleetError) -> int:
    from ..errors import UsageError as InputError  # noqa: PLC0415

    return EXIT_USAGE if isinstance(e, InputError) else EXIT_ERROR


def _load(name: str) -> click.Command:
    _, module, function, _help = _BY_NAME[name]
    mod = importlib.import_module(f"{__name__}.{module}")
    command: click.Command
    if function is None:
        command = typer.main.get_group(mod.app)
    else:
        single = typer.Typer(add_completion=False)
        single.command(name)(getattr(mod, function))
        command = typer.main.get_command(single)
    command.name = name
    if name in LOCAL_ONLY:
        _refuse_remotely(command, name)
    return command


def _refuse_remotely(command: click.Command, name: str) -> None:
    """Make ``command`` refuse to run while FLEET_API_URL is set (its --help still works)."""
    original = command.callback

    def callback(*args: Any, **kwargs: Any) -> Any:
        from .remote import local_only  # noqa: PLC0415

        local_only(name)
        return original(*args, **kwargs) if original is not None else None

    command.callback = callback


def usage_error_line(e: UsageError) -> str:
    """A usage error as one line: what is wrong, then where the help is."""
    ctx = e.ctx
    path = ctx.command_path if ctx is not None else "fleetctl"
    message = " ".join(e.format_message().split()).rstrip(".")
    return f"error: {message}; see '{path} --help'"


def _unstorable_argument(args: Sequence[str]) -> str | None:
    """What is wrong with the first argument no store or file name can hold: bytes that are
    not UTF-8 (Python hands them over as lone surrogates) or a NUL; None when all are text."""
    for n, arg in enumerate(args, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return f"argument {n} is not valid UTF-8 text"
        if "\x00" in arg:
            return f"argument {n} holds a NUL character"
    return None


def _fail(line: str, code: int) -> NoReturn:
    click.echo(line, err=True)
    sys.exit(code)


class _FleetGroup(TyperGroup):
    """fleetctl's root: loads command modules on demand, prints every error as one line.

    A DeltafleetError from any (sub)command becomes ``error: <message>`` and its exit code; a
    usage error (unknown option, missing argument, bad value) becomes one line and exit 2.
    """

    def list_commands(self, ctx: Any) -> list[str]:
        return [c[0] for c in _COMMANDS]

    def get_command(self, ctx: Any, cmd_name: str) -> click.Command | None:
        if cmd_name in _BY_NAME:
            return _load(cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = [(name, help_) for name, _, _, help_ in _COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except DeltafleetError as e:
            typer.echo(f"error: {one_line(e)}", err=True)
            raise typer.Exit(exit_code_for(e)) from None

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,  # type: ignore[override]
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        bad = _unstorable_argument(sys.argv[1:] if args is None else args)
        if bad is not None:
            _fail(f"error: {bad}; see 'fleetctl --help'", EXIT_USAGE)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as e:  # a bare group: its help
            click.echo(e.ctx.get_help() if e.ctx is not None else e.format_message())
            sys.exit(0)
        except UsageError as e:
            _fail(usage_error_line(e), EXIT_USAGE)
        except ClickException as e:
            _fail(f"error: {' '.join(e.format_message().split())}", e.exit_code)
        except typer.Abort:
            _fail("error: aborted", EXIT_ERROR)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


app = typer.Typer(
    name="fleetctl",
    cls=_FleetGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
    help="deltafleet: register models, manage devices and groups, roll out updates.",
)


@app.callback()
def _root(
    api_url: Annotated[str | None, typer.Option(
        "--api-url", metavar="URL", help="Go through the management API at URL "
        "(default: $FLEET_API_URL; unset: the local store).")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", help="API token (default: $FLEET_API_TOKEN). Visible to `ps`: prefer "
        "--token-file.")] = None,
    token_file: Annotated[str | None, typer.Option(
        "--token-file", metavar="PATH", help="File holding the API token "
        "(default: $FLEET_API_TOKEN_FILE).")] = None,
) -> None:
    """deltafleet: register models, manage devices and groups, roll out updates."""
    import os  # noqa: PLC0415

    for env, value in (("FLEET_API_URL", api_url), ("FLEET_API_TOKEN", token),
                       ("FLEET_API_TOKEN_FILE", token_file)):
        if value is not None:
            os.environ[env] = value


def main() -> None:
    """Console entry point (``fleetctl``)."""
    try:
        app()
    except DeltafleetError as e:  # raised outside a command (e.g. while building the app)
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(exit_code_for(e))


__all__ = ["EXIT_ERROR", "EXIT_USAGE", "app", "main", "usage_error_line"]
