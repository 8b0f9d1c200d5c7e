"""The agent's effect executor: carries out ``machine`` effects with the real store, journal,
MQTT client and runtimes, and feeds each outcome back to the machine as its next event.

Rules: effects run in order, depth first (an effect's outcome is handled before the next
effect); an effect that finds the disk full answers ``OutOfSpace`` and the rest of that
model's effects in the list are skipped (the machine has decided again). Writes after
activation are soft: a full disk leaves the journal a step behind (a restart then repeats
the trial, which is safe) and failure marks are best effort.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from deltafleet.codecs import ChunkSource, default_memory_cap_bytes
from deltafleet.shared import ChunkRequest, Manifest, Topics, encode, sha256_file
from deltafleet.shared.mqtt import MqttClient

from . import machine as mc
from .config import AgentConfig
from .errors import (
    ArtifactRefused,
    DecodeLimitHit,
    ModelRuntimeError,
    NoSpace,
    UpdateRejected,
    is_no_space,
)
from .journal import Journal
from .outbox import Outbox
from .reports import build_event, manifest_event, rejected_event
from .store import InstalledModel, LocalStore
from .swap import Swapper, TrialRunner
from .trust import RootTrust
from .update import ChunkSet, apply_to_file, chunk_bytes_on_disk, space_needed, verify_manifest

log = logging.getLogger("deltafleet.agent.daemon")
MAX_DECODE_STARTS = 2  # decodes of one artifact the agent may die in before refusing it
BATCH = 1024  # chunk indices per request


def soft(what: str, fn: Any, *args: Any) -> bool:
    """Run a durable write whose failure for disk space must not stop the step (rollback,
    failure marks); False (logged) if it could not be written."""
    try:
        fn(*args)
    except OSError as e:
        if not is_no_space(e):
            raise
        log.error("disk full: could not %s (%s); going on", what, e.strerror)
        return False
    return True


def freeze_heap() -> None:
    """Move the long-lived objects (runtimes, models, modules) out of the collector's way, so
    a full collection under request load takes ~1 ms instead of ~20 ms."""
    gc.collect()
    gc.freeze()


class Reporter:
    """Reports into the outbox; if the disk is full, held in memory (in order) and stored when
    space is back (lost only if the agent stops first)."""

    def __init__(self, outbox: Outbox, topic: str, retry_s: float) -> None:
        self.outbox, self.topic, self.retry_s = outbox, topic, retry_s
        self.unsaved: dict[str, bytes] = {}
        self.retry_at = 0.0

    def put(self, eid: str, payload: bytes) -> None:
        if self.unsaved:
            self.unsaved[eid] = payload
            return
        try:
            self.outbox.put(eid, self.topic, payload)
        except OSError as e:
            if not is_no_space(e):
                raise
            log.error("disk full: report %s kept in memory, not in the outbox (%s)", eid,
                      e.strerror)
            self.unsaved[eid] = payload
            self.retry_at = time.monotonic() + self.retry_s

    def store_unsaved(self, now: float) -> None:
        if not self.unsaved or now < self.retry_at:
            return
        for eid, payload in list(self.unsaved.items()):
            try:
                self.outbox.put(eid, self.topic, payload)
            except OSError as e:
                if not is_no_space(e):
                    raise
                self.retry_at = time.monotonic() + self.retry_s
                return
            del self.unsaved[eid]
            log.info("report %s stored in the outbox now that there is space", eid)


class Executor:
    def __init__(self, cfg: AgentConfig, machine: mc.UpdateMachine, *, store: LocalStore,
                 journal: Journal, mqtt: MqttClient, topics: Topics, trust: Any,
                 hardware_id: str | None, swapper: Swapper, trials: TrialRunner,
                 reporter: Reporter) -> None:
        self.cfg, self.machine, self.store, self.journal = cfg, machine, store, journal
        self.mqtt, self.topics, self.trust, self.hardware_id = mqtt, topics, trust, hardware_id
        self.swapper, self.trials, self.reporter = swapper, trials, reporter
        self.chunks: dict[str, tuple[Manifest, ChunkSet]] = {}  # by model
        self._swapped: dict[str, tuple[Any, Any, Any]] = {}  # (previous, session, kept)
        self._journal_behind: set[str] = set()  # models whose journal missed a step (ENOSPC)
        self._chunks_this_run = 0

    # -- driving the machine ---------------------------------------------------------------
    def feed(self, event: Any) -> None:
        self.run(self.machine.handle(event))

    def run(self, effects: list[Any]) -> None:
        skip: set[str] = set()
        for eff in effects:
            if eff.model in skip:
                continue
            outcome = getattr(self, "_do_" + type(eff).__name__)(eff)
            if outcome is None:
                continue
            if isinstance(outcome, mc.OutOfSpace):
                skip.add(eff.model)
            self.feed(outcome)

    def device(self, model: str) -> mc.Device:
        cur = self.store.current(model)
        return mc.Device(mc.Running(cur.sha256, cur.manifest_id) if cur else None,
                         self.store.failed_manifest(model))

    def manifest_event(self, model: str, payload: bytes) -> Any:
        """Verify (update.verify_manifest, steps 1-5): the machine's next event."""
        return manifest_event(
            self.machine, model, payload, self.device(model),
            lambda data, known: verify_manifest(
                data, self.trust, device_id=self.cfg.device_id, hardware_id=self.hardware_id,
                last_serial=self.store.last_serial_of(model), known_ids=known),
            hold_on_signature=isinstance(self.trust, RootTrust))

    def on_chunk(self, sha: str, index: int, data: bytes) -> None:
        for model, (m, cs) in list(self.chunks.items()):
            if m.artifact.sha256 != sha:
                continue
            try:
                accepted = cs.accept(index, data)
            except NoSpace as e:
                self.feed(mc.OutOfSpace(model, str(e), "download", time.monotonic()))
                return
            if accepted:
                self._chunks_this_run += 1
                after = self.cfg.faults.crash_after_chunks
                if after and self._chunks_this_run >= after:
                    os._exit(137)  # fault injection for tests: die mid-download
                if self._chunks_this_run == 2 or cs.total < 2:
                    self._do_CrashPoint(mc.CrashPoint(model, "download"))
                self.feed(mc.ChunkAccepted(model, m.manifest_id, time.monotonic(), len(data)))
                if cs.complete:
                    self.feed(mc.DownloadComplete(model, m.manifest_id, cs.bytes_received(),
                                                  cs.reused))
            elif index < cs.total and index not in cs.have:
                log.warning("chunk %d of %s failed its hash; re-requesting", index, sha[:12])
                self.feed(mc.ChunkBad(model, m.manifest_id, index, time.monotonic()))

    # -- effects ---------------------------------------------------------------------------
    def _do_Log(self, e: mc.Log) -> None:
        log.log(e.level, "%s", e.text)

    def _do_NoteSerial(self, e: mc.NoteSerial) -> Any:
        try:
            self.store.note_serial(e.model, e.serial)
        except OSError as err:
            if not is_no_space(err):
                raise
            return mc.OutOfSpace(e.model, str(err.strerror), "start", time.monotonic())
        return mc.SerialNoted(e.model, e.manifest_id)

    def _do_Inspect(self, e: mc.Inspect) -> Any:
        m = e.manifest
        local = self.store.model_path(m.target_sha256, m.format)
        on_disk = local.exists() and sha256_file(local) == m.target_sha256
        refusal, free, have, reserved = None, 0, 0, 0
        if not on_disk:
            refusal = self.store.artifact_refusal(m.artifact.sha256, decode_limits(self.cfg))
            free = int(shutil.disk_usage(self.cfg.state_dir).free)
            have = chunk_bytes_on_disk(self.store.download_dir(m.artifact.sha256))
            reserved = sum(space_needed(om, have_bytes=cs.bytes_received())
                           for name, (om, cs) in self.chunks.items() if name != e.model)
        return mc.Inspected(e.model, m.manifest_id, on_disk, refusal, free, have, reserved,
                            time.monotonic())

    def _do_Adopt(self, e: mc.Adopt) -> None:
        m = e.manifest
        self.store.activate(InstalledModel(m.model, m.version, m.target_sha256, m.variant,
                                           m.format, m.serial, m.manifest_id))

    def _start_failed(self, e: Any, err: OSError) -> mc.OutOfSpace:
        if not is_no_space(err):
            raise err
        return mc.OutOfSpace(e.model, f"disk full starting the update ({err.strerror}); "
                             "retrying when space is back", "start", time.monotonic())

    def _do_JournalBegin(self, e: mc.JournalBegin) -> Any:
        try:
            self.journal.begin(e.model, e.step, e.raw, e.manifest_id, e.target_sha256,
                               e.previous_sha256)
        except OSError as err:
            return self._start_failed(e, err)
        return None

    def _do_OpenDownload(self, e: mc.OpenDownload) -> Any:
        m = e.manifest
        try:
            cs = ChunkSet(m, self.store.download_dir(m.artifact.sha256))
        except OSError as err:
            return self._start_failed(e, err)
        self.chunks[e.model] = (m, cs)
        return mc.DownloadOpened(e.model, m.manifest_id, cs.reused, cs.bytes_received(),
                                 cs.complete, time.monotonic())

    def _do_JournalStep(self, e: mc.JournalStep) -> Any:
        extra = dict(e.extra)
        if e.trial_window_s is not None:
            extra["trial"] = {"ends_at": time.time() + e.trial_window_s, "restarts": 0}
        try:
            self.journal.advance(e.model, e.step, **extra)
        except OSError as err:
            if not is_no_space(err):
                raise
            if e.space_step is not None:
                return mc.OutOfSpace(e.model, f"disk full while applying ({err.strerror}); "
                                     "retrying when space is back", e.space_step,
                                     time.monotonic())
            if not e.soft:
                raise
            log.error("disk full: journal of %s not advanced to %s (%s)", e.model, e.step,
                      err.strerror)
            self._journal_behind.add(e.model)
        except ValueError:
            if not e.soft or e.model not in self._journal_behind:
                raise
            log.error("journal of %s is behind (an earlier write hit a full disk); %s not "
                      "recorded", e.model, e.step)
        return None

    def _do_JournalClear(self, e: mc.JournalClear) -> None:
        if e.only_manifest_id is not None:
            rec = self.journal.get(e.model)
            if rec is None or rec.get("manifest_id") != e.only_manifest_id:
                return
        self.journal.clear(e.model)
        self._journal_behind.discard(e.model)

    def _do_Subscribe(self, e: mc.Subscribe) -> None:
        self.mqtt.subscribe(self.topics.chunk_filter(e.sha256))

    def _do_Unsubscribe(self, e: mc.Unsubscribe) -> None:
        self.mqtt.unsubscribe(self.topics.chunk_filter(e.sha256))

    def _do_ForgetDownload(self, e: mc.ForgetDownload) -> None:
        self.chunks.pop(e.model, None)

    def _do_DropDownload(self, e: mc.DropDownload) -> None:
        self.store.drop_download(e.sha256)

    def _do_CleanDownloads(self, e: mc.CleanDownloads) -> None:
        for sha in self.store.drop_downloads_except(set(e.keep)):
            log.info("removed the leftover chunks of artifact %s", sha[:12])

    def _do_RequestChunks(self, e: mc.RequestChunks) -> None:
        """Explicit ``indices`` are repairs (a copy arrived and failed its hash), which the
        server answers even if it published them a moment ago."""
        entry = self.chunks.get(e.model)
        if entry is None or entry[0].artifact.sha256 != e.sha256:
            return
        missing = list(e.indices) if e.indices is not None else entry[1].missing()
        for start in range(0, len(missing), BATCH):
            req = ChunkRequest(self.cfg.device_id, e.sha256,
                               tuple(missing[start:start + BATCH]), repair=e.repair)
            self.mqtt.publish(self.topics.chunk_request(self.cfg.device_id), encode(req))

    def _applied(self, e: Any, fn: Any) -> Any:
        try:
            return fn()
        except NoSpace as err:
            return mc.OutOfSpace(e.model, str(err), "apply", time.monotonic())
        except OSError as err:
            if not is_no_space(err):
                raise
            return mc.OutOfSpace(e.model, f"disk full while applying ({err.strerror}); "
                                 "retrying when space is back", "apply", time.monotonic())
        except (UpdateRejected, ModelRuntimeError) as err:
            return mc.ApplyFailed(e.model, e.manifest.manifest_id, str(err))

    def _do_Apply(self, e: mc.Apply) -> Any:
        m = e.manifest
        _, cs = self.chunks.pop(e.model)

        def apply() -> Any:
            artifact = cs.source()  # verified against the signed artifact sha256
            current = self.store.current(m.model)
            base = self.store.model_path(current.sha256, current.format) if current else None
            path = self.store.model_path(m.target_sha256, m.format)
            if not path.exists():  # streamed to disk and verified before it appears
                decode(self.cfg, self.store, m, artifact, base, path)
            return mc.Staged(e.model, m.manifest_id)

        return self._applied(e, apply)

    def _do_SwapIn(self, e: mc.SwapIn) -> Any:
        m = e.manifest

        def swap() -> Any:
            previous = self.store.current(m.model)
            session, kept = self.swapper.swap_in(
                m, self.store.model_path(m.target_sha256, m.format),
                activating=lambda: self.journal.advance(m.model, "activating"),
                activated=lambda: self._do_CrashPoint(mc.CrashPoint(m.model, "activate")))
            self._swapped[m.model] = (previous, session, kept)
            freeze_heap()
            return mc.SwapDone(e.model, m.manifest_id)

        return self._applied(e, swap)

    def _do_StartTrial(self, e: mc.StartTrial) -> Any:
        m = e.manifest
        if e.resumed:
            ok = self.trials.start(m, self.store.previous(m.model))
        else:
            previous, session, kept = self._swapped.pop(m.model, (None, None, None))
            ok = self.trials.start(m, previous, session=session, kept=kept, may_load=False)
        if not ok:
            return mc.TrialNotLoaded(e.model, m.manifest_id)
        return mc.TrialReady(e.model, m.manifest_id, time.monotonic())

    def _do_Judge(self, e: mc.Judge) -> Any:
        return mc.TrialVerdict(e.model, e.manifest_id, self.trials.judge(e.model, final=e.final))

    def _do_EndTrial(self, e: mc.EndTrial) -> None:
        self.trials.end(e.model, close_partner=True)

    def _do_RollBack(self, e: mc.RollBack) -> Any:
        loaded = self.trials.end(e.model, close_partner=False)
        durable, sha = self.swapper.roll_back(e.manifest, loaded)
        return mc.RolledBack(e.model, e.manifest.manifest_id, durable, sha)

    def _do_RollStateBack(self, e: mc.RollStateBack) -> None:
        soft("roll state.json back", self.store.rollback, e.model, e.manifest_id)

    def _do_MarkFailed(self, e: mc.MarkFailed) -> None:
        soft("mark the manifest failed", self.store.mark_failed, e.model, e.manifest_id,
                  e.serial)

    def _do_CrashPoint(self, e: mc.CrashPoint) -> None:
        if self.cfg.faults.crash_at == e.step:
            log.warning("fault injection: SIGKILL at %s", e.step)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    def _running(self, model: str) -> str | None:
        current = self.store.current(model)
        return current.sha256 if current else None

    def _do_Report(self, e: mc.Report) -> None:
        ev = build_event(self.cfg.device_id, e, self._running(e.model) if e.running_sha else None)
        self.reporter.put(ev.event_id, encode(ev))

    def _do_ReportRejected(self, e: mc.ReportRejected) -> None:
        ev = rejected_event(self.cfg.device_id, e.model, e.reason, e.raw, self._running(e.model))
        self.reporter.put(ev.event_id, encode(ev))

    def _do_Reconsider(self, e: mc.Reconsider) -> None:
        self.feed(self.manifest_event(e.model, e.raw))
        self.feed(mc.Reconsidered(e.model, e.why, e.token))


def decode_limits(cfg: AgentConfig) -> dict[str, float]:
    cap = cfg.patch_memory_bytes
    return {"memory_bytes": cap if cap is not None else default_memory_cap_bytes(),
            "timeout_s": cfg.patch_timeout_s}


def decode(cfg: AgentConfig, store: LocalStore, m: Manifest, artifact: ChunkSource,
           base: Path | None, path: Path) -> None:
    """Decode in the contained child (``update.apply_to_file``). A refusal is recorded
    durably for the artifact before it is reported, and so is every start: an agent
    that dies while decoding (power, OOM) tries once more after the restart, then
    refuses the artifact instead of looping."""
    sha = m.artifact.sha256
    if store.note_decode_start(sha) > MAX_DECODE_STARTS:
        reason = (f"decode refused: the agent stopped while decoding this artifact "
                  f"{MAX_DECODE_STARTS} times")
        store.refuse_artifact(sha, reason)
        raise ArtifactRefused(reason)
    limits = decode_limits(cfg)
    try:
        apply_to_file(m, artifact, base, path, max_memory_bytes=int(limits["memory_bytes"]),
                      timeout_s=limits["timeout_s"])
    except DecodeLimitHit as e:
        store.refuse_artifact(sha, str(e), limits=limits)
        raise
    except ArtifactRefused as e:
        store.refuse_artifact(sha, str(e))
        raise
    except OSError as e:
        if not is_no_space(e):
            raise
        raise NoSpace(f"disk full writing the target ({e.strerror}); retrying when space "
                      "is back") from e
    except UpdateRejected as e:  # not the artifact's fault, e.g. ENOSPC in the child
        free = int(shutil.disk_usage(cfg.state_dir).free)
        if free < m.target_size_bytes + cfg.disk_margin_bytes:
            raise NoSpace(f"disk full writing the target ({e}): {free >> 10} KiB free for a "
                          f"{m.target_size_bytes >> 10} KiB target, retrying when space is "
                          "back") from e
        raise
    finally:
        store.decode_done(sha)
