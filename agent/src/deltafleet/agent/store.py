"""The device's model store and its state file.

Layout under ``state_dir``::

    state.json                  current and previous model per name, last serial (per model
                                and device-wide), failed ids, refused artifacts and the
                                decodes started per artifact (see ``refuse_artifact``)
    models/<sha256>.<onnx|tflite|ptl>   content-addressed, verified model files (current + previous)
    downloads/<artifact sha256>/<index>   verified chunks of an artifact being fetched

``state.json`` is only ever replaced atomically (temp + fsync + rename + fsync dir), so after a
power loss the device runs the old or the new verified model, never a partial file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deltafleet.shared import ModelState, atomic_write_bytes, atomic_write_json

EXTENSIONS = {"onnx": "onnx", "tflite": "tflite", "ptl": "ptl"}
MAX_REFUSED = 32


@dataclass(frozen=True, slots=True)
class InstalledModel:
    model: str
    version: str
    sha256: str
    variant: str
    format: str
    serial: int = 0
    manifest_id: str | None = None

    def as_state(self) -> ModelState:
        return ModelState(self.model, self.version, self.sha256, self.variant, self.format)


class LocalStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir)
        self.models_dir = self.root / "models"
        self.downloads_dir = self.root / "downloads"
        self.state_file = self.root / "state.json"
        for d in (self.root, self.models_dir, self.downloads_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._state = self._read()

    def _read(self) -> dict[str, Any]:
        if not self.state_file.exists():
            return {"current": {}, "previous": {}, "failed": {}, "serials": {}, "refused": {},
                    "decodes": {}}
        data = json.loads(self.state_file.read_text())
        data.setdefault("failed", {})
        data.setdefault("refused", {})
        data.setdefault("decodes", {})
        if "serials" not in data:  # state written before per-model serials
            data["serials"] = {m: int(e.get("serial", 0)) for m, e in data["current"].items()}
        return data

    def _write(self) -> None:
        """Persist the state; if that fails (e.g. ENOSPC) the state in memory is put back to
        what is on disk, so memory never claims a change the disk does not hold."""
        try:
            atomic_write_json(self.state_file, self._state)
        except BaseException:
            self._state = self._read()
            raise

    # -- queries ---------------------------------------------------------------------------
    def current(self, model: str) -> InstalledModel | None:
        entry = self._state["current"].get(model)
        return InstalledModel(**entry) if entry else None

    def previous(self, model: str) -> InstalledModel | None:
        entry = self._state["previous"].get(model)
        return InstalledModel(**entry) if entry else None

    def all_current(self) -> list[InstalledModel]:
        return [InstalledModel(**e) for e in self._state["current"].values()]

    def last_serial_of(self, model: str) -> int:
        """The highest serial accepted for ``model`` (a new manifest must exceed it)."""
        return int(self._state["serials"].get(model, 0))

    def failed_manifest(self, model: str) -> str | None:
        return self._state["failed"].get(model)

    def model_path(self, sha256: str, fmt: str) -> Path:
        return self.models_dir / f"{sha256}.{EXTENSIONS[fmt]}"

    # -- mutations (each one durable) ------------------------------------------------------
    def stage(self, sha256: str, fmt: str, data: bytes | bytearray) -> Path:
        """Write verified model bytes to their content address; idempotent."""
        path = self.model_path(sha256, fmt)
        if not path.exists():
            atomic_write_bytes(path, data)
        return path

    def activate(self, new: InstalledModel) -> None:
        """Make ``new`` current; the old current becomes previous (kept on disk for rollback)."""
        old = self._state["current"].get(new.model)
        if old and old["sha256"] != new.sha256:
            self._state["previous"][new.model] = old
        self._state["current"][new.model] = asdict(new)
        self._bump(new.model, new.serial)
        self._state["failed"].pop(new.model, None)
        self._write()
        self._collect_garbage()

    def rollback(self, model: str, failed_manifest_id: str | None = None) -> InstalledModel | None:
        """Make the previous model current again and forget the one that failed its trial."""
        prev = self._state["previous"].pop(model, None)
        if prev is None:  # a first install failed: nothing runs but the fallback
            self._state["current"].pop(model, None)
        else:
            self._state["current"][model] = prev
        if failed_manifest_id is not None:
            self._state["failed"][model] = failed_manifest_id
        self._write()
        self._collect_garbage()
        return InstalledModel(**prev) if prev else None

    def clean_temp_files(self) -> None:
        """Drop half-written temp files a crash left behind (never a complete model)."""
        for d in (self.models_dir, self.root, *self.downloads_dir.glob("*/")):
            for f in d.glob(".*.tmp"):
                f.unlink(missing_ok=True)

    def _bump(self, model: str, serial: int) -> None:
        self._state["serials"][model] = max(self.last_serial_of(model), serial)

    def note_serial(self, model: str, serial: int) -> None:
        """Record that a manifest with ``serial`` was accepted for ``model`` (durable)."""
        if serial > self.last_serial_of(model):
            self._bump(model, serial)
            self._write()

    def mark_failed(self, model: str, manifest_id: str, serial: int) -> None:
        self._state["failed"][model] = manifest_id
        self._bump(model, serial)
        self._write()

    # -- artifacts whose decode was refused: final across restarts ------------------------
    def refuse_artifact(self, artifact_sha256: str, reason: str, *, limits: dict[str, float]
                        | None = None) -> None:
        """Record (durably) that this artifact's decode was refused, so that no restart and no
        new manifest shipping the same artifact decodes it again. ``limits`` (the memory cap and
        time limit it hit) make the refusal final only while the device's limits stay within
        them; without, it is final. The last ``MAX_REFUSED`` refusals are kept."""
        refused = self._state["refused"]
        refused.pop(artifact_sha256, None)
        refused[artifact_sha256] = {"reason": reason[:300], "limits": limits}
        while len(refused) > MAX_REFUSED:
            refused.pop(next(iter(refused)))
        self._state["decodes"].pop(artifact_sha256, None)
        self._write()

    def artifact_refusal(self, artifact_sha256: str, limits: dict[str, float]) -> str | None:
        """Why this artifact was refused before, if that still holds under ``limits``."""
        rec = self._state["refused"].get(artifact_sha256)
        if rec is None:
            return None
        hit = rec.get("limits")
        if hit and any(float(limits.get(k, 0)) > float(v) for k, v in hit.items()):
            return None  # the device was given more memory or time since: try again
        return str(rec.get("reason", "refused"))

    def note_decode_start(self, artifact_sha256: str) -> int:
        """Count (durably, before it starts) one more decode of this artifact; returns the
        count. A decode that ends, either way, clears it (``decode_done``), so a count above
        one means the agent died while decoding."""
        decodes = self._state["decodes"]
        decodes[artifact_sha256] = int(decodes.get(artifact_sha256, 0)) + 1
        self._write()
        return int(decodes[artifact_sha256])

    def decode_done(self, artifact_sha256: str) -> None:
        if self._state["decodes"].pop(artifact_sha256, None) is not None:
            self._write()

    def download_dir(self, artifact_sha256: str) -> Path:
        return self.downloads_dir / artifact_sha256

    def drop_download(self, artifact_sha256: str) -> None:
        shutil.rmtree(self.download_dir(artifact_sha256), ignore_errors=True)

    def drop_downloads_except(self, keep: set[str]) -> list[str]:
        """Remove the chunks of every artifact not in ``keep`` (abandoned or superseded
        downloads); returns the artifact shas removed."""
        dropped = []
        for d in self.downloads_dir.iterdir():
            if d.name not in keep:
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    d.unlink(missing_ok=True)
                dropped.append(d.name)
        return dropped

    def _collect_garbage(self) -> None:
        keep = {self.model_path(e["sha256"], e["format"]).name
                for part in ("current", "previous") for e in self._state[part].values()}
        for f in self.models_dir.iterdir():
            if f.name not in keep and not f.name.startswith("."):
                f.unlink(missing_ok=True)
