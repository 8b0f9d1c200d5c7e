"""The blob store's integrity: what depends on a blob, `fleetctl store verify` and its repairs.

A blob is named by its sha256, so "intact" means "hashes to its name". What depends on it:

- a model file (artifact kind ``model``): the variants registered with it, the compressed form
  and the deltas built from or to it;
- a compressed form (``compressed``): the variants whose full installs ship it;
- a delta (``delta``): the cached (base -> target) pair;
- and every active rollout whose version ships or needs one of those, or whose targets were
  sent the blob.

Repairs, each written back under the blob's own name (``BlobStore.restore_file``, atomic) so
the signed manifests already sent stay valid:

- a compressed form: rebuilt from its intact model file (zstd at the recorded level);
- a delta: rebuilt from its intact base and target with the codec it was built with, round-
  tripped by ``codecs.choose``;
- a model file: copied from a file the operator names (``--from``) that hashes to it; a model
  file has no other source in the store.

A rebuilt blob that comes out with another sha256 (a different zstd version) is recorded as
the new form or delta and the corrupt one forgotten; targets that were sent the old one are
held and re-planned by the server.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from deltafleet.codecs import CodecError
from deltafleet.shared import sha256_file

from .catalog import COMPRESSED_KIND, compressed_artifact
from .store import BlobCheck, BlobStore, BlobVerifier
from .store.models import Artifact, Delta, Model, ModelVersion, Rollout, RolloutTarget, Variant

log = logging.getLogger(__name__)

ACTIVE = ("running", "paused", "aborting", "rolling_back")
_NO_LIMIT_BYTES = 1 << 62


@dataclass
class Dependents:
    variants: list[str] = field(default_factory=list)  # "detector:v2/default (model file)"
    deltas: list[str] = field(default_factory=list)  # "delta 1a2b3c4d5e6f -> 7a8b9c0d1e2f"
    rollouts: list[str] = field(default_factory=list)  # "rollout 3 (running)"

    def to_json(self) -> dict[str, list[str]]:
        return {"variants": self.variants, "deltas": self.deltas, "rollouts": self.rollouts}

    def summary(self) -> str:
        parts = self.variants + self.deltas + self.rollouts
        return "; ".join(parts) if parts else "nothing in the catalog"


def dependents(s: Session, sha: str) -> Dependents:
    """What in the catalog and in active rollouts needs blob ``sha``."""
    out = Dependents()
    versions: set[int] = set()
    rows = s.execute(select(Variant, ModelVersion.version, Model.name)
                     .join(ModelVersion, ModelVersion.id == Variant.version_id)
                     .join(Model, Model.id == ModelVersion.model_id)
                     .order_by(Variant.id)).all()
    for v, version, name in rows:
        form = compressed_artifact(v.info)
        if v.artifact_sha256 == sha:
            out.variants.append(f"{name}:{version}/{v.name} (model file)")
            versions.add(v.version_id)
        elif form is not None and form.sha256 == sha:
            out.variants.append(f"{name}:{version}/{v.name} (compressed form)")
            versions.add(v.version_id)
    for d in s.scalars(select(Delta).where(or_(Delta.artifact_sha256 == sha,
                                               Delta.base_sha256 == sha,
                                               Delta.target_sha256 == sha))
                       .order_by(Delta.id)):
        role = ("" if d.artifact_sha256 == sha else
                " (its base)" if d.base_sha256 == sha else " (its target)")
        out.deltas.append(f"delta {d.base_sha256[:12]} -> {d.target_sha256[:12]} "
                          f"({d.codec}){role}")
        if d.artifact_sha256 == sha:
            versions.update(s.scalars(select(Variant.version_id)
                                      .where(Variant.artifact_sha256 == d.target_sha256)))
    sent = select(RolloutTarget.rollout_id).where(RolloutTarget.artifact_sha256 == sha)
    for r in s.scalars(select(Rollout).where(Rollout.state.in_(ACTIVE),
                                             or_(Rollout.version_id.in_(versions),
                                                 Rollout.id.in_(sent)))
                       .order_by(Rollout.id)):
        held = s.scalar(select(RolloutTarget.id).where(
            RolloutTarget.rollout_id == r.id, RolloutTarget.reason.like(f"%{sha[:12]}%")).limit(1))
        out.rollouts.append(f"rollout {r.id} ({r.state}{', targets held' if held else ''})")
    return out


def hold_reason(check: BlobCheck) -> str:
    """What a target waiting on a bad blob says (``fleetctl rollout status``)."""
    word = "missing" if check.missing else "corrupt"
    return f"held: server blob {check.sha256[:12]} {word} (store)"


# -- fleetctl store verify -------------------------------------------------------------------
@dataclass
class BlobReport:
    sha256: str
    kind: str
    size_bytes: int
    status: str  # ok | corrupt | missing | repaired
    problem: str = ""
    dependents: Dependents = field(default_factory=Dependents)
    repair: str = ""  # what --repair did, or what the operator has to do

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "kind": self.kind, "size_bytes": self.size_bytes,
                "status": self.status, "problem": self.problem,
                "dependents": self.dependents.to_json(), "repair": self.repair}


def verify_store(s: Session, blobs: BlobStore, chunk_size_bytes: int) -> list[BlobReport]:
    """Re-hash every blob the catalog knows (artifacts rows); one report each."""
    verifier = BlobVerifier(blobs, chunk_size_bytes)
    out = []
    for a in s.scalars(select(Artifact).order_by(Artifact.kind, Artifact.sha256)):
        check = verifier.check(a.sha256)
        status = "ok" if check.ok else ("missing" if check.missing else "corrupt")
        report = BlobReport(a.sha256, a.kind, a.size_bytes, status, check.problem)
        if not check.ok:
            report.dependents = dependents(s, a.sha256)
            report.repair = _hint(a.kind)
        out.append(report)
    return out


def _hint(kind: str) -> str:
    if kind == "model":
        return ("re-import: `fleetctl store verify --repair --from <the model file>` "
                "(or `fleetctl model add` of that file)")
    if kind == COMPRESSED_KIND:
        return "`fleetctl store verify --repair` rebuilds it from the model file"
    return "`fleetctl store verify --repair` rebuilds it from its base and target"


def repair(s: Session, blobs: BlobStore, reports: list[BlobReport], sources: list[Path],
           work_dir: Path) -> None:
    """Repair what can be repaired, models first (compressed forms and deltas are rebuilt from
    them). Updates each report: status "repaired" with what was done, or the reason not."""
    verifier = BlobVerifier(blobs, 1 << 20)
    offered = {sha256_file(p): p for p in sources}
    order = {"model": 0, COMPRESSED_KIND: 1, "delta": 2}
    for r in sorted((r for r in reports if r.status != "ok"), key=lambda r: order.get(r.kind, 3)):
        try:
            if r.kind == "model":
                done = _repair_model(blobs, r, offered)
            elif r.kind == COMPRESSED_KIND:
                done = _repair_compressed(s, blobs, verifier, r, work_dir)
            else:
                done = _repair_delta(s, blobs, verifier, r, work_dir)
        except (OSError, ValueError, CodecError) as e:  # BlobMismatch is a ValueError
            done = f"not repaired: {e}"
        verifier.forget(r.sha256)
        if not done.startswith("not repaired"):
            r.status = "repaired"
            log.warning("server blob %s repaired: %s", r.sha256, done)
        r.repair = done


def _repair_model(blobs: BlobStore, r: BlobReport, offered: dict[str, Path]) -> str:
    src = offered.get(r.sha256)
    if src is None:
        return ("not repaired: a model file has no other source in the store; pass the "
                "original file with --from")
    blobs.restore_file(src, r.sha256)
    return f"copied from {src}"


def _repair_compressed(s: Session, blobs: BlobStore, verifier: BlobVerifier, r: BlobReport,
                       work_dir: Path) -> str:
    users = [v for v in s.scalars(select(Variant).order_by(Variant.id))
             if (form := compressed_artifact(v.info)) is not None and form.sha256 == r.sha256]
    if not users:
        return "not repaired: no variant records this compressed form"
    model_sha = users[0].artifact_sha256
    if not verifier.intact(model_sha):
        return f"not repaired: its model file {model_sha[:12]} is not intact (repair it first)"
    from .codecs import build_compressed_full  # noqa: PLC0415  (numpy: only to repair)

    built = build_compressed_full(blobs.path(model_sha), work_dir, model_sha256=model_sha)
    if built is None:
        return "not repaired: compressing the model no longer makes it smaller or round-trips"
    try:
        if built.sha256 == r.sha256:
            blobs.restore_file(built.path, r.sha256)
            return f"rebuilt from model file {model_sha[:12]}"
        sha, size = blobs.put_file(built.path)
    finally:
        built.path.unlink(missing_ok=True)
    if s.get(Artifact, sha) is None:
        s.add(Artifact(sha256=sha, size_bytes=size, kind=COMPRESSED_KIND,
                       created_at=datetime.now(UTC)))
    for v in users:
        v.info = {**(v.info or {}), "compressed": {
            **v.info["compressed"], "sha256": sha, "size_bytes": size, "level": built.level}}
    s.flush()
    _forget(s, blobs, r.sha256)
    return f"rebuilt from model file {model_sha[:12]} as {sha[:12]} (the old form is gone)"


def _repair_delta(s: Session, blobs: BlobStore, verifier: BlobVerifier, r: BlobReport,
                  work_dir: Path) -> str:
    d = s.scalar(select(Delta).where(Delta.artifact_sha256 == r.sha256).limit(1))
    if d is None:
        return "not repaired: no delta row names this blob"
    for end in (d.base_sha256, d.target_sha256):
        if not verifier.intact(end):
            return f"not repaired: {end[:12]} (its base or target) is not intact"
    from .codecs import choose, default_encoders  # noqa: PLC0415  (numpy: only to repair)

    encoders = [e for e in default_encoders() if e.name == d.codec]
    if not encoders:
        return f"not repaired: unknown codec {d.codec}"
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        choice = choose(blobs.path(d.base_sha256), blobs.path(d.target_sha256), Path(tmp),
                        encoders=encoders, target_sha256=d.target_sha256,
                        reference_bytes=_NO_LIMIT_BYTES)
        if choice.path is None:
            why = "; ".join(a.skipped for a in choice.attempts if a.skipped) or "no output"
            return f"not repaired: rebuilding the {d.codec} delta failed: {why}"
        if sha256_file(choice.path) == r.sha256:
            blobs.restore_file(choice.path, r.sha256)
            return f"rebuilt from {d.base_sha256[:12]} -> {d.target_sha256[:12]} ({d.codec})"
        sha, size = blobs.put_file(choice.path)
    if s.get(Artifact, sha) is None:
        s.add(Artifact(sha256=sha, size_bytes=size, kind="delta", created_at=datetime.now(UTC)))
        s.flush()
    for row in s.scalars(select(Delta).where(Delta.artifact_sha256 == r.sha256)):
        row.artifact_sha256, row.size_bytes = sha, size
    s.flush()
    _forget(s, blobs, r.sha256)
    return f"rebuilt as {sha[:12]} ({d.codec}; the old delta is gone)"


def _forget(s: Session, blobs: BlobStore, sha: str) -> None:
    s.execute(delete(Artifact).where(Artifact.sha256 == sha))
    s.flush()
    blobs.delete(sha)
