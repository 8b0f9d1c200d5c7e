"""fleetctl's plain tables: key columns are never cut, the rest gives way to fit the width,
``wide`` cuts nothing; and ``import deltafleet.server.cli`` stays light (it is what every
fleetctl start pays)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deltafleet.server.cli.table import Table, plain

DEVICE = "jetson-orin-nano-berlin-0042"
SHA = "ab" * 32


def _table(**kw: object) -> Table:
    t = Table("device", "state", "model", "version", **kw)  # type: ignore[arg-type]
    t.add_column("reason")
    t.add_column("sha256", overflow="fold")
    t.add_row(DEVICE, "rolled_back", "detector", "v5",
              "trial: error rate 12.5% over the 1% allowed on 400 requests", SHA)
    return t


@pytest.mark.parametrize("width", [80, 60, 40])
def test_key_columns_appear_whole_on_one_line_at_any_width(width: int) -> None:
    lines = _table().lines(width)
    row = [line for line in lines if DEVICE in line]
    assert len(row) == 1
    for word in ("rolled_back", "detector", "v5"):
        assert word in row[0]


def test_other_columns_give_way_to_fit_the_width() -> None:
    lines = _table().lines(100)
    assert max(len(line) for line in lines) <= 100
    assert "…" in lines[1]  # the reason is cut (the ellipsis column)
    folded = "".join(line.split()[-1] for line in lines[1:])
    assert SHA in folded  # the fold column wraps onto more lines, nothing lost


def test_wide_cuts_nothing() -> None:
    lines = _table(wide=True).lines(80)
    assert len(lines) == 2 and SHA in lines[1] and "400 requests" in lines[1]


def test_colour_tags_are_dropped_but_brackets_kept() -> None:
    assert plain("[green]yes[/green] [1, 3, 224]") == "yes [1, 3, 224]"


def test_importing_the_cli_loads_no_heavy_module() -> None:
    code = ("import sys, json, deltafleet.server.cli; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('onnx', 'alembic', 'numpy', 'sqlalchemy', 'rich', 'zstandard', 'paho'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert json.loads(out.stdout) == []
