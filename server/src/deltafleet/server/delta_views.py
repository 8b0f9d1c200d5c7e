"""Deltas as JSON: what ``fleetctl delta list/show --json`` print and ``GET /api/v1/deltas``
answers (one rendering for both, so the two cannot drift).

A delta's ``state``:

- ``built``: a row of ``deltas`` (its blob is what a rollout ships when ``worth_sending``:
  smaller than the target's full artifact, the compressed model when the catalog has one);
- ``building`` / ``failed``: a pair the running server's builder works on, or gave up on
  (``reason``: no codec beat the full artifact, or the build failed), read from the builder's
  ``deltas.BUILDS_FILE``: as the server last recorded it. These have no ``id``.

Every entry has the same keys (None where the state has no value).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import catalog
from .errors import NotFoundError, UsageError
from .planner import delta_worth_it
from .store.models import Artifact, Delta, Model, ModelVersion, Variant

__all__ = ["STATES", "builds_file", "delta_json", "list_deltas", "show_delta"]

STATES = ("built", "building", "failed")


def builds_file(home: Path) -> Path:
    """Where the server's builder records its pairs in progress and failed (``deltas``)."""
    from .deltas import BUILDS_FILE  # noqa: PLC0415 - the engine loads the codecs

    return home / "work" / BUILDS_FILE


def _labels(session: Session, shas: Iterable[str]) -> dict[str, str]:
    """``model:version/variant`` per model sha256 (the first registered, when shared)."""
    rows = session.execute(
        select(Variant.artifact_sha256, Model.name, ModelVersion.version, Variant.name)
        .join(ModelVersion, ModelVersion.id == Variant.version_id)
        .join(Model, Model.id == ModelVersion.model_id)
        .where(Variant.artifact_sha256.in_(set(shas)))
        .order_by(Variant.id)
    ).all()
    out: dict[str, str] = {}
    for sha, model, version, variant in rows:
        out.setdefault(sha, f"{model}:{version}/{variant}")
    return out


def _entry(session: Session, labels: dict[str, str], base: str, target: str, state: str,
           ) -> dict[str, Any]:
    """The keys every state shares, from the pair; the target's sizes from the store."""
    artifact = session.get(Artifact, target)
    full = catalog.full_artifact(session, target)
    return {
        "id": None, "state": state,
        "base": labels.get(base), "target": labels.get(target),
        "base_sha256": base, "target_sha256": target,
        "codec": None, "artifact_sha256": None, "size_bytes": None,
        "target_size_bytes": artifact.size_bytes if artifact else None,
        "full_artifact_codec": full.codec if full else None,
        "full_artifact_bytes": full.size_bytes if full else None,
        "ratio": None, "worth_sending": None, "build_seconds": None, "created_at": None,
        "reason": None,
    }


def delta_json(session: Session, d: Delta, labels: dict[str, str] | None = None
               ) -> dict[str, Any]:
    """A built delta; ``ratio`` and ``worth_sending`` weigh it against the target's full
    artifact (what a full install ships: the compressed model when the catalog has one)."""
    if labels is None:
        labels = _labels(session, (d.base_sha256, d.target_sha256))
    out = _entry(session, labels, d.base_sha256, d.target_sha256, "built")
    full_bytes = out["full_artifact_bytes"]
    out.update({
        "id": d.id, "codec": d.codec, "artifact_sha256": d.artifact_sha256,
        "size_bytes": d.size_bytes,
        "ratio": round(d.size_bytes / full_bytes, 4) if full_bytes else None,
        "worth_sending": delta_worth_it(d.size_bytes, full_bytes) if full_bytes else None,
        "build_seconds": round(d.build_seconds, 3),
        "created_at": d.created_at.isoformat() if d.created_at else None,
    })
    return out


def _builds(home: Path) -> dict[str, list[dict[str, Any]]]:
    try:
        doc = json.loads(builds_file(home).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no server ran here yet, or it is writing: nothing building or failed
    return doc if isinstance(doc, dict) else {}


def list_deltas(session: Session, home: Path, *, model: str | None = None,
                state: str | None = None) -> list[dict[str, Any]]:
    """Built deltas (by id), then the pairs the server builds, then those it failed to;
    ``model``: only those whose base or target is a version of that model."""
    if state is not None and state not in STATES:
        raise UsageError(f"invalid state {state!r}: use one of {', '.join(STATES)}")
    if model is not None:
        catalog.get_model(session, model)  # the CLI's "unknown model" error
    rows = list(session.scalars(select(Delta).order_by(Delta.id)).all())
    builds = _builds(home)
    pairs = [(kind, p) for kind in ("building", "failed") for p in builds.get(kind) or []
             if isinstance(p, dict) and isinstance(p.get("base_sha256"), str)
             and isinstance(p.get("target_sha256"), str)]
    built = {(d.base_sha256, d.target_sha256) for d in rows}
    labels = _labels(session, {sha for d in rows for sha in (d.base_sha256, d.target_sha256)}
                     | {p[k] for _, p in pairs for k in ("base_sha256", "target_sha256")})
    out = [delta_json(session, d, labels) for d in rows]
    for kind, p in pairs:
        if (p["base_sha256"], p["target_sha256"]) in built:
            continue  # built since (a later server, or `fleetctl delta build`)
        entry = _entry(session, labels, p["base_sha256"], p["target_sha256"], kind)
        entry["reason"] = p.get("reason") if kind == "failed" else None
        entry["created_at"] = p.get("at")
        out.append(entry)

    def of_model(e: dict[str, Any]) -> bool:
        return any((e[k] or "").partition(":")[0] == model for k in ("base", "target"))

    return [e for e in out if (state is None or e["state"] == state)
            and (model is None or of_model(e))]


def show_delta(session: Session, delta_id: int) -> dict[str, Any]:
    d = session.get(Delta, delta_id)
    if d is None:
        raise NotFoundError(f"no delta {delta_id} (see `fleetctl delta list`)")
    return delta_json(session, d)
