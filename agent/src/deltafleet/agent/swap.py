"""Runtime side of an update: load, check, warm and swap a model in; run its trial; put the
previous model back. The decisions are the update machine's (``machine``); this module only
does what it is told, with real runtimes.

Swap: warm (the new model loads beside the old one, then one pointer flip) when MemAvailable
holds ``swap_memory_factor`` x the model file, else cold (unload first; requests are held, not
failed, during the gap). Either way the journal's ``activating`` step and state.json are
written between load + IO check + warm-up and the flip.

Trial: the previous version stays loaded beside the new one when memory allows, for paired
latency probes at the end of the window (``latency.sample_pairs``) and, with an agreement gate
(``min_agreement_ppm``), for the shadow that reruns a sample of live requests on it
(``latency.Shadow``); when a cold swap had to unload it, its answers on the golden inputs are
recorded first and the new model is compared with those. Too few requests are topped up with
golden/zero probes; ``trial.evaluate`` judges.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltafleet.shared import HealthPolicy, Manifest, sha256_file

from .config import AgentConfig
from .errors import ModelRuntimeError, UpdateRejected
from .latency import Shadow, compare_outputs, recorded_agreement, sample_pairs
from .profile import mem_available_bytes
from .runtime import LoadedModel, load_model
from .serving import (
    Serving,
    Session,
    _batch_of,
    check_outputs,
    decode_golden,
    io_difference,
    io_signature,
    probe_feeds,
)
from .store import InstalledModel, LocalStore
from .trial import MIN_PAIRS, Agreement, Verdict, evaluate

log = logging.getLogger(__name__)
PROBE_BUDGET_S = 5.0
PAIR_BUDGET_S = 10.0  # longest the paired old/new latency probes of one trial take


@dataclass
class TrialRun:
    manifest: Manifest
    session: Session
    policy: HealthPolicy
    golden: list[Any] = field(default_factory=list)
    partner: Session | None = None  # the previous version, kept loaded for paired probes
    unjudged: str = ""  # why latency cannot be judged although the policy asks for it
    shadow: Shadow | None = None  # the agreement gate's sampler of live requests
    # (inputs, outputs) of the previous version on the golden inputs, taken before a cold
    # swap unloaded it: the agreement gate's reference when both cannot be held
    recorded: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)


def golden_of(m: Manifest) -> list[Any]:
    try:
        return decode_golden(m.golden_inputs)
    except (ValueError, TypeError, KeyError) as e:
        raise UpdateRejected(f"golden inputs do not decode: {e}") from e


class Swapper:
    def __init__(self, cfg: AgentConfig, store: LocalStore, serving: Serving,
                 soft: Callable[..., bool]) -> None:
        self.cfg, self.store, self.serving, self._soft = cfg, store, serving, soft
        # per model: the previous version's answers on the golden inputs, taken before a
        # cold swap unloaded it (the agreement gate's reference; ``TrialRunner.start``)
        self.recorded: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}

    def load_verified(self, inst: InstalledModel) -> LoadedModel:
        path = self.store.model_path(inst.sha256, inst.format)
        if not path.is_file() or sha256_file(path) != inst.sha256:
            raise ModelRuntimeError(f"{path.name} is missing or does not match its sha256")
        model = load_model(path, inst.format)
        try:
            self.warm_up(model, [])
        except ModelRuntimeError:
            model.close()
            raise
        return model

    def warm_up(self, model: LoadedModel, golden: list[Any], runs: int | None = None) -> None:
        for _ in range(max(1, runs if runs is not None else self.cfg.warmup_runs)):
            for feeds in probe_feeds(model, golden):
                check_outputs(model, model.run(feeds), _batch_of(feeds))

    def check_io(self, m: Manifest, model: LoadedModel, old_sig: dict[str, Any] | None) -> None:
        sig = io_signature(model)
        if m.io_signature is not None:
            diff = io_difference(sig, m.io_signature)
            if diff:
                raise UpdateRejected(f"model does not match the signed IO signature: {diff}")
        if old_sig is not None and not m.allow_io_change:
            diff = io_difference(sig, old_sig)
            if diff:
                raise UpdateRejected(f"IO contract changed ({diff}) and the manifest does not "
                                     "allow it (allow_io_change)")

    def swap_mode(self, path: Path) -> str:
        if self.cfg.swap_mode != "auto":
            return self.cfg.swap_mode
        free = mem_available_bytes()
        need = self.cfg.swap_memory_factor * path.stat().st_size
        return "cold" if free is not None and free < need else "warm"

    def swap_in(self, m: Manifest, path: Path, activating: Callable[[], object],
                activated: Callable[[], None]) -> tuple[Session, Session | None]:
        """Load, check and warm the new model, then flip to it (warm or cold swap).
        ``activating`` writes the journal step before state.json; ``activated`` runs after
        the activation (a crash point). Returns the new session and, after a warm swap, the
        previous one, still loaded (the trial compares the two; the caller closes it)."""
        golden = golden_of(m)
        old = self.serving.current(m.model)
        old_sig = io_signature(old.model) if old is not None else None
        new_inst = InstalledModel(m.model, m.version, m.target_sha256, m.variant, m.format,
                                  m.serial, m.manifest_id)

        def prepare() -> LoadedModel:
            model = load_model(path, m.format)
            try:
                self.check_io(m, model, old_sig)
                self.warm_up(model, golden)
            except BaseException:
                model.close()
                raise
            return model

        def activate(model: LoadedModel) -> None:
            try:  # state.json is put back in memory if its write fails (ENOSPC)
                activating()
                self.store.activate(new_inst)
            except BaseException:
                model.close()
                raise

        if self.swap_mode(path) == "warm" or old is None:
            model = prepare()
            activate(model)
            activated()
            session = Session(model, m.version, m.target_sha256)
            return session, self.serving.slot(m.model).flip(session)
        log.info("cold swap of %s: unloading %s first", m.model, old.version)
        if HealthPolicy.from_manifest(m.health_policy).judges_agreement and golden:
            self.recorded[m.model] = record_outputs(old.model, golden)
        slot = self.serving.slot(m.model)
        slot.close_gap()
        try:
            previous = slot.flip(None)
            if previous is not None:
                previous.drain_and_close()
            try:
                model = prepare()
                activate(model)
            except BaseException:
                prev_inst = self.store.current(m.model)
                if prev_inst is not None:
                    slot.flip(Session(self.load_verified(prev_inst), prev_inst.version,
                                      prev_inst.sha256))
                raise
            activated()
            session = Session(model, m.version, m.target_sha256)
            slot.flip(session)
            return session, None
        finally:
            slot.open_gap()

    def roll_back(self, m: Manifest, loaded: Session | None) -> tuple[bool, str | None]:
        """Put the previous model back in service (warm when memory allows, at once when the
        trial kept it ``loaded``). Returns whether state.json says so (durable) and the sha256
        of what runs now."""
        durable = True
        current = self.store.current(m.model)
        if current is not None and current.sha256 == m.target_sha256:
            prev = self.store.previous(m.model)
            if prev is not None:
                path = self.store.model_path(prev.sha256, prev.format)
                if loaded is not None and loaded.sha256 == prev.sha256:
                    durable = self._soft("roll state.json back", self.store.rollback,
                                         m.model, m.manifest_id)
                    self.serving.install(m.model, loaded.model, prev.version, prev.sha256)
                    loaded = None
                elif self.swap_mode(path) == "warm":
                    model = self.load_verified(prev)
                    durable = self._soft("roll state.json back", self.store.rollback,
                                         m.model, m.manifest_id)
                    self.serving.install(m.model, model, prev.version, prev.sha256)
                else:
                    self.serving.install_cold(m.model, lambda: self.load_verified(prev),
                                              prev.version, prev.sha256)
                    durable = self._soft("roll state.json back", self.store.rollback,
                                         m.model, m.manifest_id)
            else:  # first install failed its trial: nothing to go back to but the fallback
                old = self.serving.slot(m.model).flip(None)
                durable = self._soft("roll state.json back", self.store.rollback, m.model,
                                     m.manifest_id)
                if old is not None:
                    old.drain_and_close()
        else:
            durable = self._soft("mark the manifest failed", self.store.mark_failed, m.model,
                                 m.manifest_id, m.serial)
        if loaded is not None:
            loaded.drain_and_close()
        # what runs now (state.json; what serves if state.json could not be written)
        now = self.store.current(m.model) if durable else self.serving.current(m.model)
        return durable, now.sha256 if now else None


class TrialRunner:
    """The runtime side of trials: sessions, pairing partners, probes, samples."""

    def __init__(self, swapper: Swapper, defaults: HealthPolicy) -> None:
        self.swapper, self.defaults = swapper, defaults
        self.runs: dict[str, TrialRun] = {}

    def start(self, m: Manifest, previous: InstalledModel | None, *,
              session: Session | None = None, kept: Session | None = None,
              may_load: bool = True) -> bool:
        """False if the new model is not loaded (the trial cannot run)."""
        session = session or self.swapper.serving.current(m.model)
        if session is None:
            if kept is not None:
                kept.drain_and_close()
            return False
        policy = HealthPolicy.from_manifest(m.health_policy, self.defaults)
        partner, unjudged = self._pairing_partner(policy, session, kept, previous,
                                                  may_load=may_load)
        recorded = self.swapper.recorded.pop(m.model, [])
        shadow = None
        if policy.judges_agreement and partner is not None:
            shadow = Shadow(partner.model, name=f"shadow-{m.model}")
            session.shadow = shadow.offer
        self.runs[m.model] = TrialRun(m, session, policy, golden_of(m), partner, unjudged,
                                      shadow, recorded)
        return True

    def _pairing_partner(self, policy: HealthPolicy, new: Session, kept: Session | None,
                         previous: InstalledModel | None, *,
                         may_load: bool) -> tuple[Session | None, str]:
        """The previous version, loaded beside the new one for the trial's paired latency
        probes (``kept`` from a warm swap, or loaded now after a restart when memory allows
        it, by the swap's own rule); else None and why latency cannot be judged."""
        why = ""
        sw = self.swapper
        if not policy.judges_latency and not policy.judges_agreement:
            why = "off"
        elif kept is None:
            if previous is None:
                why = "no previous version to compare with"
            elif not may_load:
                why = "the previous version was unloaded for a cold swap"
            elif sw.swap_mode(sw.store.model_path(previous.sha256, previous.format)) != "warm":
                why = "not enough memory to load the previous version beside the new one"
            else:
                try:
                    kept = Session(sw.load_verified(previous), previous.version,
                                   previous.sha256)
                except ModelRuntimeError as e:
                    why = f"the previous version does not load: {e}"
        if kept is not None and not why and io_difference(io_signature(kept.model),
                                                          io_signature(new.model)):
            why = "the IO contract changed"
        if why and kept is not None:
            kept.drain_and_close()
            kept = None
        return kept, why

    def judge(self, model: str, *, final: bool) -> Verdict | None:
        trial = self.runs.get(model)
        if trial is None:
            return None
        stats = trial.session.stats
        pairs: list[tuple[int, int]] = []
        golden_agree: tuple[float, int] = (0.0, 0)
        if final:
            if trial.partner is not None:  # interleaved old/new calls on the same inputs
                feeds_list = probe_feeds(trial.session.model, trial.golden)
                if trial.policy.judges_latency:
                    pairs = sample_pairs(trial.partner.model, trial.session.model, feeds_list,
                                         max(trial.policy.min_requests, MIN_PAIRS),
                                         budget_s=PAIR_BUDGET_S, on_new=stats.record)
                golden_agree = _agreement_on(trial.partner.model, trial.session.model,
                                             feeds_list)
            elif trial.recorded:
                golden_agree = recorded_agreement(trial.session.model, trial.recorded)
            requests, _, _ = stats.snapshot()
            if requests < trial.policy.min_requests:
                probe(trial.session.model, trial.golden,
                      trial.policy.min_requests - requests, trial.session)
            if trial.shadow is not None:
                trial.shadow.wait_idle()
        agreement = _agreement(trial, golden_agree)
        requests, errors, _ = stats.snapshot()
        verdict = evaluate(requests, errors, trial.policy, final=final, pairs=pairs,
                           unjudged=trial.unjudged, agreement=agreement)
        return verdict

    def end(self, model: str, *, close_partner: bool) -> Session | None:
        """Forget the trial of ``model``; its partner (closed, or returned for a rollback)."""
        trial = self.runs.pop(model, None)
        if trial is not None and trial.shadow is not None:
            trial.session.shadow = None
            trial.shadow.stop()
        partner = trial.partner if trial else None
        if close_partner and partner is not None:
            partner.drain_and_close()
            return None
        return partner


def _agreement_on(old: LoadedModel, new: LoadedModel,
                  feeds_list: list[dict[str, Any]]) -> tuple[float, int]:
    agree, total = 0.0, 0
    for feeds in feeds_list:
        try:
            got, n = compare_outputs(old.run(feeds), new.run(feeds))
        except ModelRuntimeError:
            continue
        agree, total = agree + got, total + n
    return agree, total


def _agreement(trial: TrialRun, golden: tuple[float, int]) -> Agreement | None:
    """What the trial measured of output agreement: shadowed live requests plus golden inputs
    (beside the previous model, or against its recorded answers). None when nothing was
    compared."""
    agree, compared = golden
    samples = compared and len(trial.golden) or 0
    source = "golden inputs" if not trial.recorded or trial.partner else \
        "golden inputs against the previous version's recorded answers"
    if trial.shadow is not None:
        s_agree, s_compared, s_samples = trial.shadow.counts()
        agree, compared, samples = agree + s_agree, compared + s_compared, samples + s_samples
        source = "shadowed live requests and golden inputs"
        dropped = trial.shadow.dropped
    else:
        dropped = 0
    if not compared:
        return None
    return Agreement(int(round(1_000_000 * agree / compared)), samples, source, dropped)


def record_outputs(model: LoadedModel, golden: list[dict[str, Any]]
                   ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The model's answers on the golden inputs (before it is unloaded)."""
    out = []
    for feeds in golden:
        try:
            out.append((feeds, model.run(feeds)))
        except ModelRuntimeError:
            continue
    return out


def probe(model: LoadedModel, golden: list[Any], n: int, session: Session | None) -> list[int]:
    """Run ``n`` golden/zero inferences (bounded in time); count them on ``session``."""
    feeds_list = probe_feeds(model, golden)
    samples: list[int] = []
    deadline = time.monotonic() + PROBE_BUDGET_S
    for i in range(n):
        feeds = feeds_list[i % len(feeds_list)]
        t0 = time.perf_counter()
        ok = True
        try:
            check_outputs(model, model.run(feeds), _batch_of(feeds))
        except ModelRuntimeError:
            ok = False
        us = int((time.perf_counter() - t0) * 1e6)
        if ok:
            samples.append(us)
        if session is not None:
            session.stats.record(us, ok)
        if time.monotonic() > deadline:
            break
    return samples

