"""Asking devices to benchmark variants (docs/portraits.md).

``request_benchmarks`` (``fleetctl profile bench``) writes one ``bench_requests`` row per
device naming the variants of a version; the server (``due``, every reconcile) builds the
``BenchRequest`` with each file's identity artifact (its chunk hashes, so the device fetches
what it lacks like any artifact and checks every chunk), signs it with the online key that
signs manifests, and publishes it retained on the device's ``benchreq`` topic; while a
request is open its files are served as chunks. A request is closed when every variant has
a result (``fleet.portraits.record_bench_results``) or after ``BENCH_TTL_S``; its retained
message is then cleared.

``auto_requests`` (the daemon, every ``FLEET_AUTO_BENCH_S``) asks by itself: per device type
with an online device, the newest versions' variants no device of the type measured or was
ever asked for, one request to one device of the type, ``AUTO_RUNS`` runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, aliased

from deltafleet.shared import ArtifactRef, SigningKey, Topics
from deltafleet.shared.messages import MAX_BENCH_RUNS, MAX_BENCH_VARIANTS, BenchRequest, BenchVariant

from .audit import audit
from .catalog import variant_option
from .errors import UsageError
from .fleet.portraits import AUTO_REQUEST_PREFIX, device_facts
from .planner import VariantOption
from .rollout.sql import Publish
from .selection import VariantFacts, variant_facts, why_not
from .store.models import (
    Artifact,
    BenchRequestRow,
    Device,
    DeviceBenchmark,
    DevicePortrait,
    Model,
    ModelVersion,
    Variant,
)

__all__ = ["AUTO_MAX_DEVICES", "AUTO_RUNS", "AUTO_WARMUP", "BENCH_TTL_S", "auto_requests", "due",
           "request_benchmarks"]

BENCH_TTL_S = 3600
# automatic requests (auto_requests): fewer runs than `profile bench`'s default (50/5), they
# run unasked on production devices; at most AUTO_MAX_DEVICES requests per sweep
AUTO_RUNS = 20
AUTO_WARMUP = 3
AUTO_MAX_DEVICES = 20
# requests created this long before a variant's file entered the store still count as asked
# for it (clock skew between the host that registered it and the server's)
_ASKED_SKEW = timedelta(hours=1)
_SWEEP_LOCK = 0x6175746F62656E  # PostgreSQL advisory lock: one replica sweeps at a time


def _check_params(options: Sequence[VariantOption], runs: int, warmup: int) -> None:
    if not options:
        raise UsageError("the version has no variants to benchmark")
    if len(options) > MAX_BENCH_VARIANTS:
        raise UsageError(f"at most {MAX_BENCH_VARIANTS} variants per bench request")
    if not 0 < runs <= MAX_BENCH_RUNS or not 0 <= warmup <= MAX_BENCH_RUNS:
        raise UsageError(f"--runs must be 1-{MAX_BENCH_RUNS}, --warmup 0-{MAX_BENCH_RUNS}")


def _add_request(s: Session, device_id: str, options: Sequence[VariantOption], *, runs: int,
                 warmup: int, now: datetime, prefix: str = "b", golden: bool = True) -> str:
    """One ``bench_requests`` row (published by ``due``); returns its id. ``golden``: send
    the variants' golden inputs (one set per request: only when they are of one version)."""
    spec = [{"name": o.name, "sha256": o.sha256, "format": o.format, "size_bytes": o.size_bytes,
             "golden": list(o.golden)[:4] if golden else []} for o in options]
    rid = f"{prefix}{uuid.uuid4().hex[:20]}"
    s.add(BenchRequestRow(id=rid, device_id=device_id, envelope="",
                          variants=[{"runs": runs, "warmup": warmup}, *spec], created_at=now))
    return rid


def request_benchmarks(s: Session, device_ids: Sequence[str], options: Sequence[VariantOption],
                       *, runs: int = 50, warmup: int = 5, now: datetime) -> list[str]:
    """One open request per device for ``options``; returns the request ids."""
    _check_params(options, runs, warmup)
    known = set(s.scalars(select(Device.id).where(Device.id.in_(list(device_ids)))))
    missing = [d for d in device_ids if d not in known]
    if missing:
        raise UsageError(f"unknown device {missing[0]!r} (see `fleetctl device list`)")
    ids = [_add_request(s, device_id, options, runs=runs, warmup=warmup, now=now)
           for device_id in device_ids]
    s.flush()
    return ids


@dataclass(frozen=True, slots=True)
class _Candidate:
    spec: str  # MODEL:VERSION
    version_id: int
    facts: VariantFacts  # .option: the VariantOption
    registered_at: datetime  # when its file entered the store


def _candidates(s: Session) -> list[_Candidate]:
    """The variants of each model's newest (last registered) version, by model and name."""
    newest = aliased(ModelVersion)
    latest = select(func.max(newest.id)).group_by(newest.model_id)
    rows = s.execute(
        select(Variant, Artifact.size_bytes, Artifact.created_at, Model.name,
               ModelVersion.version)
        .join(Artifact, Artifact.sha256 == Variant.artifact_sha256)
        .join(ModelVersion, ModelVersion.id == Variant.version_id)
        .join(Model, Model.id == ModelVersion.model_id)
        .where(Variant.version_id.in_(latest))
        .order_by(Model.name, Variant.name)).all()
    return [_Candidate(f"{name}:{version}", v.version_id,
                       variant_facts(variant_option(v, size), v.info), at)
            for v, size, at, name, version in rows]


def _representatives(s: Session) -> list[tuple[Device, str, dict[str, Any]]]:
    """Per device type, the online device with a portrait and no open bench request seen
    most recently (ties: smallest id), with its type and portrait; the types with the most
    such devices first, then by name. One query."""
    busy = select(BenchRequestRow.device_id).where(BenchRequestRow.done_at.is_(None))
    ranked = (
        select(Device.id.label("device_id"), DevicePortrait.device_type.label("device_type"),
               func.row_number().over(partition_by=DevicePortrait.device_type,
                                      order_by=(Device.last_seen.desc().nulls_last(),
                                                Device.id)).label("rank"),
               func.count().over(partition_by=DevicePortrait.device_type).label("devices"))
        .join(DevicePortrait, DevicePortrait.device_id == Device.id)
        .where(Device.online.is_(True), Device.id.not_in(busy))
        .subquery())
    rows = s.execute(
        select(Device, ranked.c.device_type, DevicePortrait.portrait)
        .join(ranked, ranked.c.device_id == Device.id)
        .join(DevicePortrait, DevicePortrait.device_id == Device.id)
        .where(ranked.c.rank == 1)
        .order_by(ranked.c.devices.desc(), ranked.c.device_type)).all()
    return [(d, t, doc or {}) for d, t, doc in rows]


def auto_requests(s: Session, now: datetime, *, max_devices: int = AUTO_MAX_DEVICES) -> list[str]:
    """Ask one device per device type to benchmark what nobody measured on that type yet;
    returns the request ids (in the caller's session, audited when there are any).

    Candidates: the variants of each model's newest version. For each device type with an
    online device that sent a portrait: the candidates no device of the type measured
    (``device_benchmarks``, an error too) and no bench request to a device of the type ever
    named (a failure or a timeout is not retried), that fit the type's representative
    (``_representatives``) by selection's constraints (``selection.why_not``); at most
    ``MAX_BENCH_VARIANTS`` of them (the rest next sweep) in one request of ``AUTO_RUNS``
    runs. At most ``max_devices`` requests; the other types wait for the next sweep. A fixed
    number of queries, whatever the number of devices or types. On PostgreSQL a replica that
    finds another one sweeping makes none (that one's requests count at the next sweep)."""
    if s.get_bind().dialect.name == "postgresql" and not s.scalar(
            text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _SWEEP_LOCK}):
        return []
    candidates = _candidates(s)
    if not candidates or max_devices <= 0:
        return []
    shas = {c.facts.sha256 for c in candidates}
    measured = {(t, sha) for t, sha in s.execute(
        select(DeviceBenchmark.device_type, DeviceBenchmark.sha256)
        .where(DeviceBenchmark.sha256.in_(shas)).distinct())}
    reps = [r for r in _representatives(s)
            if any((r[1], c.facts.sha256) not in measured for c in candidates)]
    if not reps:
        return []
    since = min(c.registered_at for c in candidates) - _ASKED_SKEW
    asked: set[tuple[str, str]] = set()
    for device_type, variants in s.execute(
            select(DevicePortrait.device_type, BenchRequestRow.variants)
            .join(DevicePortrait, DevicePortrait.device_id == BenchRequestRow.device_id)
            .where(BenchRequestRow.created_at >= since)):
        asked.update((device_type, str(v.get("sha256"))) for v in (variants or [])[1:]
                     if isinstance(v, dict))
    skip = measured | asked
    made: list[dict[str, Any]] = []
    specs: set[str] = set()
    for device, device_type, portrait in reps:
        facts = device_facts(device, device_type, portrait)
        chosen: dict[str, _Candidate] = {}  # by sha256: one file in two models is run once
        for c in candidates:
            key = (device_type, c.facts.sha256)
            if key not in skip and c.facts.sha256 not in chosen and why_not(facts, c.facts) is None:
                chosen[c.facts.sha256] = c
        picked = list(chosen.values())[:MAX_BENCH_VARIANTS]
        if not picked:
            continue
        rid = _add_request(s, device.id, [c.facts.option for c in picked], runs=AUTO_RUNS,
                           warmup=AUTO_WARMUP, now=now, prefix=AUTO_REQUEST_PREFIX,
                           golden=len({c.version_id for c in picked}) == 1)
        made.append({"request_id": rid, "device": device.id, "device_type": device_type,
                     "variants": [f"{c.spec}/{c.facts.name}" for c in picked]})
        specs.update(c.spec for c in picked)
        if len(made) >= max_devices:
            break
    if made:
        s.flush()
        audit(s, "server", "profile.bench.auto", ", ".join(sorted(specs)),
              {"requests": made, "runs": AUTO_RUNS, "warmup": AUTO_WARMUP}, at=now)
    return [m["request_id"] for m in made]


def shas_of(row: BenchRequestRow) -> list[str]:
    return [v["sha256"] for v in row.variants[1:]]


def due(s: Session, key: SigningKey, artifacts: Any, topics: Topics,
        now: datetime) -> tuple[list[Publish], set[str]]:
    """Publish new requests (signed, retained), clear closed ones; the files open requests
    need served. ``artifacts``: the daemon's ``ArtifactChunks`` (chunk hashes)."""
    publishes: list[Publish] = []
    serve: set[str] = set()
    for row in s.scalars(select(BenchRequestRow).where(BenchRequestRow.envelope != "cleared")):
        expired = row.created_at + timedelta(seconds=BENCH_TTL_S) < now
        if row.done_at is not None or expired:
            if row.published_at is not None:
                publishes.append(Publish(topics.bench_request(row.device_id), b"", True))
            row.envelope = "cleared"
            row.done_at = row.done_at or now
            continue
        serve.update(shas_of(row))
        if row.published_at is not None:
            continue
        params, spec = row.variants[0], row.variants[1:]
        variants = []
        for v in spec:
            hashes = tuple(artifacts.hashes(v["sha256"]))
            variants.append(BenchVariant(v["name"], v["sha256"], v["format"], v["size_bytes"],
                                         ArtifactRef("full", "identity", v["sha256"],
                                                     v["size_bytes"], artifacts.chunk_size_bytes,
                                                     hashes)))
        golden = next((tuple(v["golden"]) for v in spec if v.get("golden")), ())
        req = BenchRequest(row.id, row.device_id, int(now.timestamp()),
                           int(now.timestamp()) + BENCH_TTL_S, tuple(variants),
                           int(params["runs"]), int(params["warmup"]), golden)
        payload = key.sign_bytes(req.to_wire())
        row.envelope = payload.decode()
        row.published_at = now
        publishes.append(Publish(topics.bench_request(row.device_id), payload, True))
    s.flush()
    return publishes, serve


def request_json(row: BenchRequestRow) -> dict[str, Any]:
    return {"request_id": row.id, "device": row.device_id,
            "variants": [v["name"] for v in row.variants[1:]],
            "created_at": row.created_at.isoformat(),
            "published_at": row.published_at.isoformat() if row.published_at else None,
            "done_at": row.done_at.isoformat() if row.done_at else None}

