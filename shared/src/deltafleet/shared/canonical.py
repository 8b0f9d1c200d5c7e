"""Canonical JSON: the exact bytes that are signed and verified.

Keys sorted, no insignificant whitespace, UTF-8, no NaN/Infinity. Floats are refused so that
two implementations can never disagree on the bytes of a number.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import WireError


def _check(value: Any, path: str = "$") -> None:
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return
    if isinstance(value, float):
        raise WireError(f"float at {path} is not allowed in canonical JSON")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise WireError(f"non-string key at {path}")
            _check(v, f"{path}.{k}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check(v, f"{path}[{i}]")
        return
    raise WireError(f"value of type {type(value).__name__} at {path} is not JSON")


def canonical_json(value: Any) -> bytes:
    """Return the canonical encoding of ``value`` (dicts, lists, str, int, bool, None)."""
    _check(value)
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def parse_json_object(data: bytes, *, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """Parse ``data`` as one JSON object or raise WireError; never anything else."""
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the {max_bytes}-byte cap")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise WireError("expected a JSON object")
    return value
