"""`fleetctl delta build`: the build itself, apart from ``delta`` so that the read commands
(which may go through the API) load no codec, SQLAlchemy or numpy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import catalog
from ..codecs import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    DEFAULT_TIME_BUDGET_S,
    Budget,
    Encoder,
    choose,
    default_encoders,
)
from ..delta_views import delta_json
from ..errors import NotFoundError, UsageError
from ..store.models import Artifact, Delta, Variant
from ._common import blob_store, console, fmt_bytes, load_config, open_store, print_json
from .progress import Steps


def _variant(session: Session, spec: str) -> tuple[str, Variant]:
    """(canonical spec, variant) for ``NAME:VERSION[/VARIANT]``."""
    version_spec, _, variant_name = spec.partition("/")
    if not version_spec or (("/" in spec) and not variant_name):
        raise UsageError(f"invalid spec {spec!r}: use NAME:VERSION[/VARIANT]")
    mv = catalog.resolve_version(session, version_spec)
    variants = {v.name: v for v in mv.variants}
    if variant_name:
        chosen = variants.get(variant_name)
    elif "default" in variants:
        chosen = variants["default"]
    elif len(variants) == 1:
        chosen = next(iter(variants.values()))
    else:
        raise UsageError(f"{version_spec} has variants {', '.join(sorted(variants))}: "
                         "name one as NAME:VERSION/VARIANT")
    if chosen is None:
        raise NotFoundError(f"{mv.model.name}:{mv.version} has no variant {variant_name!r}")
    return f"{mv.model.name}:{mv.version}/{chosen.name}", chosen


class _Reported(Encoder):
    """An encoder whose encode is shown as a step of ``steps`` (same predictions, same bytes)."""

    def __init__(self, inner: Encoder, steps: Steps, index: int, count: int) -> None:
        self.inner, self.steps, self.index, self.count = inner, steps, index, count
        self.name = inner.name

    def predicted_peak_bytes(self, base_size: int, target_size: int) -> int:
        return self.inner.predicted_peak_bytes(base_size, target_size)

    def predicted_seconds(self, base_size: int, target_size: int) -> float:
        return self.inner.predicted_seconds(base_size, target_size)

    def applicable(self, base_path: Path, target_path: Path) -> bool:
        return self.inner.applicable(base_path, target_path)

    def encode(self, base_path: Path, target_path: Path, out_path: Path) -> None:
        self.steps.start(f"encoding {self.name} ({self.index}/{self.count})")
        try:
            self.inner.encode(base_path, target_path, out_path)
        except BaseException:
            self.steps.done(f"{self.name} failed")
            raise
        size = out_path.stat().st_size if out_path.exists() else None
        self.steps.done(f"{self.name} {fmt_bytes(size)}")
        self.steps.start("verifying the smallest delta" if self.index == self.count
                         else "choosing", silent=True)


def reported_encoders(steps: Steps) -> list[Encoder]:
    """``default_encoders()``, each encode shown as a step (the builds' progress)."""
    encoders = default_encoders()
    return [_Reported(e, steps, i, len(encoders)) for i, e in enumerate(encoders, 1)]


def build_delta(base_spec: str, target_spec: str, memory_budget_mb: int | None,
                time_budget_s: float | None, json_out: bool) -> None:
    """Build the smallest verified delta from BASE to TARGET and cache it for rollouts
    (budgets None: the server's defaults)."""
    if memory_budget_mb is None:
        memory_budget_mb = DEFAULT_MEMORY_BUDGET_BYTES >> 20
    if time_budget_s is None:
        time_budget_s = DEFAULT_TIME_BUDGET_S
    if memory_budget_mb <= 0 or time_budget_s <= 0:
        raise UsageError("budgets must be positive")
    cfg = load_config()
    blobs = blob_store(cfg)
    with open_store(cfg) as store:
        with store.session() as s:
            base_label, base = _variant(s, base_spec)
            target_label, target = _variant(s, target_spec)
            base_sha, target_sha = base.artifact_sha256, target.artifact_sha256
            if base_sha == target_sha:
                raise UsageError(f"{base_label} and {target_label} are the same file")
            existing = s.scalar(select(Delta).where(Delta.base_sha256 == base_sha,
                                                    Delta.target_sha256 == target_sha))
            if existing is not None:
                data = delta_json(s, existing) | {"cached": True}
                _print_built(data, json_out)
                return
            full = catalog.full_artifact(s, target_sha)
        work = cfg.home / "work"
        work.mkdir(parents=True, exist_ok=True)
        with Steps(f"delta {base_label} -> {target_label}") as steps:
            choice = choose(blobs.path(base_sha), blobs.path(target_sha), work,
                            budget=Budget(memory_budget_mb << 20, time_budget_s),
                            encoders=reported_encoders(steps), target_sha256=target_sha,
                            reference_bytes=full.size_bytes if full else None)
            steps.done()
            steps.note(f"chose {choice.codec} {fmt_bytes(choice.size_bytes)}" if choice.codec
                       else "no delta beats the full model")
        attempts = [
            {"codec": a.codec, "size_bytes": a.size_bytes, "seconds": round(a.seconds, 3),
             "verified": a.verified, "skipped": a.skipped or None}
            for a in choice.attempts
        ]
        if choice.path is None or choice.codec is None:
            data = {"base": base_label, "target": target_label, "codec": None,
                    "reason": choice.reason, "attempts": attempts}
            if json_out:
                print_json(data)
            else:
                console.print(f"no delta for {base_label} -> {target_label}: the full model "
                              f"will be sent ({choice.reason})")
            return
        build_seconds = sum(a.seconds for a in choice.attempts)
        try:
            sha, size = blobs.put_file(choice.path)
        finally:
            Path(choice.path).unlink(missing_ok=True)
        with store.session() as s:
            if s.get(Artifact, sha) is None:
                s.add(Artifact(sha256=sha, size_bytes=size, kind="delta"))
            s.flush()
            row = Delta(base_sha256=base_sha, target_sha256=target_sha, codec=choice.codec,
                        artifact_sha256=sha, size_bytes=size, build_seconds=build_seconds)
            s.add(row)
            s.flush()
            data = delta_json(s, row) | {"cached": False, "attempts": attempts}
    _print_built(data, json_out)



def _print_built(data: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(data)
        return
    ratio = (f"{100 * data['ratio']:.1f}% of the full artifact, "
             f"{data['full_artifact_codec']} {fmt_bytes(data['full_artifact_bytes'])}"
             if data.get("ratio") is not None else "")
    verb = "cached" if data.get("cached") else "built"
    console.print(f"{verb} delta {data['id']}: {data['base']} -> {data['target']}  "
                  f"{data['codec']}  {fmt_bytes(data['size_bytes'])} ({ratio})"
                  + ("" if data.get("worth_sending") else "  [not worth sending: full is used]"))
    for a in data.get("attempts", []):
        size = fmt_bytes(a["size_bytes"]) if a["size_bytes"] is not None else "-"
        console.print(f"  {a['codec']:<11} {size:>10}  {a['seconds']:.2f} s"
                      + (f"  ({a['skipped']})" if a["skipped"] else "")
                      + ("  verified" if a["verified"] else ""))


