"""Asking devices to benchmark variants (docs/portraits.md).

``request_benchmarks`` (``fleetctl profile bench``) writes one ``bench_requests`` row per
device naming the variants of a version; the server (``due``, every reconcile) builds the
``BenchRequest`` with each file's identity artifact (its chunk hashes, so the device fetches
what it lacks like any artifact and checks every chunk), signs it with the online key that
signs manifests, and publishes it retained on the device's ``benchreq`` topic; while a
request is open its files are served as chunks. A request is closed when every variant has
a result (``fleet.portraits.record_bench_results``) or after ``BENCH_TTL_S``; its retained
message is then cleared.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from deltafleet.shared import ArtifactRef, SigningKey, Topics
from deltafleet.shared.messages import MAX_BENCH_RUNS, MAX_BENCH_VARIANTS, BenchRequest, BenchVariant

from .errors import UsageError
from .planner import VariantOption
from .rollout.sql import Publish
from .store.models import BenchRequestRow, Device

__all__ = ["BENCH_TTL_S", "due", "request_benchmarks"]

BENCH_TTL_S = 3600


def request_benchmarks(s: Session, device_ids: Sequence[str], options: Sequence[VariantOption],
                       *, runs: int = 50, warmup: int = 5, now: datetime) -> list[str]:
    """One open request per device for ``options``; returns the request ids."""
    if not options:
        raise UsageError("the version has no variants to benchmark")
    if len(options) > MAX_BENCH_VARIANTS:
        raise UsageError(f"at most {MAX_BENCH_VARIANTS} variants per bench request")
    if not 0 < runs <= MAX_BENCH_RUNS or not 0 <= warmup <= MAX_BENCH_RUNS:
        raise UsageError(f"--runs must be 1-{MAX_BENCH_RUNS}, --warmup 0-{MAX_BENCH_RUNS}")
    known = set(s.scalars(select(Device.id).where(Device.id.in_(list(device_ids)))))
    missing = [d for d in device_ids if d not in known]
    if missing:
        raise UsageError(f"unknown device {missing[0]!r} (see `fleetctl device list`)")
    spec = [{"name": o.name, "sha256": o.sha256, "format": o.format, "size_bytes": o.size_bytes,
             "golden": list(o.golden)[:4]} for o in options]
    ids = []
    for device_id in device_ids:
        rid = f"b{uuid.uuid4().hex[:20]}"
        s.add(BenchRequestRow(id=rid, device_id=device_id, envelope="",
                              variants=[{"runs": runs, "warmup": warmup}, *spec],
                              created_at=now))
        ids.append(rid)
    s.flush()
    return ids


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

