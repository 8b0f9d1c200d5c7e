"""The model catalog in the database: models, versions, variants and their full forms.

Each function takes an open SQLAlchemy ``Session`` and never commits (the caller's
``Store.session()`` block is the transaction) and never prints. Invalid input raises
UsageError (or NotFoundError / ConflictError).

Invariants: a (model, version, variant) is immutable once added; a variant's model file is a
blob and an ``artifacts`` row; its compressed form, when compression makes it smaller, is
recorded in ``Variant.info["compressed"]`` and is a blob and an ``artifacts`` row of kind
``COMPRESSED_KIND``. ``full_artifact`` is what a full install of a registered file ships.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from deltafleet.codecs import ZSTD
from deltafleet.shared import is_sha256

from ..errors import ConflictError, NotFoundError, UsageError
from ..planner import FullArtifact, VariantOption
from ..planner import full_artifact as resolve_full
from ..store.blobs import BlobStore
from ..store.models import Artifact, Delta, Model, ModelVersion, Variant
from .inspect import ModelInfo, inspect_model, io_signature, load_golden

__all__ = [
    "COMPRESSED_KIND",
    "MODEL_NAME_RE",
    "NEW_BLOBS_KEY",
    "PRECISIONS",
    "VARIANT_RE",
    "VERSION_RE",
    "add_model_version",
    "variant_needs",
    "backfill_compressed",
    "best_delta",
    "compressed_artifact",
    "full_artifact",
    "get_model",
    "list_models",
    "resolve_version",
    "variant_option",
    "variant_options",
]

MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
VARIANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PRECISIONS = ("fp32", "fp16", "int8")
ACCELERATOR_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")  # an execution provider / delegate
RUNTIME_VERSION_RE = re.compile(r"^[0-9]{1,6}(\.[0-9]{1,6}){0,3}$")
NEW_BLOBS_KEY = "deltafleet.new_blobs"  # session.info: blobs this transaction wrote first
COMPRESSED_KIND = "compressed"  # artifacts.kind of a model's compressed form (full installs)


def _check_name(kind: str, value: str, pattern: re.Pattern[str], rule: str) -> None:
    if not isinstance(value, str) or not pattern.match(value):
        raise UsageError(f"invalid {kind} {value!r}: {rule}")


def add_model_version(
    session: Session,
    blobs: BlobStore,
    name: str,
    version: str,
    file: Path,
    variant: str = "default",
    precision: str = "fp32",
    golden: list[Path] | None = None,
    extra_info: Mapping[str, Any] | None = None,
    accelerator: str | None = None,
    min_runtime_version: str | None = None,
) -> Variant:
    """Register ``file`` as variant ``variant`` of model ``name`` at ``version``.

    ``golden``: ``.npz`` files of inputs (one array per model input) that devices warm the
    model up on and probe it with during its trial; they travel in every manifest.
    ``extra_info``: more keys for ``Variant.info`` (``optimize`` records a made variant's
    parent and measured figures there; ``golden`` here gives golden inputs in wire form).
    ``accelerator`` (an execution provider or delegate the variant needs, e.g. ``cuda``,
    ``npu``) and ``min_runtime_version`` (of its format's runtime): constraints selection
    (``--prefer``) applies; a device without them is not given this variant.

    Order: validate names -> inspect the file (CatalogError for anything not a valid model) ->
    refuse an existing (model, version, variant) with ConflictError -> store the blob -> build
    its compressed form (``_compressed_form``) -> add the rows. So every refusal happens
    before anything is written. Blobs this call wrote for the first time are listed in
    ``session.info[NEW_BLOBS_KEY]`` so a caller whose commit fails can remove them again.
    Adding another variant to an existing version is allowed.
    """
    file = _check_new_variant(name, version, variant, precision, file)
    needs = variant_needs(accelerator, min_runtime_version)
    info = inspect_model(file)
    golden_inputs = load_golden([Path(g) for g in golden or []], info.inputs)
    model, mv = _existing_version(session, name, version, variant)
    sha, size = _store_model_file(session, blobs, file, info)
    compressed = _compressed_form(session, blobs, sha)
    artifacts, row = _new_rows(info, size, compressed, golden_inputs, variant, precision)
    if extra_info or needs:
        row.info = {**row.info, **dict(extra_info or {}), **needs}
    try:
        with session.begin_nested():
            _add_rows(session, model, mv, name, version, artifacts, row)
    except IntegrityError as e:  # a concurrent add of the same thing won the race
        raise ConflictError(f"{name}:{version} variant {variant!r} already exists") from e
    return row


def variant_needs(accelerator: str | None, min_runtime_version: str | None) -> dict[str, str]:
    """The ``Variant.info`` keys of what a variant needs of a device (UsageError if malformed)."""
    needs: dict[str, str] = {}
    if accelerator:
        acc = accelerator.strip().lower()
        if not ACCELERATOR_RE.match(acc):
            raise UsageError(f"invalid accelerator {accelerator!r}: use a provider name such "
                             "as cuda, npu or tensorrt (1-32 letters, digits, '_' or '-')")
        needs["accelerator"] = acc
    if min_runtime_version:
        ver = min_runtime_version.strip()
        if not RUNTIME_VERSION_RE.match(ver):
            raise UsageError(f"invalid runtime version {min_runtime_version!r}: use digits and "
                             "dots, e.g. 1.18 or 2.14.0")
        needs["min_runtime_version"] = ver
    return needs


def _check_new_variant(name: str, version: str, variant: str, precision: str,
                       file: Path) -> Path:
    """Step 1 of ``add_model_version``: the names, the precision and the file; UsageError."""
    _check_name("model name", name, MODEL_NAME_RE,
                "use 1-64 lowercase letters, digits, '.', '_' or '-', starting alphanumeric")
    _check_name("version", version, VERSION_RE,
                "use 1-64 letters, digits, '.', '_', '+' or '-', starting alphanumeric")
    _check_name("variant", variant, VARIANT_RE,
                "use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric")
    if precision not in PRECISIONS:
        raise UsageError(f"invalid precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    file = Path(file)
    if not file.is_file():
        raise UsageError(f"no such file: {file}")
    return file


def _existing_version(session: Session, name: str, version: str,
                      variant: str) -> tuple[Model | None, ModelVersion | None]:
    """The model and version rows already there (None: to be added); ConflictError if the
    version already has ``variant`` (versions are immutable)."""
    model = session.scalars(select(Model).where(Model.name == name)).first()
    mv = None
    if model is not None:
        mv = session.scalars(
            select(ModelVersion).where(
                ModelVersion.model_id == model.id, ModelVersion.version == version
            )
        ).first()
    if mv is not None:
        clash = session.scalars(
            select(Variant).where(Variant.version_id == mv.id, Variant.name == variant)
        ).first()
        if clash is not None:
            raise ConflictError(
                f"{name}:{version} already has variant {variant!r}; "
                "versions are immutable, add a new version"
            )
    return model, mv


def _store_model_file(session: Session, blobs: BlobStore, file: Path,
                      info: ModelInfo) -> tuple[str, int]:
    """Store the inspected file as a blob (listed in ``NEW_BLOBS_KEY`` when new); UsageError
    if it is no longer the file that was inspected."""
    was_stored = blobs.has(info.sha256)
    sha, size = blobs.put_file(file)
    if not was_stored:
        session.info.setdefault(NEW_BLOBS_KEY, set()).add(sha)
    if sha != info.sha256:
        raise UsageError(f"{file} changed while it was being added; try again")
    return sha, size


def _new_rows(info: ModelInfo, size: int, compressed: dict[str, Any] | None,
              golden_inputs: list[dict[str, Any]], variant: str,
              precision: str) -> tuple[list[Artifact], Variant]:
    """The artifact rows (model file, then its compressed form) and the variant row to add
    for a stored model file; the variant's version is set when the rows are added."""
    variant_info = info.to_json()
    if compressed is not None:
        variant_info["compressed"] = compressed
    if golden_inputs:
        variant_info["golden"] = golden_inputs
    now = datetime.now(UTC)
    artifacts = [Artifact(sha256=info.sha256, size_bytes=size, kind="model", created_at=now)]
    if compressed is not None:
        artifacts.append(Artifact(sha256=compressed["sha256"],
                                  size_bytes=compressed["size_bytes"], kind=COMPRESSED_KIND,
                                  created_at=now))
    row = Variant(name=variant, format=info.format, precision=precision,
                  artifact_sha256=info.sha256, info=variant_info, created_at=now)
    return artifacts, row


def _add_rows(session: Session, model: Model | None, mv: ModelVersion | None, name: str,
              version: str, artifacts: list[Artifact], row: Variant) -> None:
    """The last step of ``add_model_version``: the model and version rows still missing, the
    artifact rows not there yet, and the variant ``row`` under its version."""
    now = row.created_at
    if model is None:
        model = Model(name=name, created_at=now)
        session.add(model)
        session.flush()
    if mv is None:
        mv = ModelVersion(model_id=model.id, version=version, created_at=now)
        session.add(mv)
        session.flush()
    for artifact in artifacts:
        if session.get(Artifact, artifact.sha256) is None:
            session.add(artifact)
    row.version_id = mv.id
    session.add(row)
    session.flush()


def _compressed_form(session: Session, blobs: BlobStore, model_sha256: str) -> dict[str, Any] | None:
    """The stored model's compressed form, as ``Variant.info["compressed"]`` records it:
    reused from a variant of the same file registered before, else built, round-tripped and
    stored as a blob. None when compression does not make the model smaller (the model then
    ships as it is)."""
    for other in session.scalars(select(Variant.info)
                                 .where(Variant.artifact_sha256 == model_sha256)):
        known = compressed_artifact(other)
        if (known is not None and blobs.has(known.sha256)
                and session.get(Artifact, known.sha256) is not None):
            return dict(other["compressed"])
    from ..codecs import build_compressed_full  # noqa: PLC0415  (numpy: only when writing)

    built = build_compressed_full(blobs.path(model_sha256), blobs.root,
                                  model_sha256=model_sha256)
    if built is None:
        return None
    try:
        was_stored = blobs.has(built.sha256)
        sha, size = blobs.put_file(built.path)
    finally:
        built.path.unlink(missing_ok=True)
    if not was_stored:
        session.info.setdefault(NEW_BLOBS_KEY, set()).add(sha)
    return {"codec": built.codec, "sha256": sha, "size_bytes": size, "level": built.level}


def backfill_compressed(session: Session, blobs: BlobStore,
                        model: str | None = None) -> list[tuple[Variant, dict[str, Any] | None]]:
    """Build the compressed form of every variant that has none (registered before full
    models shipped compressed); (variant, recorded form or None when compression does not
    shrink it) for each variant looked at. Idempotent."""
    query = select(Variant).order_by(Variant.id)
    if model is not None:
        query = (query.join(ModelVersion, ModelVersion.id == Variant.version_id)
                 .join(Model, Model.id == ModelVersion.model_id).where(Model.name == model))
    done: list[tuple[Variant, dict[str, Any] | None]] = []
    for variant in session.scalars(query).all():
        if compressed_artifact(variant.info) is not None:
            continue
        if not blobs.has(variant.artifact_sha256):
            raise NotFoundError(f"the model file of variant {variant.id} "
                                f"({variant.artifact_sha256[:12]}) is missing from the blob store")
        form = _compressed_form(session, blobs, variant.artifact_sha256)
        if form is not None:
            if session.get(Artifact, form["sha256"]) is None:
                session.add(Artifact(sha256=form["sha256"], size_bytes=form["size_bytes"],
                                     kind=COMPRESSED_KIND, created_at=datetime.now(UTC)))
            variant.info = {**(variant.info or {}), "compressed": form}  # a new dict: saved
            session.flush()
        done.append((variant, form))
    return done


def compressed_artifact(info: Mapping[str, Any] | None) -> FullArtifact | None:
    """The compressed form a variant's catalog info records, if any (variants registered
    before full models shipped compressed, and models compression does not shrink, have
    none: they ship as they are)."""
    entry = (info or {}).get("compressed")
    if not isinstance(entry, Mapping):
        return None
    codec, sha, size = entry.get("codec"), entry.get("sha256"), entry.get("size_bytes")
    if codec != ZSTD or not isinstance(sha, str) or not is_sha256(sha):
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        return None
    return FullArtifact(codec, sha, size)


def full_artifact(session: Session, model_sha256: str) -> FullArtifact | None:
    """What a full install of a registered model file ships; None for an unknown file."""
    size = session.scalar(select(Artifact.size_bytes).where(Artifact.sha256 == model_sha256))
    if size is None:
        return None
    for info in session.scalars(select(Variant.info)
                                .where(Variant.artifact_sha256 == model_sha256)):
        compressed = compressed_artifact(info)
        if compressed is not None:
            return resolve_full(model_sha256, size, compressed)
    return resolve_full(model_sha256, size)


def get_model(session: Session, name: str) -> Model:
    """A model with its versions and their variants loaded."""
    model = session.scalars(
        select(Model)
        .where(Model.name == name)
        .options(selectinload(Model.versions).selectinload(ModelVersion.variants))
    ).first()
    if model is None:
        raise NotFoundError(f"no model {name!r}")
    return model


def list_models(session: Session) -> list[Model]:
    """Every model (versions and variants loaded), by name."""
    return list(
        session.scalars(
            select(Model)
            .options(selectinload(Model.versions).selectinload(ModelVersion.variants))
            .order_by(Model.name)
        )
    )


def resolve_version(session: Session, spec: str) -> ModelVersion:
    """``NAME:VERSION``, or just ``VERSION`` when exactly one model is registered.

    The returned version has its model and variants loaded.
    """
    opts = (selectinload(ModelVersion.model), selectinload(ModelVersion.variants))
    if ":" in spec:
        name, _, version = spec.partition(":")
        if not name or not version:
            raise UsageError(f"invalid version {spec!r}: use NAME:VERSION")
        model = session.scalars(select(Model).where(Model.name == name)).first()
        if model is None:
            raise NotFoundError(f"no model {name!r}")
    else:
        version = spec
        n = session.scalar(select(func.count()).select_from(Model)) or 0
        if n != 1:
            raise UsageError(
                f"version {spec!r} is ambiguous: {n} models are registered; use NAME:VERSION"
            )
        model = session.scalars(select(Model)).one()
    mv = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.model_id == model.id, ModelVersion.version == version)
        .options(*opts)
    ).first()
    if mv is None:
        raise NotFoundError(f"model {model.name!r} has no version {version!r}")
    return mv


def variant_option(variant: Variant, size_bytes: int) -> VariantOption:
    """A variant as the planner wants it: its model file and compressed form."""
    info = variant.info or {}
    golden = info.get("golden")
    return VariantOption(variant.id, variant.name, variant.format, variant.precision,
                         variant.artifact_sha256, size_bytes, compressed_artifact(info),
                         io_signature=io_signature(info),
                         golden=tuple(golden) if isinstance(golden, list) else ())


def variant_options(session: Session, version_id: int) -> list[VariantOption]:
    """The deployable variants of a version, with their sizes, as the planner wants them."""
    return [
        variant_option(v, size)
        for v, size in session.execute(
            select(Variant, Artifact.size_bytes)
            .join(Artifact, Artifact.sha256 == Variant.artifact_sha256)
            .where(Variant.version_id == version_id)).all()
    ]


def best_delta(session: Session, base_sha256: str, target_sha256: str) -> Delta | None:
    """The smallest stored delta from ``base_sha256`` to ``target_sha256``, if any."""
    return session.scalar(select(Delta).where(Delta.base_sha256 == base_sha256,
                                              Delta.target_sha256 == target_sha256)
                          .order_by(Delta.size_bytes).limit(1))
