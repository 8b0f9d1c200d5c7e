"""What the agent tells about itself, apart from update reports.

- ``describe_models``: the models it serves (version, format, previous, trial, IO), for the
  local API's ``/v1/models`` and the ``/metrics`` page;
- ``variant_of``: the variant of a (model, version) it has installed, for telemetry labels;
- ``ConnectionFile``: ``connection.json`` in the state directory (the broker connection as
  ``MqttClient.state()`` has it, the agent's pid, the API address) for ``fleet-agent status``,
  written on a change only;
- ``TelemetrySender``: a telemetry summary every interval through the outbox, at most one
  outbox entry at a time (counters are cumulative: only the latest matters), and the
  recorder told when the server acknowledges one (``telemetry.TelemetryRecorder.acked``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from deltafleet.shared import atomic_write_json, encode

from .errors import is_no_space
from .outbox import Outbox
from .serving import Serving
from .store import LocalStore
from .telemetry import TelemetryRecorder

__all__ = ["ConnectionFile", "TelemetrySender", "describe_models", "variant_of"]

log = logging.getLogger(__name__)


def _io(specs: Any) -> list[dict[str, Any]]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in specs]


def describe_models(store: LocalStore, serving: Serving,
                    in_trial: Callable[[str], bool]) -> list[dict[str, Any]]:
    out = []
    for name in sorted({i.model for i in store.all_current()} | set(serving.slots)):
        inst, prev = store.current(name), store.previous(name)
        slot = serving.slots.get(name)
        session = slot.session if slot else None
        model = session.model if session else (slot.fallback if slot else None)
        out.append({
            "name": name,
            "version": session.version if session else None,
            "sha256": session.sha256 if session else None,
            "format": inst.format if inst else None,
            "previous": prev.version if prev else None,
            "loaded": session is not None,
            "fallback": slot.fallback_name if slot else None,
            "in_trial": in_trial(name),
            "swaps": slot.swaps if slot else 0,
            "inputs": _io(model.inputs if model else ()),
            "outputs": _io(model.outputs if model else ()),
        })
    return out


def variant_of(store: LocalStore, model: str, version: str) -> str:
    """The variant of ``model`` at ``version`` installed here (current or previous), or ""."""
    for inst in (store.current(model), store.previous(model)):
        if inst is not None and inst.version == version:
            return inst.as_state().variant
    return ""


class ConnectionFile:
    def __init__(self, state_dir: Path | str) -> None:
        self.path = Path(state_dir) / "connection.json"
        self._seen: tuple[Any, ...] | None = None

    def write(self, state: Any, *, api: str | None, stopped: bool = False) -> None:
        """Write the connection state when it changed (up/down, its cause, the API, a stop)."""
        key = (state.connected, state.since, state.failure.cause if state.failure else None,
               state.final, stopped, api)
        if key == self._seen:
            return
        self._seen = key
        doc = {**state.to_dict(), "pid": None if stopped else os.getpid(), "api": api,
               "written_at": time.time()}
        try:
            atomic_write_json(self.path, doc)
        except OSError as e:
            log.debug("could not write connection.json: %s", e)


class TelemetrySender:
    def __init__(self, recorder: TelemetryRecorder, outbox: Outbox, topic: str,
                 interval_s: float, variant: Callable[[str, str], str]) -> None:
        self.recorder = recorder
        self.outbox = outbox
        self.topic = topic
        self.interval_s = interval_s
        self.variant = variant
        self.next_at = time.monotonic() + interval_s
        self.pending_id: str | None = None  # the summary in the outbox, not acked yet

    def tick(self, now: float) -> None:
        if self.interval_s and now >= self.next_at:
            self.next_at = now + self.interval_s
            self.send()

    def send(self) -> None:
        """Queue the next summary; the one before it, if not acked yet, is dropped."""
        summary = self.recorder.summary(self.variant)
        if self.pending_id is not None:
            self.outbox.discard([self.pending_id])
        try:
            self.outbox.put(summary.telemetry_id, self.topic, encode(summary))
        except OSError as e:
            if not is_no_space(e):
                raise
            log.warning("disk full: telemetry summary %d skipped", summary.seq)
            return
        self.pending_id = summary.telemetry_id

    def acked(self, ids: Collection[str]) -> None:
        if self.pending_id is not None and self.pending_id in ids:
            self.recorder.acked(int(self.pending_id.rsplit("-", 1)[1]))
            self.pending_id = None
