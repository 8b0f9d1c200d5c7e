"""The update journal: one durable record per model with an update in progress.

``journal/<model>.json``::

    {"step": ..., "manifest": <signed envelope, base64>, "manifest_id": ..., "target_sha256": ...,
     "previous_sha256": <sha that ran before, or null>, "updated_at": unix s,
     "trial": {"ends_at": unix s, "restarts": int} | absent,
     "verdict": {"reason": str, "figures": {...}} | absent}

Steps and legal transitions (``machine.JOURNAL_NEXT``; each write is temp + fsync + rename +
fsync dir)::

    downloading -> patching -> staged -> activating -> trial -> committing -> (record removed)
                                                          \\-> rolling_back -> (record removed)
    any step before activating -> (record removed) on failure; the running model never changed

The journal is written *before* the step's effect, so after a crash ``reconcile`` (pure) tells
the agent what to do with what it finds on disk: resume the download / re-apply from verified
bytes, (re)start the trial on the new model, finish a commit, or finish a rollback.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltafleet.shared import atomic_write_json
from deltafleet.shared.messages import Manifest

from .errors import IllegalJournalStep, JournalRecordMissing, UpdateRejected
from .machine import JOURNAL_NEXT, STEPS, JournalEntry, Recovery, raw_manifest, reconcile

__all__ = ["STEPS", "Journal", "Recovery", "found_entries", "raw_manifest", "reconcile"]

_NEXT = JOURNAL_NEXT


class Journal:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def _path(self, model: str) -> Path:
        return self.dir / f"{model}.json"

    def get(self, model: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(model).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # cannot happen with atomic writes; treat as no record

    def all(self) -> dict[str, dict[str, Any]]:
        out = {}
        for p in sorted(self.dir.glob("*.json")):
            rec = self.get(p.stem)
            if rec is not None:
                out[p.stem] = rec
        return out

    def begin(self, model: str, step: str, raw_manifest: bytes, manifest_id: str,
              target_sha256: str, previous_sha256: str | None) -> dict[str, Any]:
        rec = {"step": step, "manifest": base64.b64encode(raw_manifest).decode(),
               "manifest_id": manifest_id, "target_sha256": target_sha256,
               "previous_sha256": previous_sha256, "updated_at": int(time.time())}
        atomic_write_json(self._path(model), rec)
        return rec

    def advance(self, model: str, step: str, **extra: Any) -> dict[str, Any]:
        rec = self.get(model)
        if rec is None:
            raise JournalRecordMissing(f"no journal record for {model}")
        if step not in _NEXT.get(rec["step"], set()):
            raise IllegalJournalStep(f"illegal journal transition {rec['step']} -> {step}")
        rec.update(extra)
        rec["step"] = step
        rec["updated_at"] = int(time.time())
        atomic_write_json(self._path(model), rec)
        return rec

    def clear(self, model: str) -> None:
        self._path(model).unlink(missing_ok=True)


def found_entries(journal: Journal, store: Any,
                  verify: Callable[[bytes], Manifest]) -> tuple[JournalEntry, ...]:
    """The journal records found at start, each with its manifest verified again by
    ``verify`` (our own journal of a manifest accepted before: expiry and serial are done) and
    whether its target is on disk."""
    entries = []
    for model, rec in journal.all().items():
        current = store.current(model)
        cur_sha = current.sha256 if current else None
        try:
            m = verify(raw_manifest(rec))
        except UpdateRejected as e:
            entries.append(JournalEntry(model, rec, None, cur_sha, False, str(e)))
            continue
        on_disk = store.model_path(m.target_sha256, m.format).is_file()
        entries.append(JournalEntry(model, rec, m, cur_sha, on_disk))
    return tuple(entries)
