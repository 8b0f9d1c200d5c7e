"""`fleetctl delta ...`: pre-build deltas between model versions and inspect the cached ones.

A built delta is stored exactly as the server daemon stores its own (blob + ``artifacts`` row
of kind "delta" + ``deltas`` row), so a later rollout finds and ships it without rebuilding.

Exit codes: 0 ok (also when no delta beats the full model: the full model will then be sent);
1 the build failed for another reason (not your input); 2 bad input (invalid spec, unknown
model, version or variant, unknown delta id).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
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
from ..errors import NotFoundError, UsageError
from ..planner import delta_worth_it
from ..store.models import Artifact, Delta, Model, ModelVersion, Variant
from ._common import WIDE_HELP, blob_store, console, fmt_bytes, load_config, open_store, print_json
from .progress import Steps
from .table import Table

app = typer.Typer(no_args_is_help=True, help="Build and inspect model deltas.")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
SPEC_HELP = "NAME:VERSION[/VARIANT] (variant defaults to 'default', or the only one)"


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


def _labels(session: Session, shas: set[str]) -> dict[str, str]:
    rows = session.execute(
        select(Variant.artifact_sha256, Model.name, ModelVersion.version, Variant.name)
        .join(ModelVersion, ModelVersion.id == Variant.version_id)
        .join(Model, Model.id == ModelVersion.model_id)
        .where(Variant.artifact_sha256.in_(shas))
    ).all()
    out: dict[str, str] = {}
    for sha, model, version, variant in rows:
        out.setdefault(sha, f"{model}:{version}/{variant}")
    return out


def _delta_json(session: Session, d: Delta) -> dict[str, Any]:
    """A cached delta; ``ratio`` and ``worth_sending`` weigh it against the target's full
    artifact (what a full install ships: the compressed model when the catalog has one)."""
    labels = _labels(session, {d.base_sha256, d.target_sha256})
    target = session.get(Artifact, d.target_sha256)
    full = catalog.full_artifact(session, d.target_sha256)
    full_bytes = full.size_bytes if full else None
    return {
        "id": d.id,
        "base": labels.get(d.base_sha256),
        "target": labels.get(d.target_sha256),
        "base_sha256": d.base_sha256,
        "target_sha256": d.target_sha256,
        "codec": d.codec,
        "artifact_sha256": d.artifact_sha256,
        "size_bytes": d.size_bytes,
        "target_size_bytes": target.size_bytes if target else None,
        "full_artifact_codec": full.codec if full else None,
        "full_artifact_bytes": full_bytes,
        "ratio": round(d.size_bytes / full_bytes, 4) if full_bytes else None,
        "worth_sending": delta_worth_it(d.size_bytes, full_bytes) if full_bytes else None,
        "build_seconds": round(d.build_seconds, 3),
        "created_at": d.created_at.isoformat() if d.created_at else None,
    }


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


@app.command("build")
def build(
    base_spec: Annotated[str, typer.Argument(help=f"base: {SPEC_HELP}")],
    target_spec: Annotated[str, typer.Argument(help=f"target: {SPEC_HELP}")],
    memory_budget_mb: Annotated[int, typer.Option(
        "--memory-budget-mb", help="skip codecs predicted to need more memory (MiB)")
    ] = DEFAULT_MEMORY_BUDGET_BYTES >> 20,
    time_budget_s: Annotated[float, typer.Option(
        "--time-budget-s", help="skip codecs predicted to take longer (seconds)")
    ] = DEFAULT_TIME_BUDGET_S,
    json_out: JsonOpt = False,
) -> None:
    """Build the smallest verified delta from BASE to TARGET and cache it for rollouts."""
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
                data = _delta_json(s, existing) | {"cached": True}
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
            data = _delta_json(s, row) | {"cached": False, "attempts": attempts}
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


@app.command("list")
def list_deltas(
    wide: Annotated[bool, typer.Option("--wide", help="Show base and target sha256 in full.")
                    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """List cached deltas: base, target, codec, size vs the target's full artifact (the
    compressed model when it is smaller)."""
    with open_store() as store, store.read() as s:
        rows = [_delta_json(s, d) for d in s.scalars(select(Delta).order_by(Delta.id)).all()]
    if json_out:
        print_json(rows)
        return
    table = Table("id", "base", "target", "codec", "size", "%full", "secs", wide=wide)
    n = 64 if wide else 12
    for r in rows:
        table.add_row(str(r["id"]), r["base"] or r["base_sha256"][:n],
                      r["target"] or r["target_sha256"][:n], r["codec"],
                      fmt_bytes(r["size_bytes"]),
                      f"{100 * r['ratio']:.1f}" if r["ratio"] is not None else "-",
                      f"{r['build_seconds']:.1f}")
    console.print(table)


@app.command("show")
def show(
    delta_id: Annotated[int, typer.Argument(help="delta id (see `fleetctl delta list`)")],
    json_out: JsonOpt = False,
    wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False,
) -> None:
    """Show one cached delta (--wide: long values on one line, not folded)."""
    with open_store() as store, store.read() as s:
        d = s.get(Delta, delta_id)
        if d is None:
            raise NotFoundError(f"no delta {delta_id}")
        data = _delta_json(s, d)
    if json_out:
        print_json(data)
        return
    table = Table("field", show_header=False, wide=wide)
    table.add_column("value", overflow="fold")
    for k, v in data.items():
        if k.endswith("size_bytes") and isinstance(v, int):
            v = f"{fmt_bytes(v)} ({v})"
        table.add_row(k, "-" if v is None else str(v))
    console.print(table)
