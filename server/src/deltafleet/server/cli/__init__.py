"""fleetctl: the operator's command line.

Exit codes: 0 success; 1 a deltafleet error that is not the operator's input (database
unreachable, key file unreadable, ...); 2 invalid usage or input (bad arguments, unknown name,
duplicate, invalid model file, database not initialised). Errors print one line,
``error: <message>``, on stderr, never a traceback.

Adding a command module: define ``app = typer.Typer(...)`` in ``cli/<noun>.py`` and add it to
``_SUB_APPS`` below (or register a single command with ``app.command(...)``).
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from deltafleet.shared import DeltafleetError
from deltafleet.shared import one_line as shared_one_line

from ..errors import UsageError
from . import audit, db, delta, device, group, init, model, rollout, serve
from . import broker as broker_cli
from . import keys as keys_cli
from . import store as store_cli

EXIT_ERROR = 1
EXIT_USAGE = 2


def one_line(e: BaseException) -> str:
    return shared_one_line(e, limit=None)


def exit_code_for(e: DeltafleetError) -> int:
    return EXIT_USAGE if isinstance(e, UsageError) else EXIT_ERROR


class _FleetGroup(TyperGroup):
    """Turns a DeltafleetError from any (sub)command into one stderr line and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except DeltafleetError as e:
            typer.echo(f"error: {one_line(e)}", err=True)
            raise typer.Exit(exit_code_for(e)) from None


app = typer.Typer(
    name="fleetctl",
    cls=_FleetGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="deltafleet: register models, manage devices and groups, roll out updates.",
)

_SUB_APPS: list[tuple[str, typer.Typer]] = [
    ("db", db.app),
    ("model", model.app),
    ("device", device.app),
    ("group", group.app),
    ("rollout", rollout.app),
    ("delta", delta.app),
    ("keys", keys_cli.app),
    ("broker", broker_cli.app),
    ("store", store_cli.app),
]
for _name, _sub in _SUB_APPS:
    app.add_typer(_sub, name=_name)
app.command("init")(init.init)
app.command("audit")(audit.audit)
app.command("server")(serve.server)


def main() -> None:
    """Console entry point (``fleetctl``)."""
    try:
        app()
    except DeltafleetError as e:  # raised outside a command (e.g. while building the app)
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(exit_code_for(e))


__all__ = ["EXIT_ERROR", "EXIT_USAGE", "app", "main"]
