"""Device portraits, on-device benchmarks and the per-type baseline library.

- ``record_portraits``: a device's last ``Portrait`` (already checked field by field by
  ``guard.check_portrait``) with its device type (``selection.device_type_of`` over its
  profile and labels). A portrait from a device never seen (no hello yet) is dropped.
- ``record_bench_results``: the latest figures per (device, model sha256); a request whose
  every variant has a result is marked done.
- ``baselines``: per (device type, sha256) the median of each figure over the devices of the
  type that measured it, with the spread (min, max, devices) and how many of those figures an
  automatic request asked for (``AUTO_REQUEST_PREFIX``): ``fleetctl profile list|show`` and
  selection's second source of figures.
- ``selection_inputs``: what ``selection.select_variant`` needs of a list of devices
  (``device_facts``: one device's constraints, from its portrait and profile).

Each function works in the caller's session and never commits.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from deltafleet.shared.messages import BenchResult, Portrait

from ..guard import check_portrait
from ..planner import Selecting, VariantOption
from ..selection import (
    DeviceFacts,
    Figures,
    Objective,
    device_type_of,
    variant_facts,
    with_parent_accuracy,
)
from ..store.models import BenchRequestRow, Device, DeviceBenchmark, DevicePortrait, Variant

__all__ = ["AUTO_REQUEST_PREFIX", "FIGURE_COLUMNS", "Baseline", "baselines", "device_benchmarks",
           "device_facts", "device_portrait_json", "fleet_devices", "is_auto_request",
           "portrait_of", "record_bench_results", "record_portraits", "selection_inputs"]

INT64_MAX = 2**63 - 1
FIGURE_COLUMNS = ("load_ms", "p50_us", "p95_us", "peak_rss_bytes", "model_rss_bytes",
                  "energy_uj")
_WIRE_FIGURE = {"energy_uj": "energy_uj_per_inference"}
# the id prefix of the bench requests the server makes by itself (bench_requests.auto_requests)
AUTO_REQUEST_PREFIX = "auto-"


def is_auto_request(request_id: str | None) -> bool:
    """Whether figures with this request id came from an automatic bench request."""
    return bool(request_id) and str(request_id).startswith(AUTO_REQUEST_PREFIX)


def type_of(device: Device) -> str:
    return device_type_of(device.labels or {}, device.arch, device.cpu, device.memory_bytes,
                          device.accelerator)


def record_portraits(session: Session, portraits: Sequence[Portrait], now: datetime) -> int:
    """Store each device's latest portrait; returns how many were stored."""
    latest = {p.device_id: p for p in portraits}
    if not latest:
        return 0
    devices = {d.id: d for d in session.scalars(select(Device).where(Device.id.in_(latest)))}
    rows = {r.device_id: r for r in session.scalars(
        select(DevicePortrait).where(DevicePortrait.device_id.in_(latest)))}
    stored = 0
    for device_id, p in latest.items():
        device = devices.get(device_id)
        if device is None:
            continue
        doc = check_portrait(p.portrait)
        row = rows.get(device_id)
        if row is None:
            row = DevicePortrait(device_id=device_id)
            session.add(row)
        row.device_type = type_of(device)
        row.portrait = doc
        row.updated_at = now
        stored += 1
    session.flush()
    return stored


def record_bench_results(session: Session, results: Sequence[BenchResult], now: datetime) -> int:
    """Store the latest figures per (device, sha256); returns how many rows were written."""
    if not results:
        return 0
    ids = {r.device_id for r in results}
    devices = {d.id: d for d in session.scalars(select(Device).where(Device.id.in_(ids)))}
    types = dict(session.execute(select(DevicePortrait.device_id, DevicePortrait.device_type)
                                 .where(DevicePortrait.device_id.in_(ids))).all())
    written = 0
    for r in results:
        device = devices.get(r.device_id)
        if device is None:
            continue
        row = session.get(DeviceBenchmark, (r.device_id, r.sha256))
        if row is None:
            row = DeviceBenchmark(device_id=r.device_id, sha256=r.sha256)
            session.add(row)
        row.device_type = types.get(r.device_id) or type_of(device)
        row.variant, row.request_id = r.variant, r.request_id
        row.runtime, row.runtime_version = r.runtime, r.runtime_version
        for col in FIGURE_COLUMNS:
            value = r.figures.get(_WIRE_FIGURE.get(col, col))
            setattr(row, col, None if r.error or value is None else min(value, INT64_MAX))
        row.runs = min(r.figures.get("runs", 0), 2**31 - 1) if not r.error else None
        row.error = r.error or None
        row.measured_at = now
        written += 1
        req = session.get(BenchRequestRow, r.request_id)
        if req is not None and req.device_id == r.device_id and req.done_at is None:
            have = set(session.scalars(select(DeviceBenchmark.sha256).where(
                DeviceBenchmark.device_id == r.device_id,
                DeviceBenchmark.request_id == r.request_id)))
            if {v["sha256"] for v in req.variants[1:]} <= have | {r.sha256}:
                req.done_at = now
        session.flush()
    return written


def _figures(row: DeviceBenchmark) -> Figures | None:
    if row.error or row.p50_us is None or row.p95_us is None:
        return None
    return Figures(p50_us=row.p50_us, p95_us=row.p95_us, load_ms=row.load_ms or 0,
                   model_rss_bytes=row.model_rss_bytes, energy_uj=row.energy_uj)


def device_benchmarks(session: Session, device_ids: Iterable[str]) -> dict[str, list[DeviceBenchmark]]:
    ids = list(device_ids)
    out: dict[str, list[DeviceBenchmark]] = {i: [] for i in ids}
    for i in range(0, len(ids), 500):
        for row in session.scalars(select(DeviceBenchmark)
                                   .where(DeviceBenchmark.device_id.in_(ids[i:i + 500]))
                                   .order_by(DeviceBenchmark.device_id, DeviceBenchmark.variant)):
            out[row.device_id].append(row)
    return out


@dataclass(frozen=True, slots=True)
class Baseline:
    """One (device type, sha256) entry of the library: medians and spread over devices;
    ``auto``: how many of those devices measured it on an automatic request."""

    device_type: str
    sha256: str
    variant: str
    devices: int
    median: dict[str, int | None]
    spread: dict[str, tuple[int, int] | None]  # figure -> (min, max)
    auto: int = 0

    def figures(self) -> Figures | None:
        m = self.median
        if m.get("p50_us") is None or m.get("p95_us") is None:
            return None
        return Figures(p50_us=int(m["p50_us"] or 0), p95_us=int(m["p95_us"] or 0),
                       load_ms=int(m.get("load_ms") or 0),
                       model_rss_bytes=m.get("model_rss_bytes"), energy_uj=m.get("energy_uj"),
                       devices=self.devices)

    def to_json(self) -> dict[str, Any]:
        return {"device_type": self.device_type, "sha256": self.sha256, "variant": self.variant,
                "devices": self.devices, "auto": self.auto, "median": self.median,
                "spread": {k: list(v) if v else None for k, v in self.spread.items()}}


def baselines(session: Session, device_type: str | None = None) -> list[Baseline]:
    """The baseline library (or one type's part of it), by type then variant name. Reads
    columns, not ORM rows: the library may span every device of the fleet."""
    cols = [getattr(DeviceBenchmark, c) for c in FIGURE_COLUMNS]
    q = select(DeviceBenchmark.device_type, DeviceBenchmark.sha256, DeviceBenchmark.variant,
               *cols, DeviceBenchmark.request_id).where(DeviceBenchmark.error.is_(None))
    if device_type is not None:
        q = q.where(DeviceBenchmark.device_type == device_type)
    groups: dict[tuple[str, str], list[Any]] = {}
    for row in session.execute(q):
        groups.setdefault((row[0], row[1]), []).append(row)
    out = []
    for (t, sha), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1][0][2])):
        median: dict[str, int | None] = {}
        spread: dict[str, tuple[int, int] | None] = {}
        for i, col in enumerate(FIGURE_COLUMNS, start=3):
            values = [r[i] for r in rows if r[i] is not None]
            median[col] = int(statistics.median(values)) if values else None
            spread[col] = (min(values), max(values)) if values else None
        out.append(Baseline(t, sha, rows[0][2], len(rows), median, spread,
                            sum(is_auto_request(r[-1]) for r in rows)))
    return out


def fleet_devices(session: Session, device_ids: Sequence[str]) -> list[Device]:
    """The devices with these ids, by id (for ``selection_inputs``)."""
    return list(session.scalars(select(Device).where(Device.id.in_(list(device_ids)))
                                .order_by(Device.id)))


def portrait_of(session: Session, device_id: str) -> DevicePortrait | None:
    return session.get(DevicePortrait, device_id)


def device_portrait_json(session: Session, device_id: str) -> dict[str, Any]:
    """``portrait`` (None before the first) and ``benchmarks`` for ``device show``."""
    p = portrait_of(session, device_id)
    rows = device_benchmarks(session, [device_id])[device_id]
    return {
        "portrait": None if p is None else {"device_type": p.device_type, "portrait": p.portrait,
                                            "updated_at": p.updated_at.isoformat()},
        "benchmarks": [{"variant": r.variant, "sha256": r.sha256, "runtime": r.runtime,
                        "runtime_version": r.runtime_version, "request_id": r.request_id,
                        **{c: getattr(r, c) for c in FIGURE_COLUMNS}, "runs": r.runs,
                        "error": r.error, "measured_at": r.measured_at.isoformat()}
                       for r in rows],
    }


def device_facts(d: Device, device_type: str | None, portrait: dict[str, Any] | None
                 ) -> DeviceFacts:
    """A device's constraints as selection sees them: accelerators, available memory and
    free disk from its portrait (``device_type`` None: it sent none), else its profile."""
    doc = portrait or {}
    accelerators = set(doc.get("accelerators") or ["cpu"])
    if device_type is None and d.accelerator:  # no portrait: the static profile's word
        accelerators.add(d.accelerator.lower())
    mem = (doc.get("memory") or {}).get("available_bytes")
    disk = (doc.get("disk") or {}).get("free_bytes", d.disk_free_bytes)
    return DeviceFacts(d.id, device_type or type_of(d), dict(d.runtimes or {}),
                       frozenset(accelerators), mem if mem is not None else d.memory_bytes, disk)


def selection_inputs(session: Session, devices: Sequence[Device]
                     ) -> tuple[dict[str, DeviceFacts], dict[str, dict[str, Figures]],
                                dict[tuple[str, str], Figures]]:
    """Per device id its ``DeviceFacts``, its own figures by sha256, and the baselines of
    the devices' types (columns, no ORM rows: by batches of 500 ids, or one scan of each
    table for more than 2,000 devices)."""
    ids = [d.id for d in devices]
    wanted = set(ids)
    portraits: dict[str, tuple[str, dict[str, Any]]] = {}
    own: dict[str, dict[str, Figures]] = {}
    # many ids: one scan of each table, filtered here, beats batches of IN (...)
    batches = [ids[i:i + 500] for i in range(0, len(ids), 500)] if len(ids) <= 2000 else [None]
    for batch in batches:
        pq = select(DevicePortrait.device_id, DevicePortrait.device_type, DevicePortrait.portrait)
        bq = (select(DeviceBenchmark.device_id, DeviceBenchmark.sha256, DeviceBenchmark.p50_us,
                     DeviceBenchmark.p95_us, DeviceBenchmark.load_ms,
                     DeviceBenchmark.model_rss_bytes, DeviceBenchmark.energy_uj)
              .where(DeviceBenchmark.error.is_(None)))
        if batch is not None:
            pq = pq.where(DevicePortrait.device_id.in_(batch))
            bq = bq.where(DeviceBenchmark.device_id.in_(batch))
        for device_id, dtype, doc in session.execute(pq):
            if device_id in wanted:
                portraits[device_id] = (dtype, doc or {})
        for device_id, sha, p50, p95, load, rss, energy in session.execute(bq):
            if p50 is not None and p95 is not None and device_id in wanted:
                own.setdefault(device_id, {})[sha] = Figures(p50, p95, load or 0, rss, energy)
    facts = {d.id: device_facts(d, *portraits.get(d.id, (None, {}))) for d in devices}
    types = {f.device_type for f in facts.values()}
    base = {(b.device_type, b.sha256): f for b in baselines(session)
            if b.device_type in types and (f := b.figures()) is not None}
    return facts, own, base


def selecting_for(session: Session, version_id: int, options: Sequence[VariantOption],
                  devices: Sequence[Device], objective: Objective) -> dict[str, Selecting]:
    """Per device id the planner's ``Selecting`` for a version's variants: what `rollout plan
    --prefer` and dispatch (``rollout.load``, once per tick for the devices it loaded) hand
    ``planner.plan_target``. A fixed number of queries, whatever the number of devices."""
    if not devices:
        return {}
    infos: dict[int, Any] = dict(session.execute(
        select(Variant.id, Variant.info).where(Variant.version_id == version_id)).all())
    facts = with_parent_accuracy(
        {o.variant_id: variant_facts(o, infos.get(o.variant_id)) for o in options}, infos)
    device_facts, own, base = selection_inputs(session, devices)
    return {d.id: Selecting(device_facts[d.id], facts, objective, own.get(d.id), base)
            for d in devices}
