"""``fleetctl`` in-process (typer's CliRunner) and the check every refusal must pass."""

from __future__ import annotations

from typer.testing import CliRunner, Result

from deltafleet.server.cli import app

__all__ = ["assert_one_line_error", "fleetctl"]


def fleetctl(*args: str, catch_exceptions: bool = False) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=catch_exceptions)


def assert_one_line_error(result: Result, exit_code: int = 2) -> None:
    """Refused with ``exit_code`` and one ``error: ...`` line on stderr, never a traceback."""
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
