"""The update machine: every decision of an update, pure. Events in, effects out.

``UpdateMachine.handle(event)`` takes one event (a frozen dataclass: what the device saw or
what an effect did) and returns the effects to carry out, in order. The event and effect types
live in ``machine_events`` and are re-exported here. It does no I/O: no
MQTT, no files, no runtime, no clock (time comes in the events: ``now`` is the driver's
monotonic clock, ``wall_now`` unix seconds). The agent (``daemon``) and the fleet simulator
(``tests/harness/fleetsim.py``) are drivers: they execute the effects with real or simulated I/O and
feed the outcome back as the next event, depth first (an effect's outcome is handled before
the next effect of the same list runs).

Per model, an update is in one phase; the one setter (``_move``) refuses any move not in
``TRANSITIONS`` with ``IllegalTransition``::

    from          to            on
    idle          checking      SerialNoted (a verified manifest to act on)
    idle          trial         Resumed (journal: activated or in trial before a restart)
    idle          rolling_back  Resumed (journal: rolling back, or too many trial restarts)
    checking      downloading   DownloadOpened
    checking      applying      Inspected (the target is already on disk)
    checking      idle          Inspected (refused, rejected, no space), OutOfSpace
    checking      idle          Withdrawn (the server cleared the manifest)
    downloading   checking      SerialNoted (a newer manifest supersedes the download)
    downloading   applying      DownloadComplete
    downloading   idle          Tick (download timed out), OutOfSpace (paused for space)
    downloading   idle          Withdrawn (the server cleared the manifest: chunks and
                                journal record removed, the running model stays)
    applying      trial         SwapDone
    applying      idle          ApplyFailed, OutOfSpace (held for space)
    trial         idle          TrialVerdict (pass: committed)
    trial         rolling_back  TrialVerdict (breach), TrialNotLoaded
    rolling_back  idle          RolledBack

Beside the phase, per model: ``pending`` (a manifest that arrived during a trial, handled
after it), ``waiting`` (held back for disk space, retried every ``disk_retry_s``; never a
failure), ``unverified`` (refused for its signature, retried after the next trust update).

A withdrawal (``Withdrawn``: an empty retained payload on the model's desired topic, which the
server publishes when a rollout is aborted) drops what has not touched the running model yet:
a download or check in progress, a manifest pending after a trial, waiting for space or for
its key. From ``applying`` on, nothing changes (the swap and trial finish as they would).
Being unsigned, a withdrawal can only stop an update, never start one.

A failure report of a download (``Tick``: timed out) carries the bytes fetched so far
(``bytes_received``, ``chunks_reused``), so the server counts what a failed download cost.

The journal (``journal``) is written *before* each step's effect, with the steps of
``JOURNAL_NEXT``; phase and journal step go together as ``downloading`` [downloading],
``applying`` [patching, staged, activating], ``trial`` [trial, committing], ``rolling_back``
[rolling_back]; leaving an update removes the record. ``reconcile`` says what a record found
after a restart needs; ``Restarted`` and ``Resumed`` carry it out.

Fallible effects (a full disk: ``NoteSerial``, ``JournalBegin``, ``OpenDownload``, ``Apply``,
``SwapIn``, a ``JournalStep`` with ``space_step``) answer ``OutOfSpace``; the driver then skips
the rest of that model's effects in the list, and the machine holds the manifest back.

Reports carry stable event ids (``reports.event_id``: per device, manifest and state or
``id_key``), so a re-sent or re-made report is applied once by the server.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from deltafleet.shared.messages import Manifest

from .errors import AgentError, NoSpace, UpdateRejected
from .machine_events import (
    Adopt,
    Apply,
    ApplyFailed,
    ChunkAccepted,
    ChunkBad,
    CleanDownloads,
    Connected,
    CrashPoint,
    Device,
    DownloadComplete,
    DownloadOpened,
    DropDownload,
    EndTrial,
    ForgetDownload,
    Inspect,
    Inspected,
    JournalBegin,
    JournalClear,
    JournalEntry,
    JournalStep,
    Judge,
    Log,
    MachineConfig,
    ManifestRejected,
    ManifestVerified,
    MarkFailed,
    NoteSerial,
    OpenDownload,
    OutOfSpace,
    Reconsider,
    Reconsidered,
    Report,
    ReportRejected,
    RequestChunks,
    Restarted,
    Resumed,
    RollBack,
    RolledBack,
    RollStateBack,
    Running,
    SerialNoted,
    Staged,
    StartTrial,
    Subscribe,
    SwapDone,
    SwapIn,
    Tick,
    TrialNotLoaded,
    TrialReady,
    TrialVerdict,
    TrustUpdated,
    Unsubscribe,
    Withdrawn,
)
from .trial import Verdict

__all__ = [
    "JOURNAL_NEXT", "STEPS", "TRANSITIONS", "Phase", "IllegalTransition", "MachineConfig",
    "UpdateMachine", "Running", "Device", "JournalEntry", "Recovery", "reconcile",
    "check_base", "check_disk", "raw_manifest", "space_needed",
]


class Phase(StrEnum):
    IDLE = "idle"
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    APPLYING = "applying"
    TRIAL = "trial"
    ROLLING_BACK = "rolling_back"


P = Phase
TRANSITIONS: frozenset[tuple[Phase, Phase]] = frozenset({
    (P.IDLE, P.CHECKING), (P.IDLE, P.TRIAL), (P.IDLE, P.ROLLING_BACK),
    (P.CHECKING, P.DOWNLOADING), (P.CHECKING, P.APPLYING), (P.CHECKING, P.IDLE),
    (P.DOWNLOADING, P.CHECKING), (P.DOWNLOADING, P.APPLYING), (P.DOWNLOADING, P.IDLE),
    (P.APPLYING, P.TRIAL), (P.APPLYING, P.IDLE),
    (P.TRIAL, P.IDLE), (P.TRIAL, P.ROLLING_BACK),
    (P.ROLLING_BACK, P.IDLE),
})

STEPS = ("downloading", "patching", "staged", "activating", "trial", "committing",
         "rolling_back")
JOURNAL_NEXT: dict[str | None, frozenset[str]] = {
    None: frozenset({"downloading", "staged"}),
    "downloading": frozenset({"downloading", "patching", "staged"}),
    "patching": frozenset({"patching", "staged"}),
    "staged": frozenset({"staged", "activating"}),
    "activating": frozenset({"activating", "trial", "rolling_back"}),
    "trial": frozenset({"trial", "committing", "rolling_back"}),
    "committing": frozenset({"committing"}),
    "rolling_back": frozenset({"rolling_back"}),
}
PHASE_STEPS: dict[Phase, frozenset[str]] = {
    P.IDLE: frozenset(), P.CHECKING: frozenset(), P.DOWNLOADING: frozenset({"downloading"}),
    P.APPLYING: frozenset({"patching", "staged", "activating"}),
    P.TRIAL: frozenset({"trial", "committing"}), P.ROLLING_BACK: frozenset({"rolling_back"}),
}


class IllegalTransition(AgentError):
    """The update machine was asked for a move its table does not have (a driver bug)."""


# -- pure rules ---------------------------------------------------------------------------
class _HasSha(Protocol):
    @property
    def sha256(self) -> str: ...


def check_base(manifest: Manifest, current: _HasSha | None) -> None:
    """Step 6: a delta applies only to the model that runs (no mix-and-match)."""
    if manifest.artifact.kind != "delta":
        return
    running = current.sha256 if current else None
    if running != manifest.base_sha256:
        raise UpdateRejected(
            f"base mismatch: delta is from {str(manifest.base_sha256)[:12]}, "
            f"device runs {str(running)[:12]}"
        )


def space_needed(manifest: Manifest, *, have_bytes: int = 0, margin_bytes: int = 0) -> int:
    """Bytes an update still needs on the state directory's filesystem: the artifact's chunks
    not yet on disk, plus the target (decoded into a temp file beside its content address
    while every chunk is still on disk), plus ``margin_bytes`` kept free for the journal,
    state.json, the outbox and the filesystem's own overhead."""
    art = manifest.artifact.size_bytes
    return art - min(max(0, have_bytes), art) + manifest.target_size_bytes + max(0, margin_bytes)


def check_disk(manifest: Manifest, free_bytes: int, *, have_bytes: int = 0,
               reserved_bytes: int = 0, margin_bytes: int = 0,
               max_artifact_bytes: int = 4 << 30) -> None:
    """Step 7: the artifact is under the cap (else UpdateRejected, final for the manifest), and
    ``space_needed`` fits the free space of the state directory's filesystem less
    ``reserved_bytes`` (what other downloads in progress still need); else NoSpace, which the
    agent retries when space is back."""
    art = manifest.artifact.size_bytes
    if art > max_artifact_bytes:
        raise UpdateRejected(f"artifact of {art} bytes exceeds the {max_artifact_bytes}-byte cap")
    need = space_needed(manifest, have_bytes=have_bytes, margin_bytes=margin_bytes)
    avail = free_bytes - max(0, reserved_bytes)
    if need > avail:
        have = min(max(0, have_bytes), art)
        held = f", {_mib(reserved_bytes)} of it held for other downloads" if reserved_bytes else ""
        raise NoSpace(
            f"not enough disk: artifact {_mib(art - have)} still to fetch + target "
            f"{_mib(manifest.target_size_bytes)} + margin {_mib(margin_bytes)} = {_mib(need)}, "
            f"{_mib(max(0, free_bytes))} free in the state directory{held}; retrying when "
            "space is back")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True, slots=True)
class Recovery:
    action: str  # "redo" | "resume_trial" | "finish_commit" | "finish_rollback" | "drop"
    reason: str


def reconcile(rec: dict[str, Any], current_sha256: str | None, target_on_disk: bool,
              *, max_trial_restarts: int) -> Recovery:
    """What to do after a restart with this journal record.

    ``current_sha256`` is what state.json says runs; ``target_on_disk`` whether the verified
    target file is in the model store.
    """
    step, target = rec["step"], rec["target_sha256"]
    if step in ("downloading", "patching", "staged"):
        return Recovery("redo", f"interrupted at {step}: resume from verified bytes on disk")
    if step == "activating":
        if current_sha256 == target:
            return Recovery("resume_trial", "activated before the crash: start the trial")
        return Recovery("redo" if target_on_disk else "drop",
                        "crashed before activation: the old model still runs")
    if step == "trial":
        if current_sha256 != target:
            return Recovery("drop", "trial record but the new model is not current")
        restarts = int(rec.get("trial", {}).get("restarts", 0)) + 1
        if restarts > max_trial_restarts:
            return Recovery("finish_rollback",
                            f"agent restarted {restarts} times during the trial")
        return Recovery("resume_trial", "restarted during the trial: continue it")
    if step == "committing":
        return Recovery("finish_commit", "crashed while committing")
    if step == "rolling_back":
        return Recovery("finish_rollback", rec.get("verdict", {}).get("reason", "rolling back"))
    return Recovery("drop", f"unknown step {step!r}")


# -- the machine -------------------------------------------------------------------------
@dataclass(slots=True)
class _Update:
    manifest: Manifest
    raw: bytes
    device: Device
    phase: Phase = P.IDLE
    started: float = 0.0
    last_progress: float = 0.0
    last_chunk: float = 0.0  # the last chunk received (or the last subscribe)
    stalls: int = 0  # asks in a row without a chunk since (the next waits 2**stalls longer)
    reused: int = 0
    bytes_received: int = 0  # of the artifact's chunks on disk (reused or fetched)
    patched: bool = False
    window_s: float = 0.0
    ends_at: float | None = None  # set when the trial runs
    verdict: Verdict | None = None


@dataclass(frozen=True, slots=True)
class _SpaceWait:
    manifest: Manifest
    raw: bytes
    retry_at: float
    token: str


@dataclass(slots=True)
class _Plan:
    manifest: Manifest
    record: dict[str, Any]
    decision: Recovery
    current_sha256: str | None


Effect = Any
Event = Any


class _Core:
    """The machine's state, its one setter, queries and the outcomes several stages share."""

    def __init__(self, cfg: MachineConfig | None = None) -> None:
        self.cfg = cfg or MachineConfig()
        self.updates: dict[str, _Update] = {}
        self.arriving: dict[str, _Update] = {}  # verified, serial being noted
        self.pending: dict[str, tuple[str, bytes]] = {}  # (id, manifest) arriving in a trial
        self.waiting: dict[str, _SpaceWait] = {}
        self.unverified: dict[str, bytes] = {}
        self.recovering: set[str] = set()  # manifest ids of journal records being recovered
        self._plans: dict[str, _Plan] = {}
        self._space_reported: set[tuple[str, str]] = set()
        self._seq = 0

    # -- queries ---------------------------------------------------------------------------
    def phase(self, model: str) -> Phase:
        upd = self.updates.get(model)
        return upd.phase if upd else P.IDLE

    def in_trial(self, model: str) -> bool:
        return self.phase(model) is P.TRIAL

    def downloading(self) -> dict[str, Manifest]:
        return {m: u.manifest for m, u in self.updates.items() if u.phase is P.DOWNLOADING}

    def known_ids(self, model: str, device: Device) -> set[str]:
        """The manifests of ``model`` this device holds right now (running, failed, in
        progress, waiting for a trial or for space, in recovery): seeing one again is a
        re-delivery, not a replay. A manifest superseded by a newer one is not in here."""
        ids = set(self.recovering)
        running_id = device.running.manifest_id if device.running else None
        ids.update(i for i in (running_id, device.failed_id) if i)
        if model in self.updates:
            ids.add(self.updates[model].manifest.manifest_id)
        if model in self.pending:
            ids.add(self.pending[model][0])
        if model in self.waiting:
            ids.add(self.waiting[model].manifest.manifest_id)
        return ids

    # -- the one setter --------------------------------------------------------------------
    def _move(self, model: str, to: Phase, upd: _Update | None = None) -> None:
        upd = upd or self.updates.get(model)
        old = self.phase(model)
        if (old, to) not in TRANSITIONS:
            raise IllegalTransition(f"update of {model}: {old} -> {to} is not a legal move")
        if to is P.IDLE:
            self.updates.pop(model, None)
            return
        assert upd is not None
        upd.phase = to
        self.updates[model] = upd

    def _current(self, model: str, manifest_id: str, *phases: Phase) -> _Update | None:
        upd = self.updates.get(model)
        if upd is None or upd.manifest.manifest_id != manifest_id or upd.phase not in phases:
            return None
        return upd

    def handle(self, event: Event) -> list[Effect]:
        handler = getattr(self, "_on_" + type(event).__name__, None)
        if handler is None:
            raise AgentError(f"the update machine takes no {type(event).__name__} event")
        return handler(event)

    # -- outcomes shared by several events -------------------------------------------------
    def _fail(self, upd: _Update, state: str, reason: str) -> list[Effect]:
        m = upd.manifest
        out: list[Effect] = [Log(m.model, logging.WARNING,
                                 f"update of {m.model} to {m.version} {state}: {reason}")]
        fetched = reused = 0
        if upd.phase is P.DOWNLOADING:  # what the failed download cost is counted too
            out += [Unsubscribe(m.model, m.artifact.sha256), ForgetDownload(m.model)]
            fetched, reused = upd.bytes_received, upd.reused
        if self.updates.get(m.model) is upd:
            self._move(m.model, P.IDLE)
        return [*out, MarkFailed(m.model, m.manifest_id, m.serial),
                Report(m.model, m, state, reason=reason, running_sha=True,
                       bytes_received=fetched, chunks_reused=reused),
                *self._clean(m.model)]

    def _wait(self, m: Manifest, raw: bytes, reason: str, step: str, now: float) -> list[Effect]:
        """Too little disk for ``m``: report ``waiting`` (once per manifest and ``step``), keep
        its chunks and the journal record, try it again in ``disk_retry_s``. Never marked
        failed (the server uses no attempt on it)."""
        self._seq += 1
        self.waiting[m.model] = _SpaceWait(m, raw, now + self.cfg.disk_retry_s, str(self._seq))
        out: list[Effect] = [Log(m.model, logging.WARNING,
                                 f"update of {m.model} to {m.version} held back: {reason}")]
        key = f"waiting:{step}"
        if (m.manifest_id, key) not in self._space_reported:
            self._space_reported.add((m.manifest_id, key))
            out.append(Report(m.model, m, "waiting", reason=reason, running_sha=True, id_key=key))
        return out

    def _clean(self, model: str) -> list[Effect]:
        """Remove the chunks no longer wanted; not while journal records are recovered."""
        if self.recovering:
            return []
        keep = {u.manifest.artifact.sha256 for u in self.updates.values()
                if u.phase is P.DOWNLOADING}
        keep |= {w.manifest.artifact.sha256 for w in self.waiting.values()}
        return [CleanDownloads(model, frozenset(keep))]

    def _commit(self, m: Manifest, v: Verdict) -> list[Effect]:
        return [Report(m.model, m, "healthy", sha256=m.target_sha256, health=dict(v.figures),
                       reason=v.note), JournalClear(m.model),
                Log(m.model, logging.INFO, f"committed {m.model} {m.version}: {v.figures}")]


class _Fetch(_Core):
    """Fetch, apply and swap: from a verified manifest to the new model in service."""

    # -- fetch -----------------------------------------------------------------------------
    def _on_DownloadOpened(self, e: DownloadOpened) -> list[Effect]:
        upd = self._current(e.model, e.manifest_id, P.CHECKING)
        if upd is None:
            return []
        self._move(e.model, P.DOWNLOADING)
        upd.started = upd.last_progress = upd.last_chunk = e.now
        upd.reused, upd.bytes_received = e.reused, e.bytes_received
        sha = upd.manifest.artifact.sha256
        out = [Subscribe(e.model, sha),
               Report(e.model, upd.manifest, "downloading", chunks_reused=e.reused)]
        if e.complete:
            return out + self._finish(upd, e.bytes_received, e.reused)
        return [*out, RequestChunks(e.model, sha)]

    def _on_ChunkAccepted(self, e: ChunkAccepted) -> list[Effect]:
        upd = self._current(e.model, e.manifest_id, P.DOWNLOADING)
        if upd is not None:
            upd.last_progress = upd.last_chunk = e.now
            upd.stalls = 0
            upd.bytes_received += e.size
        return []

    def _on_ChunkBad(self, e: ChunkBad) -> list[Effect]:
        upd = self._current(e.model, e.manifest_id, P.DOWNLOADING)
        if upd is None:
            return []
        upd.last_progress = e.now
        return [RequestChunks(e.model, upd.manifest.artifact.sha256, (e.index,), repair=True)]

    def _on_DownloadComplete(self, e: DownloadComplete) -> list[Effect]:
        upd = self._current(e.model, e.manifest_id, P.DOWNLOADING)
        return self._finish(upd, e.bytes_received, e.reused) if upd else []

    def _finish(self, upd: _Update, bytes_received: int, reused: int) -> list[Effect]:
        m = upd.manifest
        self._move(m.model, P.APPLYING)
        upd.patched, upd.reused = True, reused
        return [Unsubscribe(m.model, m.artifact.sha256),
                Report(m.model, m, "applying", bytes_received=bytes_received,
                       chunks_reused=reused),
                JournalStep(m.model, "patching", space_step="apply"), Apply(m.model, m)]

    def _on_Connected(self, e: Connected) -> list[Effect]:
        out: list[Effect] = []
        for model, upd in self.updates.items():
            if upd.phase is P.DOWNLOADING:
                upd.last_progress = e.now
                upd.stalls = 0
                out.append(RequestChunks(model, upd.manifest.artifact.sha256))
        return out

    # -- apply, swap -----------------------------------------------------------------------
    def _on_Staged(self, e: Staged) -> list[Effect]:
        upd = self._current(e.model, e.manifest_id, P.APPLYING)
        if upd is None:
            return []
        return [CrashPoint(e.model, "patch"),
                JournalStep(e.model, "staged", space_step="apply"),
                CrashPoint(e.model, "stage"), SwapIn(e.model, upd.manifest)]

    def _on_ApplyFailed(self, e: ApplyFailed) -> list[Effect]:
        upd = self._current(e.model, e.manifest_id, P.APPLYING)
        if upd is None:
            return []
        return [DropDownload(e.model, upd.manifest.artifact.sha256), JournalClear(e.model),
                *self._fail(upd, "failed", e.reason)]

    def _on_SwapDone(self, e: SwapDone) -> list[Effect]:
        upd = self._current(e.model, e.manifest_id, P.APPLYING)
        if upd is None:
            return []
        m = upd.manifest
        self._move(e.model, P.TRIAL)
        upd.window_s = float(m.trial_window_s)
        return [DropDownload(e.model, m.artifact.sha256), *self._clean(e.model),
                Log(e.model, logging.INFO,
                    f"now running {m.model} {m.version} ({m.target_sha256[:12]})"),
                JournalStep(e.model, "trial", trial_window_s=upd.window_s, soft=True),
                Report(e.model, m, "trial", sha256=m.target_sha256,
                       bytes_received=m.artifact.size_bytes if upd.patched else 0,
                       chunks_reused=upd.reused),
                CrashPoint(e.model, "trial"), StartTrial(e.model, m, upd.window_s)]

class _Trial(_Fetch):
    """Trial, commit and roll back."""

    # -- trial, commit, roll back ----------------------------------------------------------
    def _on_TrialReady(self, e: TrialReady) -> list[Effect]:
        upd = self._current(e.model, e.manifest_id, P.TRIAL)
        if upd is None:
            return []
        upd.ends_at = e.now + upd.window_s
        return [Judge(e.model, e.manifest_id, final=True)] if upd.window_s <= 0 else []

    def _on_TrialNotLoaded(self, e: TrialNotLoaded) -> list[Effect]:
        upd = self._current(e.model, e.manifest_id, P.TRIAL)
        if upd is None:
            return []
        verdict = Verdict(False, "new model is not loaded", {})
        return [JournalStep(e.model, "rolling_back",
                            {"verdict": {"reason": verdict.reason, "figures": {}}}),
                *self._roll_back(upd, verdict)]

    def _on_TrialVerdict(self, e: TrialVerdict) -> list[Effect]:
        upd = self._current(e.model, e.manifest_id, P.TRIAL)
        if upd is None or e.verdict is None:
            return []
        v, m = e.verdict, upd.manifest
        record = {"verdict": {"reason": v.reason, "figures": v.figures}}
        if v.ok:
            self._move(e.model, P.IDLE)
            return [EndTrial(e.model), JournalStep(e.model, "committing", record, soft=True),
                    CrashPoint(e.model, "commit"), *self._commit(m, v), *self._after_trial(m)]
        return [Log(e.model, logging.WARNING, f"trial of {m.model} {m.version} failed: "
                    f"{v.reason} {v.figures}"),
                JournalStep(e.model, "rolling_back", record, soft=True),
                CrashPoint(e.model, "rollback"), *self._roll_back(upd, v)]

    def _roll_back(self, upd: _Update, verdict: Verdict) -> list[Effect]:
        self._move(upd.manifest.model, P.ROLLING_BACK, upd)
        upd.verdict = verdict
        return [RollBack(upd.manifest.model, upd.manifest, verdict)]

    def _on_RolledBack(self, e: RolledBack) -> list[Effect]:
        upd = self._current(e.model, e.manifest_id, P.ROLLING_BACK)
        if upd is None:
            return []
        v, m = upd.verdict or Verdict(False, "rolled back", {}), upd.manifest
        self._move(e.model, P.IDLE)
        out: list[Effect] = [Report(e.model, m, "rolled_back", reason=v.reason, sha256=e.sha256,
                                    health=dict(v.figures))]
        if e.durable:
            out.append(JournalClear(e.model))
        else:  # state.json still names the failed model: a restart must finish this
            out.append(Log(e.model, logging.ERROR, f"rollback of {e.model} done in memory only; "
                           "the journal finishes it at the next restart"))
        return out + self._after_trial(m)

    def _after_trial(self, m: Manifest) -> list[Effect]:
        pending = self.pending.get(m.model)  # still known (accepted) while it is handled
        return [Reconsider(m.model, pending[1], "pending", pending[0])] if pending else []


class _Recovery(_Trial):
    """Restart: journal records found at start, carried out in two stages."""

    # -- restart ---------------------------------------------------------------------------
    def _on_Restarted(self, e: Restarted) -> list[Effect]:
        """Before any model is loaded: decide each record's recovery, and make durable what
        must hold even if loading crashes the agent again (a trial restart is counted; a
        rollback switches state.json back to the previous model)."""
        out: list[Effect] = []
        for entry in e.entries:
            model, rec = entry.model, dict(entry.record)
            if entry.manifest is None:
                out += [Log(model, logging.ERROR, f"journal of {model} holds an unusable "
                            f"manifest ({entry.problem}); dropping it"), JournalClear(model)]
                continue
            d = reconcile(rec, entry.current_sha256, entry.target_on_disk,
                          max_trial_restarts=self.cfg.max_trial_restarts)
            out.append(Log(model, logging.WARNING, f"recovering {model} from journal step "
                           f"{rec['step']}: {d.action} ({d.reason})"))
            plan = self._plans[model] = _Plan(entry.manifest, rec, d, entry.current_sha256)
            self.recovering.add(entry.manifest.manifest_id)
            if d.action == "resume_trial" and rec["step"] == "trial":
                trial = dict(rec.get("trial") or {})
                trial["restarts"] = int(trial.get("restarts", 0)) + 1
                plan.record = dict(rec, trial=trial)
                out.append(JournalStep(model, "trial", {"trial": trial}, space_step="recovery"))
            elif d.action == "finish_rollback":
                out += self._plan_rollback(model, plan)
        return out

    def _plan_rollback(self, model: str, plan: _Plan) -> list[Effect]:
        out: list[Effect] = []
        rec, m = plan.record, plan.manifest
        if rec["step"] != "rolling_back":
            verdict = rec.get("verdict") or {"reason": plan.decision.reason, "figures": {}}
            plan.record = dict(rec, verdict=verdict)
            out.append(JournalStep(model, "rolling_back", {"verdict": verdict}, soft=True))
        if plan.current_sha256 == m.target_sha256:
            out.append(RollStateBack(model, m.manifest_id))  # never load the failed model
        return out

    def _on_Resumed(self, e: Resumed) -> list[Effect]:
        """After the current models are loaded: carry out each record's recovery."""
        out: list[Effect] = []
        plans, self._plans = self._plans, {}
        for model, plan in plans.items():
            m, rec, action = plan.manifest, plan.record, plan.decision.action
            if action != "redo":
                self.recovering.discard(m.manifest_id)
            if action == "redo":
                out += [JournalClear(model), Reconsider(model, raw_manifest(rec), "redo",
                                                        m.manifest_id)]
            elif action == "resume_trial":
                upd = _Update(m, raw_manifest(rec), Device(), window_s=float(m.trial_window_s))
                self._move(model, P.TRIAL, upd)
                trial = rec.get("trial") or {}
                if rec["step"] == "activating" or not trial:
                    out += [JournalStep(model, "trial", trial_window_s=upd.window_s),
                            Report(model, m, "trial", sha256=m.target_sha256)]
                else:
                    upd.window_s = max(0.0, min(float(m.trial_window_s),
                                                float(trial.get("ends_at", 0)) - e.wall_now))
                out.append(StartTrial(model, m, upd.window_s, resumed=True))
            elif action == "finish_commit":
                figures = (rec.get("verdict") or {}).get("figures", {})
                out += self._commit(m, Verdict(True, "committed after restart", figures))
            elif action == "finish_rollback":
                v = rec.get("verdict") or {"reason": plan.decision.reason, "figures": {}}
                upd = _Update(m, raw_manifest(rec), Device())
                self._move(model, P.ROLLING_BACK, upd)
                upd.verdict = Verdict(False, v["reason"], v.get("figures", {}))
                out.append(RollBack(model, m, upd.verdict))
            else:
                out.append(JournalClear(model))
        return out + self._clean("")


class UpdateMachine(_Recovery):
    """The decision state of every model's update; see the module docstring."""

    # -- manifests -------------------------------------------------------------------------
    def _on_OutOfSpace(self, e: OutOfSpace) -> list[Effect]:
        if e.step == "recovery":
            plan = self._plans[e.model]
            plan.decision = Recovery("finish_rollback", "disk full: the restart during the "
                                     "trial cannot be counted")
            return [Log(e.model, logging.ERROR, f"{e.model}: {plan.decision.reason}"),
                    *self._plan_rollback(e.model, plan)]
        new = self.arriving.pop(e.model, None)
        if new is not None:  # the serial could not be recorded
            return self._wait(new.manifest, new.raw, f"disk full recording the manifest serial "
                              f"({e.reason}); retrying when space is back", "start", e.now)
        upd = self.updates.get(e.model)
        if upd is None:
            return []
        out: list[Effect] = [ForgetDownload(e.model)]
        if upd.phase is P.DOWNLOADING:
            out.insert(0, Unsubscribe(e.model, upd.manifest.artifact.sha256))
        self._move(e.model, P.IDLE)
        return out + self._wait(upd.manifest, upd.raw, e.reason, e.step, e.now)


    def _on_Withdrawn(self, e: Withdrawn) -> list[Effect]:
        """The server cleared the model's manifest (an abort): drop what has not touched the
        running model (see the module docstring); an update applying or in trial goes on."""
        model = e.model
        out: list[Effect] = []
        self.unverified.pop(model, None)
        pending = self.pending.pop(model, None)
        if pending is not None:
            out.append(Log(model, logging.INFO, f"manifest {pending[0]} of {model}, pending "
                           "after the trial, withdrawn by the server; dropped"))
        wait = self.waiting.pop(model, None)
        if wait is not None:
            mid = wait.manifest.manifest_id
            out += [Log(model, logging.INFO, f"manifest {mid} of {model}, held for disk "
                        "space, withdrawn by the server; dropped"),
                    DropDownload(model, wait.manifest.artifact.sha256),
                    JournalClear(model, only_manifest_id=mid)]
        upd = self.updates.get(model)
        if upd is not None and upd.phase in (P.CHECKING, P.DOWNLOADING):
            m = upd.manifest
            if upd.phase is P.DOWNLOADING:
                out += [Unsubscribe(model, m.artifact.sha256), ForgetDownload(model)]
            self._move(model, P.IDLE)
            out += [DropDownload(model, m.artifact.sha256), JournalClear(model),
                    Log(model, logging.WARNING, f"update of {model} to {m.version} withdrawn by "
                        f"the server: download stopped, {m.model} stays as it runs")]
        elif upd is not None:
            return [*out, Log(model, logging.INFO, f"withdrawal of {model} ignored: the update "
                              f"to {upd.manifest.version} is {upd.phase}, past the point of "
                              "stopping")]
        return [*out, *self._clean(model)] if out else []

    def _on_ManifestRejected(self, e: ManifestRejected) -> list[Effect]:
        if e.hold:
            self.unverified[e.model] = e.raw  # maybe signed by a key not yet received
        if e.claimed_id in self.known_ids(e.model, e.device):
            # already accepted, re-delivered (retained) after it expired or its key was
            # rotated out: nothing to do and nothing new to report
            return [Log(e.model, logging.INFO,
                        f"ignoring re-delivered manifest for {e.model}: {e.reason}")]
        return [Log(e.model, logging.WARNING, f"rejected manifest for {e.model}: {e.reason}"),
                ReportRejected(e.model, e.reason, e.raw)]

    def _on_ManifestVerified(self, e: ManifestVerified) -> list[Effect]:
        m = e.manifest
        if m.model != e.model:
            return self._on_ManifestRejected(ManifestRejected(
                e.model, e.raw, f"manifest for {m.model} arrived on topic of {e.model}",
                m.manifest_id, e.device))
        out: list[Effect] = []
        self.unverified.pop(e.model, None)
        wait = self.waiting.pop(e.model, None)  # retried now, or superseded by this one
        if wait is not None and wait.manifest.artifact.sha256 != m.artifact.sha256:
            out.append(DropDownload(e.model, wait.manifest.artifact.sha256))
        self.arriving[e.model] = _Update(m, e.raw, e.device)
        return [*out, NoteSerial(e.model, m.manifest_id, m.serial)]  # no-op for a re-delivery

    def _on_SerialNoted(self, e: SerialNoted) -> list[Effect]:
        new = self.arriving.pop(e.model)
        m, running = new.manifest, new.device.running
        upd = self.updates.get(e.model)
        if upd is not None and upd.phase is P.TRIAL:
            if upd.manifest.manifest_id != m.manifest_id:
                self.pending[e.model] = (m.manifest_id, new.raw)  # after the trial
            return []
        if running is not None and running.sha256 == m.target_sha256:
            if running.manifest_id == m.manifest_id:
                return []
            return [Adopt(e.model, m), Report(e.model, m, "healthy", sha256=running.sha256,
                                              reason="already running")]
        if new.device.failed_id == m.manifest_id:
            return []  # already tried and reported; wait for a new manifest
        out: list[Effect] = []
        if upd is not None and upd.phase is P.DOWNLOADING:
            old = upd.manifest
            if old.manifest_id == m.manifest_id:
                return []
            out += [Log(e.model, logging.INFO,
                        f"manifest {m.manifest_id} supersedes download of {old.manifest_id}"),
                    Unsubscribe(e.model, old.artifact.sha256), ForgetDownload(e.model)]
            if old.artifact.sha256 != m.artifact.sha256:
                out.append(DropDownload(e.model, old.artifact.sha256))
        self._move(e.model, P.CHECKING, new)
        return [*out, Inspect(e.model, m)]

    def _on_Inspected(self, e: Inspected) -> list[Effect]:
        upd = self._current(e.model, e.manifest_id, P.CHECKING)
        if upd is None:
            return []
        m, running = upd.manifest, upd.device.running
        if not e.target_on_disk and e.refusal is not None:  # refused before: final
            return self._fail(upd, "failed",
                              f"artifact refused earlier, not decoded again: {e.refusal}")
        try:
            check_base(m, running)
            if not e.target_on_disk:
                check_disk(m, e.free_bytes, have_bytes=e.have_bytes,
                           reserved_bytes=e.reserved_bytes, margin_bytes=self.cfg.disk_margin_bytes,
                           max_artifact_bytes=self.cfg.max_artifact_bytes)
        except NoSpace as err:
            self._move(e.model, P.IDLE)
            return self._wait(m, upd.raw, str(err), "start", e.now)
        except UpdateRejected as err:
            return self._fail(upd, "rejected", str(err))
        begin = JournalBegin(e.model, "staged" if e.target_on_disk else "downloading", upd.raw,
                             m.manifest_id, m.target_sha256, running.sha256 if running else None)
        if not e.target_on_disk:
            return [begin, OpenDownload(e.model, m)]
        # e.g. a rollback to the previous model, which is still on disk: nothing to fetch
        self._move(e.model, P.APPLYING)
        return [begin, Report(e.model, m, "applying", reason="target already on disk"),
                SwapIn(e.model, m)]

    # -- time ------------------------------------------------------------------------------
    def _on_Tick(self, e: Tick) -> list[Effect]:
        out: list[Effect] = []
        for model, upd in list(self.updates.items()):
            if upd.phase is P.TRIAL and upd.ends_at is not None:
                out.append(Judge(model, upd.manifest.manifest_id, final=e.now >= upd.ends_at))
        for model, upd in list(self.updates.items()):
            if upd.phase is not P.DOWNLOADING:
                continue
            if e.now - upd.started > self.cfg.download_timeout_s:
                out += [JournalClear(model), *self._fail(upd, "failed", "download timed out")]
            elif (e.now - upd.last_progress > self.cfg.chunk_retry_s * 2 ** min(upd.stalls, 3)
                  and e.connected):
                upd.last_progress = e.now
                upd.stalls += 1
                sha = upd.manifest.artifact.sha256
                if e.now - upd.last_chunk > self.cfg.resubscribe_after_s:
                    # a retained chunk stream: the broker re-sends what it holds, the server
                    # publishes nothing again (its queue for this device may have overflowed)
                    upd.last_chunk = e.now
                    out.append(Subscribe(model, sha))
                out.append(RequestChunks(model, sha))
        for model, wait in list(self.waiting.items()):
            if e.now >= wait.retry_at:
                out.append(Reconsider(model, wait.raw, "waiting", wait.token))
        return out

    def _on_Reconsidered(self, e: Reconsidered) -> list[Effect]:
        if e.why == "pending":
            if self.pending.get(e.model, ("",))[0] == e.token:
                del self.pending[e.model]
        elif e.why == "waiting":
            wait = self.waiting.get(e.model)
            if wait is not None and wait.token == e.token:  # refused on its own (e.g. expired)
                del self.waiting[e.model]
                mid = wait.manifest.manifest_id
                return [Log(e.model, logging.WARNING, f"giving up on manifest {mid} of "
                            f"{e.model} held for disk space"),
                        JournalClear(e.model, only_manifest_id=mid), *self._clean(e.model)]
        elif e.why == "redo":
            self.recovering.discard(e.token)
            return self._clean(e.model)
        return []

    def _on_TrustUpdated(self, e: TrustUpdated) -> list[Effect]:
        held, self.unverified = self.unverified, {}
        return [Reconsider(model, raw, "trust", "") for model, raw in held.items()]


def raw_manifest(rec: dict[str, Any]) -> bytes:
    """The signed manifest envelope a journal record holds."""
    return base64.b64decode(rec["manifest"])
