"""The rollout engine: pure. A frozen ``Snapshot`` of one rollout in, ``Decisions`` out.

``step(snapshot, now)`` is one reconcile tick of a rollout; ``on_event(target, policy,
report, now)`` is what one device report does to its target. Neither reads or writes
anything: the SQL adapter (``rollout.sql``) loads the snapshot, calls them and carries the
decisions out in order. States and their legal moves are the tables in ``rollout.states``;
every state a decision names is checked against them (``IllegalTransition``).

Per rollout state, every tick::

    running      add targets for devices that joined the group; release expired holds;
                 time out stuck devices; check the failure threshold (-> pause | abort |
                 rollback); dispatch pending targets of the waves opened so far (respecting
                 --max-concurrent and holds); open the next wave when the current one is
                 settled; complete when every wave is open and every target is terminal.
    paused       expire holds and deadlines; nothing new is dispatched.
    aborting     withdraw the manifests of devices not past downloading (an agent drops a
                 download when its manifest is withdrawn), cancel what has not finished
                 -> aborted.
    rolling_back every device the rollout touched gets a manifest for the model it ran before
                 (a higher serial, never a replay) -> rolled_back when none is reverting.

The wave and threshold rules, the concurrency budget and completion read the snapshot's
counters (targets per wave and state), never a scan of the targets, so a partial snapshot (the
counters plus the targets that need a decision) decides exactly what a whole one does.

Rules:

- A failure (a failed / rejected / rolled_back report, or a timeout) holds the device out for
  ``policy.hold_seconds(attempts)`` (held -> pending) until --max-attempts, then its target
  keeps the failure state for good.
- Offline devices converge when they come back: no manifest is dispatched to an offline device
  (its target waits in pending, shown as "waiting: offline since ..." and sending nothing, and
  takes no --max-concurrent slot) until it says hello again; a notified or reverting target of
  a device that went offline never times out, and a wave whose online devices all have a
  verdict is settled as soon as one device proved the version healthy.
- Bytes are what devices report fetching (``RecordBytes``, from their ``applying`` report:
  0 when the target was already on disk, and from the failure report of a download that
  timed out or failed before applying); a rollback's bytes are kept apart from the
  update's, so the rollout's delta figure survives a rollback.
- A device that runs the target only in a trial (``DeviceView.in_trial``: its last report for
  the model was a trial, e.g. of the rollout it was taken over from) is not "already runs
  it": its target stays pending, saying so, until the trial commits (then healthy) or rolls
  back (then it is dispatched).
- A failure, a timeout and an abort name what the device was doing at the time (its state,
  whether it was online, how far it got: ``activity``).
- With ``--prefer`` (``policy.prefer``) a device's variant is chosen by selection
  (``DeviceView.selecting``: its portrait, benchmarks and its type's baseline); a device no
  variant fits is skipped with the selection's reason and never notified. ``--variant`` wins.
- A device waiting for a reason of its own (too little disk) keeps its state, with no
  deadline and no attempt used.
- A blob of the server's own store that is not intact is never shipped: planning falls back
  (``planner.plan_target``) or the target waits in pending with a ``held: server blob ...``
  reason, and a target still fetching a blob that went bad is taken back to pending with its
  attempt given back. Neither counts as a device failure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from ..phrases import clock, size_text
from ..planner import (
    BlobProblem,
    DeltaOption,
    PlanKind,
    RunningModel,
    Selecting,
    VariantOption,
    all_intact,
    full_artifact,
    hold_reason,
    plan_target,
)
from ..policy import RolloutPolicy
from .states import (
    FAILURE_STATES,
    IN_FLIGHT_STATES,
    PROGRESS_ORDER,
    SUCCESS_STATES,
    TERMINAL_STATES,
    VERDICT_STATES,
    RolloutState,
    TargetState,
    check_move,
    check_rollout_move,
)

T = TargetState
R = RolloutState


# -- what the engine is shown ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TargetView:
    device_id: str
    wave: int
    state: TargetState
    reason: str = ""
    attempts: int = 0
    hold_until: datetime | None = None
    state_deadline: datetime | None = None
    manifest_id: str | None = None
    artifact_sha256: str | None = None
    previous_sha256: str | None = None
    artifact_kind: str | None = None  # of the update's manifest: "full" | "delta"
    artifact_bytes: int | None = None  # its size


@dataclass(frozen=True, slots=True)
class DeviceView:
    device_id: str
    online: bool
    runtimes: Mapping[str, str] = field(default_factory=dict)
    running: RunningModel | None = None  # what it runs of the rollout's model
    in_group: bool = True  # matches the rollout's group selector now
    last_seen: datetime | None = None  # for an offline device: offline since
    # the rollout's --prefer: the selection inputs (portrait, benchmarks, baselines) planning
    # chooses its variant by; None: by format (``planner.choose_variant``)
    selecting: Selecting | None = None
    # ``running`` is in a trial (its last report for the model was one): not proven yet
    in_trial: bool = False


@dataclass(frozen=True, slots=True)
class RollbackOption:
    """A model file a device ran before, as the catalog has it (and present in the store)."""

    version: str
    option: VariantOption


@dataclass(frozen=True, slots=True)
class RolloutView:
    id: int
    state: RolloutState
    policy: RolloutPolicy
    version: str = ""
    current_wave: int = 0
    failures_acknowledged: int = 0
    state_reason: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One rollout and what its decisions depend on. ``deltas``: the smallest stored delta per
    (base, target); ``failed_deltas``: pairs no delta could be built for, with why;
    ``previous``: by model sha256, the versions targets may roll back to; ``blob_problem``:
    None for a blob intact in the server's store, else what is wrong with it.

    A snapshot is either whole (``counts`` None: ``targets`` is every target, and the counters
    are counted from them) or partial: ``counts`` holds, per (wave, state), how many targets
    the rollout has (kept in SQL in the same transaction as every move), and ``targets`` only
    those that may need a decision this tick (due, pending in an open wave, or whatever the
    rollout's state works on). Either way every device in ``devices`` has its target in
    ``targets`` or none at all (a device with none that is ``in_group`` joined the group).
    ``waiting_online``: per wave, how many of its targets without a verdict belong to online
    devices; a wave missing from it is judged by its counters alone (settled only when every
    target is terminal)."""

    rollout: RolloutView
    targets: tuple[TargetView, ...]
    devices: Mapping[str, DeviceView]
    options: tuple[VariantOption, ...] = ()
    deltas: Mapping[tuple[str, str], DeltaOption] = field(default_factory=dict)
    failed_deltas: Mapping[tuple[str, str], str] = field(default_factory=dict)
    previous: Mapping[str, RollbackOption] = field(default_factory=dict)
    blob_problem: BlobProblem = all_intact
    counts: Mapping[tuple[int, str], int] | None = None
    waiting_online: Mapping[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """A device's event, as the engine needs it."""

    state: str
    reason: str = ""
    health: Mapping[str, Any] = field(default_factory=dict)
    # fetched for this manifest: an applying report, or a failure before applying (a
    # download that timed out or failed)
    bytes_received: int | None = None


# -- what the engine decides -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AddTarget:
    device_id: str
    wave: int
    reason: str


@dataclass(frozen=True, slots=True)
class SetTarget:
    """Move a target (checked against the table); its deadline is ``timeout_s`` from now."""

    device_id: str
    state: TargetState
    reason: str
    timeout_s: int | None = None
    hold_until: datetime | None = None
    attempts: int | None = None  # the new count, when it changes
    forget_manifest: bool = False  # events of the manifest sent no longer match
    health: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SetReason:
    """Say why a target waits, leaving its state and deadline alone."""

    device_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RecordVariant:
    """The variant planned for a device; on its first attempt, what it ran before."""

    device_id: str
    option: VariantOption
    record_previous: bool
    previous: RunningModel | None


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Sign and send a manifest for ``option`` (of ``version``) with this artifact, and move the
    target to ``state`` with the state timeout. ``base_sha256`` only for a delta."""

    device_id: str
    state: TargetState
    option: VariantOption
    version: str
    kind: str  # "full" | "delta"
    codec: str
    artifact_sha256: str
    artifact_bytes: int
    base_sha256: str | None
    timeout_s: int
    attempts: int
    warning: str = ""
    note: str = ""  # why this artifact (the planner's reason), shown per device


@dataclass(frozen=True, slots=True)
class RecordBytes:
    """What a device reports it fetched for the manifest it was sent (0: already on disk),
    added to the update's bytes or, while reverting, to the rollback's."""

    device_id: str
    bytes: int
    rollback: bool


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Clear the device's retained manifest of this model."""

    device_id: str


@dataclass(frozen=True, slots=True)
class BuildDelta:
    base_sha256: str
    target_sha256: str
    reference_bytes: int  # the full artifact the delta has to beat


@dataclass(frozen=True, slots=True)
class SetRollout:
    state: RolloutState
    reason: str
    finished: bool = False


@dataclass(frozen=True, slots=True)
class OpenWave:
    wave: int


@dataclass(frozen=True, slots=True)
class Audit:
    action: str
    details: Mapping[str, Any]


Decision = (AddTarget | SetTarget | SetReason | RecordVariant | Dispatch | RecordBytes
            | Withdraw | BuildDelta | SetRollout | OpenWave | Audit)
Decisions = tuple[Decision, ...]


# -- wave and threshold rules ------------------------------------------------------------------
Counts = Mapping[tuple[int, str], int]


def count_targets(targets: Iterable[TargetView]) -> dict[tuple[int, str], int]:
    """The counters of a whole snapshot: targets per (wave, state)."""
    return dict(Counter((t.wave, str(t.state)) for t in targets))


def count_waiting_online(targets: Iterable[TargetView],
                         devices: Mapping[str, DeviceView]) -> dict[int, int]:
    """Per wave, the targets without a verdict whose device is online (whole snapshots)."""
    out: dict[int, int] = {}
    for t in targets:
        out.setdefault(t.wave, 0)
        device = devices.get(t.device_id)
        if t.state not in VERDICT_STATES and device is not None and device.online:
            out[t.wave] += 1
    return out


def failures_breach(counts: Counts, current_wave: int, policy: RolloutPolicy,
                    acknowledged: int) -> tuple[bool, int, int]:
    """(breached?, failures, dispatched) over the waves dispatched so far."""
    dispatched = failures = 0
    for (wave, state), n in counts.items():
        if wave <= current_wave and state != T.SKIPPED:
            dispatched += n
            failures += n if state in FAILURE_STATES else 0
    failures -= acknowledged
    allowed = policy.max_failure_pct / 100 * dispatched
    return failures > 0 and failures > allowed, max(failures, 0), dispatched


def wave_settled(counts: Counts, wave: int, waiting_online: int | None) -> bool:
    """Every online device of ``wave`` has a verdict, and at least one device proved the
    version healthy (a wave whose devices are all offline proves nothing, so it waits).
    ``waiting_online`` None: not known, so only a wave of terminal targets is settled."""
    members = {state: n for (w, state), n in counts.items() if w == wave and n}
    if all(state in TERMINAL_STATES for state in members):
        return True
    return waiting_online == 0 and any(members.get(state, 0) for state in SUCCESS_STATES)


# -- what a device is doing -------------------------------------------------------------------
def offline_since(device: DeviceView | None) -> str:
    """``offline since <time>`` for an offline device, else ""."""
    if device is None or device.online:
        return ""
    return f"offline since {clock(device.last_seen)}"


def activity(t: TargetView, device: DeviceView | None, version: str = "") -> str:
    """What the device was doing for this target, in words: the state, how far it got and
    whether it was online (abort, failure and timeout reasons quote it)."""
    of = f" of {version}" if version else ""
    what = {
        T.PENDING: "not sent the update yet (pending)",
        T.HELD: "held out after a failure",
        T.NOTIFIED: "notified (manifest sent, no progress reported)",
        T.DOWNLOADING: f"downloading the {t.artifact_kind or 'artifact'}"
                       + (f" ({_size(t.artifact_bytes)})" if t.artifact_bytes else ""),
        T.APPLYING: f"applying the update{of}",
        T.TRIAL: f"in its health trial{of}",
        T.REVERTING: "rolling back to the version it ran before",
    }.get(t.state, str(t.state))
    away = offline_since(device)
    return f"{what}, {away}" if away else what


def _size(n: int | None) -> str:
    return size_text(n or 0)


# how a device-reported failure names the phase it happened in
_WHILE = {T.NOTIFIED: "after the manifest, before any progress", T.DOWNLOADING: "downloading",
          T.APPLYING: "applying", T.TRIAL: "in its health trial", T.HELD: "held out"}


# -- the pure functions ------------------------------------------------------------------------
def step(snapshot: Snapshot, now: datetime) -> Decisions:
    """One tick of one rollout."""
    tick = _Tick(snapshot, now)
    state = snapshot.rollout.state
    if state == R.RUNNING:
        tick.run()
    elif state == R.PAUSED:
        tick.expire()
    elif state == R.ABORTING:
        tick.abort()
    elif state == R.ROLLING_BACK:
        tick.expire()
        tick.roll_back()
    tick.hold_for_store()
    return tuple(tick.decisions)


def on_event(target: TargetView, policy: RolloutPolicy, report: Report,
             now: datetime) -> Decisions:
    """What a device's report does to its target. Progress only moves forward; a report on a
    rollback decides it; a failure holds the device out or, after --max-attempts, ends it."""
    decisions = _on_event(target, policy, report, now)
    for d in decisions:
        check_move(target.state, d.state)
    fetched = report.bytes_received
    if fetched is not None and (report.state == T.APPLYING or (
            fetched > 0 and report.state in FAILURE_STATES
            and target.state in (T.NOTIFIED, T.DOWNLOADING, T.REVERTING))):
        return (RecordBytes(target.device_id, fetched, target.state == T.REVERTING),
                *decisions)
    return decisions


def _on_event(t: TargetView, policy: RolloutPolicy, report: Report,
              now: datetime) -> tuple[SetTarget, ...]:
    if report.state == "waiting":
        return (SetTarget(t.device_id, t.state, f"waiting on the device: {report.reason}"),)
    if t.state == T.REVERTING:
        if report.state == T.HEALTHY:
            return (SetTarget(t.device_id, T.REVERTED, "back on the version it ran before"),)
        if report.state in (T.FAILED, T.REJECTED, T.ROLLED_BACK):
            return (SetTarget(t.device_id, T.FAILED, f"rollback failed: {report.reason}"),)
        return ()
    if report.state in PROGRESS_ORDER:
        progress = TargetState(report.state)
        if PROGRESS_ORDER.get(t.state, 9) < PROGRESS_ORDER[progress]:
            window = policy.health_window_s if progress == T.TRIAL else 0
            return (SetTarget(t.device_id, progress, "",
                              timeout_s=policy.state_timeout_s + window),)
        return ()
    health = dict(report.health)
    if report.state == T.HEALTHY:
        return (SetTarget(t.device_id, T.HEALTHY, report.reason, health=health),)
    return (_failure(t, policy, TargetState(report.state), report.reason, now, health,
                     during=_WHILE.get(t.state, "")),)


def _failure(t: TargetView, policy: RolloutPolicy, state: TargetState, reason: str,
             now: datetime, health: Mapping[str, Any] | None = None, *,
             during: str = "") -> SetTarget:
    """Held out for a doubling while, or for good after --max-attempts. ``during``: what the
    device was doing when it failed (``_WHILE``), when ``reason`` does not say it."""
    if t.attempts < policy.max_attempts:
        hold = policy.hold_seconds(t.attempts)
        return SetTarget(t.device_id, T.HELD,
                         f"{state}{' ' + during if during else ''}: {reason} (attempt "
                         f"{t.attempts} of {policy.max_attempts}; retry in {hold} s)",
                         hold_until=now + timedelta(seconds=hold), health=health)
    return SetTarget(t.device_id, state,
                     f"{reason} ({during + '; ' if during else ''}held out after {t.attempts} "
                     "failed attempts)", health=health)


class _Tick:
    """One step's working copy: targets as the decisions so far left them."""

    def __init__(self, snapshot: Snapshot, now: datetime) -> None:
        self.snap = snapshot
        self.now = now
        self.policy = snapshot.rollout.policy
        self.state = snapshot.rollout.state
        self.wave = snapshot.rollout.current_wave
        self.targets = {t.device_id: t for t in snapshot.targets}
        whole = snapshot.counts is None
        self.counts = Counter(count_targets(snapshot.targets) if whole else snapshot.counts)
        self.waiting_online = dict(count_waiting_online(snapshot.targets, snapshot.devices)
                                   if whole else snapshot.waiting_online or {})
        self.decisions: list[Decision] = []

    def count(self, states: Iterable[str], wave: int | None = None) -> int:
        wanted = set(states)
        return sum(n for (w, state), n in self.counts.items()
                   if state in wanted and (wave is None or w == wave))

    def moved(self, device_id: str, wave: int, old: str | None, new: str) -> None:
        """Keep the counters (and the online waiting count) as this tick's decisions move."""
        if old is not None:
            self.counts[(wave, str(old))] -= 1
        self.counts[(wave, str(new))] += 1
        device = self.snap.devices.get(device_id)
        if wave in self.waiting_online and device is not None and device.online:
            was = old is not None and old not in VERDICT_STATES
            now = new not in VERDICT_STATES
            self.waiting_online[wave] += int(now) - int(was)

    # -- recording decisions ------------------------------------------------------------------
    def set(self, device_id: str, to: TargetState, reason: str, **kw: Any) -> None:
        self.apply(SetTarget(device_id, to, reason, **kw))

    def apply(self, d: SetTarget) -> None:
        t = self.targets[d.device_id]
        check_move(t.state, d.state)
        self.moved(t.device_id, t.wave, t.state, d.state)
        self.targets[d.device_id] = replace(
            t, state=d.state, reason=d.reason,
            attempts=t.attempts if d.attempts is None else d.attempts,
            hold_until=d.hold_until or t.hold_until,
            manifest_id=None if d.forget_manifest else t.manifest_id,
            state_deadline=self.now + timedelta(seconds=d.timeout_s) if d.timeout_s else None)
        self.decisions.append(d)

    def set_rollout(self, to: RolloutState, reason: str, *, finished: bool = False) -> None:
        check_rollout_move(self.state, to)
        self.state = to
        self.decisions.append(SetRollout(to, reason, finished))

    # -- the per-state work -------------------------------------------------------------------
    def run(self) -> None:
        for device in self.snap.devices.values():
            if device.device_id not in self.targets and device.in_group:
                reason = "joined the group during the rollout"
                self.targets[device.device_id] = TargetView(device.device_id, self.wave,
                                                            T.PENDING, reason)
                self.moved(device.device_id, self.wave, None, T.PENDING)
                self.decisions.append(AddTarget(device.device_id, self.wave, reason))
        self.expire()
        policy = self.policy
        breached, failures, dispatched = failures_breach(
            self.counts, self.wave, policy, self.snap.rollout.failures_acknowledged)
        if breached:
            reason = (f"{failures} of {dispatched} devices failed, more than the "
                      f"{policy.max_failure_pct:g}% allowed")
            to = {"pause": R.PAUSED, "abort": R.ABORTING,
                  "rollback": R.ROLLING_BACK}[policy.on_failure]
            self.set_rollout(to, reason)
            self.decisions.append(Audit(f"rollout.{policy.on_failure}",
                                        {"reason": reason, "automatic": True}))
            return
        self.dispatch()
        last_wave = policy.wave_count() - 1
        while self.wave < last_wave and wave_settled(self.counts, self.wave,
                                                     self.waiting_online.get(self.wave)):
            self.wave += 1
            self.decisions.append(OpenWave(self.wave))
            self.dispatch()
        total = sum(self.counts.values())
        if self.wave >= last_wave and total and self.count(TERMINAL_STATES) == total:
            # cancelled in a running rollout: taken over by a newer rollout (--supersede)
            failed = total - self.count((T.HEALTHY, T.SKIPPED, T.CANCELLED))
            moved = self.count((T.CANCELLED,))
            why = [f"{failed} device(s) did not update"] * bool(failed) + [
                f"{moved} taken over by a newer rollout"] * bool(moved)
            self.set_rollout(R.COMPLETED, "; ".join(why), finished=True)

    def expire(self) -> None:
        """Release holds that ran out; fail devices stuck in a state past its deadline."""
        for t in list(self.targets.values()):
            if t.state == T.HELD and t.hold_until is not None and t.hold_until <= self.now:
                self.set(t.device_id, T.PENDING, f"retrying after: {t.reason}")
            elif (t.state in IN_FLIGHT_STATES and t.state_deadline is not None
                  and t.state_deadline <= self.now):
                device = self.snap.devices.get(t.device_id)
                if t.state in (T.NOTIFIED, T.REVERTING) and device is not None \
                        and not device.online:
                    continue
                spent = f"timed out after {self.policy.state_timeout_s} s"
                if t.state == T.REVERTING:
                    self.set(t.device_id, T.FAILED, f"rollback {spent}")
                else:
                    doing = activity(t, device, self.snap.rollout.version)
                    self.apply(_failure(t, self.policy, T.FAILED,
                                        f"{spent} in state {t.state}: {doing}", self.now))

    def dispatch(self) -> None:
        in_flight = self.count(IN_FLIGHT_STATES)
        limit = self.policy.max_concurrent
        for t in sorted(self.targets.values(), key=lambda t: (t.wave, t.device_id)):
            if t.state != T.PENDING or t.wave > self.wave:
                continue
            if limit is not None and in_flight >= limit:
                break
            device = self.snap.devices.get(t.device_id)
            if device is not None and device.online and self.plan(t, device):
                in_flight += 1

    def plan(self, t: TargetView, device: DeviceView) -> bool:
        """Plan one pending target; True when a manifest goes out."""
        snap = self.snap
        plan = plan_target(device.runtimes, device.running, snap.options, deltas=snap.deltas,
                           failed_deltas=snap.failed_deltas, blob_problem=snap.blob_problem,
                           pinned=self.policy.variant, selecting=device.selecting)
        v = plan.variant
        if v is None:
            self.set(t.device_id, T.SKIPPED, plan.reason)
            return False
        first = t.attempts == 0
        self.decisions.append(RecordVariant(t.device_id, v, first, device.running))
        if first:
            t = self.targets[t.device_id] = replace(
                t, previous_sha256=device.running.sha256 if device.running else None)
        if plan.kind == PlanKind.NONE:
            if device.in_trial:  # what runs may still roll back: not proven for this rollout
                version = (device.running.version if device.running else None) \
                    or snap.rollout.version
                self.decisions.append(SetReason(
                    t.device_id, f"the device is trying {version} in a trial; healthy once "
                                 "it commits"))
                return False
            self.set(t.device_id, T.HEALTHY, plan.reason)
            return False
        if plan.kind == PlanKind.BUILD:
            assert plan.base_sha256 is not None
            self.decisions.append(BuildDelta(plan.base_sha256, v.sha256, plan.bytes))
            self.decisions.append(SetReason(t.device_id, "building delta"))
            return False
        if plan.kind == PlanKind.HOLD:
            self.set(t.device_id, T.PENDING, plan.reason)
            return False
        assert plan.codec is not None and plan.artifact_sha256 is not None
        self.send(Dispatch(t.device_id, T.NOTIFIED, v, snap.rollout.version, str(plan.kind),
                           plan.codec, plan.artifact_sha256, plan.bytes,
                           plan.base_sha256 if plan.kind == PlanKind.DELTA else None,
                           self.policy.state_timeout_s, t.attempts + 1, plan.warning,
                           plan.reason))
        return True

    def send(self, d: Dispatch) -> None:
        t = self.targets[d.device_id]
        check_move(t.state, d.state)
        self.moved(t.device_id, t.wave, t.state, d.state)
        self.targets[d.device_id] = replace(
            t, state=d.state, reason="", attempts=d.attempts, artifact_sha256=d.artifact_sha256,
            state_deadline=self.now + timedelta(seconds=d.timeout_s))
        self.decisions.append(d)

    def abort(self) -> None:
        version = self.snap.rollout.version
        for t in list(self.targets.values()):
            if t.state in TERMINAL_STATES:
                continue
            device = self.snap.devices.get(t.device_id)
            if t.state in (T.NOTIFIED, T.DOWNLOADING):
                self.decisions.append(Withdraw(t.device_id))
            doing = activity(t, device, version)
            reason = f"rollout aborted while the device was {doing}"
            if t.state == T.NOTIFIED:
                reason += "; manifest withdrawn"
            elif t.state == T.DOWNLOADING:
                reason += ("; manifest withdrawn, download stopped: it keeps the version it "
                           "runs" if device is None or device.online else
                           "; manifest withdrawn: its download gets no more chunks and "
                           "stops at its download timeout, on the version it runs")
            elif t.state in (T.APPLYING, T.TRIAL):
                reason += (f"; it was not stopped and may end on {version}" if version
                           else "; it was not stopped")
            self.set(t.device_id, T.CANCELLED, reason)
        self.set_rollout(R.ABORTED, self.snap.rollout.state_reason, finished=True)

    def roll_back(self) -> None:
        waiting = False  # a target waits for a bad blob of the store to be repaired
        for t in list(self.targets.values()):
            if t.state in (T.REVERTING, T.REVERTED, T.SKIPPED, T.CANCELLED):
                continue
            if t.manifest_id is None:
                self.set(t.device_id, T.CANCELLED, "rollout rolled back before this device")
                continue
            if t.previous_sha256 is None:
                self.decisions.append(Withdraw(t.device_id))
                self.set(t.device_id, T.FAILED, "nothing to roll back to: the device ran no "
                                                "version of this model before")
                continue
            prev = self.snap.previous.get(t.previous_sha256)
            if prev is None:
                self.set(t.device_id, T.FAILED, "the previous model is not in the catalog")
                continue
            option = prev.option
            full = full_artifact(option.sha256, option.size_bytes, option.compressed,
                                 blob_problem=self.snap.blob_problem)
            problem = self.snap.blob_problem(full.sha256)
            if problem is not None:
                self.decisions.append(SetReason(t.device_id, hold_reason(full.sha256, problem)))
                waiting = True
                continue
            warning = ""
            if option.compressed is not None and full.sha256 == option.sha256:
                warning = (f"compressed form {option.compressed.sha256[:12]} of "
                           f"{option.sha256[:12]} is missing or corrupt in the blob store; "
                           "shipping the model as it is")
            self.send(Dispatch(t.device_id, T.REVERTING, option, prev.version, "full",
                               full.codec, full.sha256, full.size_bytes, None,
                               self.policy.state_timeout_s, t.attempts, warning,
                               f"rollback to {prev.version}: full {_size(full.size_bytes)} "
                               "unless the device still has it"))
        if not waiting and not self.count((T.REVERTING,)):
            self.set_rollout(R.ROLLED_BACK, self.snap.rollout.state_reason, finished=True)

    def hold_for_store(self) -> None:
        """Take back to pending the targets still fetching a blob found bad since it was sent:
        they are planned again (a fallback, or the repaired blob under a new manifest). Their
        old manifest's events no longer match, the attempt is given back, and nothing counts
        against the device."""
        if self.state not in (R.RUNNING, R.PAUSED):
            return
        for t in list(self.targets.values()):
            if t.state in (T.NOTIFIED, T.DOWNLOADING) and t.artifact_sha256:
                problem = self.snap.blob_problem(t.artifact_sha256)
                if problem is not None:
                    self.set(t.device_id, T.PENDING, hold_reason(t.artifact_sha256, problem),
                             attempts=max(0, t.attempts - 1), forget_manifest=True)
