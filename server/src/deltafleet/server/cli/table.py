"""Plain-text tables that read at 80 columns and when piped, and the console that prints them.

Invariants: a key column (``KEY_HEADERS``, or ``key=True``) is never cut or wrapped: its cells
appear whole on one line, even if the row then runs past the terminal. Other columns give way
when the table is wider than the terminal (``shutil.get_terminal_size``: ``$COLUMNS``, else 80
when not a terminal): an ``ellipsis`` column ends in ``…``, a ``fold`` column wraps at spaces
onto extra lines, a ``below`` column (a reason, a note) is printed under its row, indented and
wrapped. ``wide=True`` cuts nothing and prints ``below`` columns as columns. Colour tags of
rich's form (``[green]yes[/green]``) are dropped: output is the same on a terminal and in a
pipe. This module imports no rich.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

KEY_HEADERS = frozenset({
    "id", "device", "device type", "model", "version", "state", "name", "group", "variant",
    "runs", "asked",
    "field", "keyid", "action", "base", "target", "wave", "at (UTC)", "actor", "codec",
})
GAP = "  "
MIN_WIDTH = 12  # a column gives way only down to this (or its header): sizes and times stay
_TAG = re.compile(r"\[/?(?:bold|dim|italic|green|red|yellow|cyan|blue|magenta)"
                  r"(?: (?:bold|dim|italic|green|red|yellow|cyan|blue|magenta))*\]")


def plain(text: Any) -> str:
    """``text`` as a string without colour tags."""
    return _TAG.sub("", str(text))


def terminal_width() -> int:
    return max(20, shutil.get_terminal_size((80, 24)).columns)


class _Column:
    __slots__ = ("header", "key", "overflow")

    def __init__(self, header: str, key: bool | None, overflow: str | None) -> None:
        self.header = header
        self.key = header in KEY_HEADERS if key is None else key
        self.overflow = overflow if overflow in ("fold", "below") else "ellipsis"


class Table:
    """Columns and rows; ``lines(width)`` lays them out. Mirrors the bits of rich's Table API
    fleetctl used (headers as arguments, ``add_column``, ``add_row``, ``title``)."""

    def __init__(self, *headers: str, title: str | None = None, show_header: bool = True,
                 wide: bool = False, **_ignored: Any) -> None:
        self.columns = [_Column(h, None, None) for h in headers]
        self.rows: list[list[str]] = []
        self.title = title
        self.show_header = show_header
        self.wide = wide

    def add_column(self, header: str, *, key: bool | None = None, overflow: str | None = None,
                   **_ignored: Any) -> None:
        self.columns.append(_Column(header, key, overflow))

    def add_row(self, *cells: Any) -> None:
        self.rows.append([" ".join(plain("" if c is None else c).split()) for c in cells])

    def __bool__(self) -> bool:
        return True

    def _widths(self, width: int | None) -> list[int]:
        cols = self.columns
        natural = [max([len(c.header) if self.show_header else 0]
                       + [len(r[i]) for r in self.rows if i < len(r)]) for i, c in enumerate(cols)]
        if width is None or self.wide:
            return natural
        widths = list(natural)
        floor = [min(natural[i], max(MIN_WIDTH, len(c.header) if self.show_header else 0))
                 for i, c in enumerate(cols)]
        excess = sum(widths) + len(GAP) * (len(cols) - 1) - width
        while excess > 0:
            shrinkable = [i for i, c in enumerate(cols) if not c.key and widths[i] > floor[i]]
            if not shrinkable:
                break
            i = max(shrinkable, key=lambda j: widths[j])
            step = min(excess, widths[i] - floor[i],
                       max(1, widths[i] - max(widths[j] for j in range(len(cols)) if j != i)))
            widths[i] -= step
            excess -= step
        return widths

    def lines(self, width: int | None = None) -> list[str]:
        below = [] if self.wide or width is None else [
            i for i, c in enumerate(self.columns) if c.overflow == "below"]
        if below:
            inline = [i for i in range(len(self.columns)) if i not in below]
            table = Table(show_header=self.show_header, title=self.title)
            table.columns = [self.columns[i] for i in inline]
            table.rows = [[r[i] if i < len(r) else "" for i in inline] for r in self.rows]
            lines = table.lines(width)
            head = len(lines) - len(self.rows)
            out = lines[:head]
            for line, row in zip(lines[head:], self.rows, strict=True):
                out.append(line)
                for i in below:
                    note = row[i] if i < len(row) else ""
                    if note:
                        out += textwrap.wrap(note, width or 1 << 20, initial_indent="    ",
                                             subsequent_indent="    ", break_on_hyphens=False)
            return out
        widths = self._widths(width)
        out = []
        if self.title:
            out.append(self.title)
        rows = ([[c.header for c in self.columns]] if self.show_header else []) + self.rows
        for row in rows:
            cells: list[list[str]] = []
            for i, c in enumerate(self.columns):
                text = row[i] if i < len(row) else ""
                cells.append(_fit(text, widths[i], c))
            height = max((len(x) for x in cells), default=1)
            for k in range(height):
                parts = [(cell[k] if k < len(cell) else "").ljust(widths[i])
                         for i, cell in enumerate(cells)]
                out.append(GAP.join(parts).rstrip())
        return out


def _fit(text: str, width: int, column: _Column) -> list[str]:
    if column.key or len(text) <= width:
        return [text]
    if column.overflow == "fold":
        return textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [""]
    return [text[: max(1, width - 1)] + "…"]


class Console:
    """Prints tables and strings on stdout (or stderr), without colour tags."""

    def __init__(self, *, stderr: bool = False) -> None:
        self.stderr = stderr

    def print(self, *objects: Any, **_ignored: Any) -> None:
        stream = sys.stderr if self.stderr else sys.stdout
        for obj in objects or ("",):
            if isinstance(obj, Table):
                text = "\n".join(obj.lines(terminal_width()))
            elif isinstance(obj, list | tuple):
                text = "\n".join(plain(x) for x in obj)
            else:
                text = plain(obj)
            print(text, file=stream)

    @contextlib.contextmanager
    def status(self, message: str) -> Iterator[Any]:
        """A spinner with ``message`` while the block runs, on a terminal only; the object
        yielded has ``update(message)``."""
        stream = sys.stderr if self.stderr else sys.stdout
        if not stream.isatty():
            yield _NoStatus()
            return
        from rich.console import Console as RichConsole  # noqa: PLC0415

        with RichConsole(stderr=self.stderr, highlight=False).status(message) as st:
            yield st


class _NoStatus:
    def update(self, *_args: Any, **_kwargs: Any) -> None:
        return None


console = Console()
err_console = Console(stderr=True)

__all__ = ["KEY_HEADERS", "Console", "Table", "console", "err_console", "plain",
           "terminal_width"]
