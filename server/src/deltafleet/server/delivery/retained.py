"""The durable list of artifacts whose chunks this server retained on the broker.

One small JSON file per replica (``{artifact sha256: chunks}``), rewritten atomically
(``deltafleet.shared.durable``) whenever the list changes, so a server restarted after an
artifact left every rollout still clears its retained chunks. A file that cannot be read or
does not hold that shape counts as empty (logged): retained chunks it named stay on the broker
until a rollout serves their artifact again and it leaves once more.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from deltafleet.shared import atomic_write_json

__all__ = ["RetainedList"]

log = logging.getLogger(__name__)

_SHA = re.compile(r"[0-9a-f]{64}")


class RetainedList:
    """``load`` once at start, ``save`` after every change (a no-op when nothing changed)."""

    __slots__ = ("_saved", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved: dict[str, int] | None = None

    def load(self) -> dict[str, int]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError) as e:
            log.error("cannot read the retained chunk list %s (%s): treated as empty",
                      self.path, e)
            raw = {}
        if not isinstance(raw, dict):
            log.error("the retained chunk list %s is not an object: treated as empty", self.path)
            raw = {}
        out = {sha: n for sha, n in raw.items()
               if isinstance(sha, str) and _SHA.fullmatch(sha) and isinstance(n, int)
               and not isinstance(n, bool) and n > 0}
        self._saved = dict(out)
        return out

    def save(self, retained: dict[str, int]) -> None:
        if retained == self._saved:
            return
        atomic_write_json(self.path, retained, mode=0o600)
        self._saved = dict(retained)
