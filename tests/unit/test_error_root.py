"""Every error deltafleet raises on purpose is under ``DeltafleetError`` (STYLE.md 3).

The source of the three packages is walked with ``ast``; a ``raise`` of a builtin exception
fails this test unless the allow-list below names it and says why it stays builtin.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

from deltafleet.agent import errors as agent_errors
from deltafleet.codecs import errors as codec_errors
from deltafleet.server import errors as server_errors
from deltafleet.shared import DeltafleetError
from deltafleet.shared import errors as shared_errors

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "shared" / "src", ROOT / "agent" / "src", ROOT / "server" / "src"]
BUILTIN_EXCEPTIONS = frozenset(
    name for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException))

# "file (from the repository root) function() Builtin", each with why it stays builtin
ALLOWED = {
    # module and attribute lookup protocol: ``getattr``/``hasattr`` expect AttributeError
    "shared/src/deltafleet/shared/__init__.py __getattr__() AttributeError",
    "shared/src/deltafleet/codecs/__init__.py _home() AttributeError",
    "shared/src/deltafleet/codecs/__init__.py __getattr__() AttributeError",
    "server/src/deltafleet/server/rollout/__init__.py __getattr__() AttributeError",
    "server/src/deltafleet/server/reads.py __getattr__() AttributeError",
    # a loop that always returns or re-raises: reaching the end is a bug
    "agent/src/deltafleet/agent/client.py _request() AssertionError",
    # a caller's bug, never bad input: a traceback, not a one-line error that an
    # ``except DeltafleetError`` handler would print (or log and retry) and so hide
    "shared/src/deltafleet/shared/durable.py staged_file() TypeError",  # dest fn, no temp_dir
    "shared/src/deltafleet/shared/trust.py sign_payload() ValueError",  # callers check keys
    "agent/src/deltafleet/agent/latency.py sample_pairs() ValueError",  # probe_feeds: never []
    "agent/src/deltafleet/agent/trial.py median() ValueError",  # as statistics.median
    "server/src/deltafleet/server/guard.py invalid() ValueError",  # kinds are code literals
    "server/src/deltafleet/server/store/models.py count_target_moves() RuntimeError",
}


def _raises(node: ast.AST, function: str) -> list[tuple[str, str, int]]:
    """(enclosing function, builtin, line) of every ``raise <builtin>`` under ``node``."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        function = node.name
    found = []
    if isinstance(node, ast.Raise) and node.exc is not None:
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(exc, ast.Name) and exc.id in BUILTIN_EXCEPTIONS:
            found.append((function, exc.id, node.lineno))
    for child in ast.iter_child_nodes(node):
        found += _raises(child, function)
    return found


def builtin_raises() -> list[tuple[str, str, str, int]]:
    """(file, enclosing function, builtin, line) of every ``raise <builtin>`` in the sources."""
    found = []
    for src in SOURCES:
        for path in sorted(src.rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            tree = ast.parse(path.read_text(), filename=rel)
            found += [(rel, *hit) for hit in _raises(tree, "<module>")]
    return found


def test_no_builtin_exception_is_raised_outside_the_allow_list() -> None:
    raised = builtin_raises()
    stray = [f"{rel}:{line} raise {name} in {fn}()" for rel, fn, name, line in raised
             if f"{rel} {fn}() {name}" not in ALLOWED]
    assert not stray, ("raise a DeltafleetError subclass (subclassing the builtin too where "
                       "callers catch it), or allow-list it with a reason:\n" + "\n".join(stray))


def test_the_allow_list_names_only_raises_that_exist() -> None:
    present = {f"{rel} {fn}() {name}" for rel, fn, name, _ in builtin_raises()}
    assert present >= ALLOWED, f"stale allow-list entries: {sorted(ALLOWED - present)}"


@pytest.mark.parametrize("module", [shared_errors, codec_errors, agent_errors, server_errors])
def test_every_error_class_is_under_the_root(module) -> None:
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, BaseException)
               and v.__module__ == module.__name__]
    assert classes
    assert all(issubclass(c, DeltafleetError) for c in classes), classes
