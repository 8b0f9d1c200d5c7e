"""The events and effects of the update machine (``machine``), and what the driver tells it
about the device: frozen dataclasses, no behaviour.

Events are what the device saw or what an effect did; effects are what the driver must do
next. ``machine.UpdateMachine.handle`` takes one event and returns a list of effects; the
driver (``executor`` for the agent, ``tests/harness/fleetsim.py`` for the simulator) carries
them out and feeds each outcome back as the next event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deltafleet.shared.messages import Manifest

from .trial import Verdict

__all__ = [
    "Adopt",
    "Apply",
    "ApplyFailed",
    "ChunkAccepted",
    "ChunkBad",
    "CleanDownloads",
    "Connected",
    "CrashPoint",
    "Device",
    "DownloadComplete",
    "DownloadOpened",
    "DropDownload",
    "EndTrial",
    "ForgetDownload",
    "Inspect",
    "Inspected",
    "JournalBegin",
    "JournalClear",
    "JournalEntry",
    "JournalStep",
    "Judge",
    "Log",
    "MachineConfig",
    "ManifestRejected",
    "ManifestVerified",
    "MarkFailed",
    "NoteSerial",
    "OpenDownload",
    "OutOfSpace",
    "Reconsider",
    "Reconsidered",
    "Report",
    "ReportRejected",
    "RequestChunks",
    "Restarted",
    "Resumed",
    "RollBack",
    "RollStateBack",
    "RolledBack",
    "Running",
    "SerialNoted",
    "Staged",
    "StartTrial",
    "Subscribe",
    "SwapDone",
    "SwapIn",
    "Tick",
    "TrialNotLoaded",
    "TrialReady",
    "TrialVerdict",
    "TrustUpdated",
    "Unsubscribe",
    "Withdrawn",
]


# -- what the driver tells the machine about the device ----------------------------------
@dataclass(frozen=True, slots=True)
class Running:
    sha256: str
    manifest_id: str | None


@dataclass(frozen=True, slots=True)
class Device:
    """What runs now (state.json) and the manifest last marked failed, for one model."""
    running: Running | None = None
    failed_id: str | None = None


@dataclass(frozen=True, slots=True)
class MachineConfig:
    download_timeout_s: float = 600.0
    # no chunk for this long: ask again; each further ask without a chunk waits twice as long,
    # up to 8x (3, 6, 12, 24 s), so a fleet stalled on a slow broker does not flood the server
    chunk_retry_s: float = 3.0
    # no chunk for this long while downloading: subscribe to the chunk topics again, so a broker
    # holding them retained (the server's retained chunk stream) sends them again itself
    resubscribe_after_s: float = 60.0
    disk_retry_s: float = 30.0
    disk_margin_bytes: int = 16 << 20
    max_artifact_bytes: int = 4 << 30
    max_trial_restarts: int = 1


# -- events ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ManifestVerified:
    model: str  # the topic's model
    manifest: Manifest
    raw: bytes
    device: Device


@dataclass(frozen=True, slots=True)
class ManifestRejected:
    model: str
    raw: bytes
    reason: str
    claimed_id: str | None  # the id the envelope claims, unverified: only to stay quiet
    device: Device
    hold: bool = False  # refused for its signature under a root of trust: retried later


@dataclass(frozen=True, slots=True)
class SerialNoted:
    model: str
    manifest_id: str


@dataclass(frozen=True, slots=True)
class Inspected:
    model: str
    manifest_id: str
    target_on_disk: bool
    refusal: str | None  # the artifact was refused before (final)
    free_bytes: int
    have_bytes: int  # the artifact's chunk bytes already on disk
    reserved_bytes: int  # what the other downloads in progress still need
    now: float


@dataclass(frozen=True, slots=True)
class DownloadOpened:
    model: str
    manifest_id: str
    reused: int
    bytes_received: int
    complete: bool
    now: float


@dataclass(frozen=True, slots=True)
class ChunkAccepted:
    model: str
    manifest_id: str
    now: float
    size: int = 0  # the chunk's bytes (what the download has fetched grows by this)


@dataclass(frozen=True, slots=True)
class ChunkBad:
    model: str
    manifest_id: str
    index: int
    now: float


@dataclass(frozen=True, slots=True)
class DownloadComplete:
    model: str
    manifest_id: str
    bytes_received: int
    reused: int


@dataclass(frozen=True, slots=True)
class OutOfSpace:
    model: str
    reason: str
    step: str  # "start" | "download" | "apply" | "recovery"
    now: float = 0.0


@dataclass(frozen=True, slots=True)
class Staged:
    model: str
    manifest_id: str


@dataclass(frozen=True, slots=True)
class ApplyFailed:
    model: str
    manifest_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class SwapDone:
    model: str
    manifest_id: str


@dataclass(frozen=True, slots=True)
class TrialReady:
    model: str
    manifest_id: str
    now: float


@dataclass(frozen=True, slots=True)
class TrialNotLoaded:
    model: str
    manifest_id: str


@dataclass(frozen=True, slots=True)
class TrialVerdict:
    model: str
    manifest_id: str
    verdict: Verdict | None  # None: not decided yet


@dataclass(frozen=True, slots=True)
class RolledBack:
    model: str
    manifest_id: str
    durable: bool  # state.json names the previous model again
    sha256: str | None  # what runs now


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """An empty payload on the model's desired topic: the server took its manifest back."""
    model: str


@dataclass(frozen=True, slots=True)
class Tick:
    now: float
    connected: bool = True


@dataclass(frozen=True, slots=True)
class Connected:
    now: float


@dataclass(frozen=True, slots=True)
class TrustUpdated:
    pass


@dataclass(frozen=True, slots=True)
class Reconsidered:
    model: str
    why: str
    token: str


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A journal record found at start, with what the driver checked for it."""
    model: str
    record: dict[str, Any]
    manifest: Manifest | None  # None: the record's manifest does not verify
    current_sha256: str | None
    target_on_disk: bool
    problem: str = ""  # why ``manifest`` is None


@dataclass(frozen=True, slots=True)
class Restarted:
    entries: tuple[JournalEntry, ...]


@dataclass(frozen=True, slots=True)
class Resumed:
    wall_now: float  # the current models are loaded: carry out the recoveries


# -- effects -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Log:
    model: str
    level: int
    text: str


@dataclass(frozen=True, slots=True)
class NoteSerial:
    model: str
    manifest_id: str
    serial: int


@dataclass(frozen=True, slots=True)
class Inspect:
    model: str
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class Adopt:
    """The target already runs: state.json names this manifest."""
    model: str
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class JournalBegin:
    model: str
    step: str
    raw: bytes
    manifest_id: str
    target_sha256: str
    previous_sha256: str | None


@dataclass(frozen=True, slots=True)
class JournalStep:
    model: str
    step: str
    extra: dict[str, Any] = field(default_factory=dict)
    trial_window_s: float | None = None  # write trial = {ends_at: wall now + this, restarts: 0}
    soft: bool = False  # after activation: a full disk leaves the record a step behind
    space_step: str | None = None  # a full disk answers OutOfSpace(step=this)


@dataclass(frozen=True, slots=True)
class JournalClear:
    model: str
    only_manifest_id: str | None = None


@dataclass(frozen=True, slots=True)
class Subscribe:
    model: str
    sha256: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    model: str
    sha256: str


@dataclass(frozen=True, slots=True)
class OpenDownload:
    model: str
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class ForgetDownload:
    """The download is no longer in progress (its chunks stay on disk)."""
    model: str


@dataclass(frozen=True, slots=True)
class DropDownload:
    model: str
    sha256: str


@dataclass(frozen=True, slots=True)
class CleanDownloads:
    model: str
    keep: frozenset[str]


@dataclass(frozen=True, slots=True)
class RequestChunks:
    model: str
    sha256: str
    indices: tuple[int, ...] | None = None  # None: every missing chunk
    repair: bool = False


@dataclass(frozen=True, slots=True)
class Apply:
    """Patch/decode the finished download (its chunk set) into the target."""
    model: str
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class SwapIn:
    model: str
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class StartTrial:
    model: str
    manifest: Manifest
    window_s: float
    resumed: bool = False  # after a restart: no swap preceded it


@dataclass(frozen=True, slots=True)
class Judge:
    model: str
    manifest_id: str
    final: bool


@dataclass(frozen=True, slots=True)
class EndTrial:
    """The trial passed: release what it held (the previous version kept for pairing)."""
    model: str


@dataclass(frozen=True, slots=True)
class RollBack:
    model: str
    manifest: Manifest
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class RollStateBack:
    """Recovery, before any model loads: state.json back to the previous model (soft)."""
    model: str
    manifest_id: str


@dataclass(frozen=True, slots=True)
class MarkFailed:
    model: str
    manifest_id: str
    serial: int


@dataclass(frozen=True, slots=True)
class CrashPoint:
    model: str
    step: str  # fault injection (``config.FaultPlan``): a driver may die here


@dataclass(frozen=True, slots=True)
class Report:
    model: str
    manifest: Manifest
    state: str
    reason: str = ""
    sha256: str | None = None
    running_sha: bool = False  # sha256 = what runs now (the driver knows)
    bytes_received: int = 0
    chunks_reused: int = 0
    health: dict[str, int] = field(default_factory=dict)
    id_key: str | None = None  # default: state


@dataclass(frozen=True, slots=True)
class ReportRejected:
    model: str
    reason: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Reconsider:
    """Verify ``raw`` again and feed the outcome, then ``Reconsidered(model, why, token)``."""
    model: str
    raw: bytes
    why: str  # "pending" | "waiting" | "trust" | "redo"
    token: str
