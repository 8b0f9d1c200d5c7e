"""deltafleet.shared: what server and agent agree on — wire formats, signatures, topics, errors.

Names load on first use (PEP 562): ``from deltafleet.shared import Hello`` imports only the
modules it needs, so a ``fleetctl`` read does not pay for the signing or MQTT code."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .canonical import canonical_json, parse_json_object
    from .contracts import (
        ROLLOUT_HEALTH,
        SIGNABLE_DTYPES,
        EventState,
        GoldenInput,
        GoldenTensor,
        HealthPolicy,
        IoSignature,
        TensorSpec,
    )
    from .durable import (
        StagedFile,
        atomic_copy,
        atomic_write_bytes,
        atomic_write_json,
        fsync_dir,
        staged_file,
    )
    from .errors import (
        DeltafleetError,
        KeyFileError,
        StagedMismatch,
        VerificationError,
        WireError,
        one_line,
    )
    from .hashing import (
        DEFAULT_CHUNK_SIZE_BYTES,
        chunk_count,
        chunk_hashes_file,
        is_sha256,
        read_chunk,
        sha256_bytes,
        sha256_file,
    )
    from .messages import (
        WIRE_VERSION,
        Ack,
        ArtifactRef,
        ChunkRequest,
        Event,
        Hello,
        Manifest,
        ModelState,
        ModelTelemetry,
        Status,
        Telemetry,
        decode,
        encode,
    )
    from .signing import SigningKey, key_id, load_public_key, verify_envelope
    from .topics import DEFAULT_PREFIX, Topics, check_device_id
    from .trust import KeyList, RootMetadata, TrustBundle, TrustStore, sign_payload, trust_topic

_WHERE: dict[str, str] = {
    "canonical_json": "canonical",
    "parse_json_object": "canonical",
    "ROLLOUT_HEALTH": "contracts",
    "SIGNABLE_DTYPES": "contracts",
    "EventState": "contracts",
    "GoldenInput": "contracts",
    "GoldenTensor": "contracts",
    "HealthPolicy": "contracts",
    "IoSignature": "contracts",
    "TensorSpec": "contracts",
    "StagedFile": "durable",
    "atomic_copy": "durable",
    "atomic_write_bytes": "durable",
    "atomic_write_json": "durable",
    "fsync_dir": "durable",
    "staged_file": "durable",
    "DeltafleetError": "errors",
    "KeyFileError": "errors",
    "StagedMismatch": "errors",
    "VerificationError": "errors",
    "WireError": "errors",
    "one_line": "errors",
    "DEFAULT_CHUNK_SIZE_BYTES": "hashing",
    "chunk_count": "hashing",
    "chunk_hashes_file": "hashing",
    "is_sha256": "hashing",
    "read_chunk": "hashing",
    "sha256_bytes": "hashing",
    "sha256_file": "hashing",
    "WIRE_VERSION": "messages",
    "Ack": "messages",
    "ArtifactRef": "messages",
    "ChunkRequest": "messages",
    "Event": "messages",
    "Hello": "messages",
    "Manifest": "messages",
    "ModelState": "messages",
    "ModelTelemetry": "messages",
    "Telemetry": "messages",
    "Status": "messages",
    "decode": "messages",
    "encode": "messages",
    "SigningKey": "signing",
    "key_id": "signing",
    "load_public_key": "signing",
    "verify_envelope": "signing",
    "DEFAULT_PREFIX": "topics",
    "Topics": "topics",
    "check_device_id": "topics",
    "KeyList": "trust",
    "RootMetadata": "trust",
    "TrustBundle": "trust",
    "TrustStore": "trust",
    "sign_payload": "trust",
    "trust_topic": "trust",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "DEFAULT_CHUNK_SIZE_BYTES",
    "DEFAULT_PREFIX",
    "ROLLOUT_HEALTH",
    "SIGNABLE_DTYPES",
    "WIRE_VERSION",
    "Ack",
    "ArtifactRef",
    "ChunkRequest",
    "DeltafleetError",
    "Event",
    "EventState",
    "GoldenInput",
    "GoldenTensor",
    "HealthPolicy",
    "Hello",
    "IoSignature",
    "KeyFileError",
    "KeyList",
    "Manifest",
    "ModelState",
    "RootMetadata",
    "SigningKey",
    "StagedFile",
    "StagedMismatch",
    "ModelTelemetry",
    "Status",
    "Telemetry",
    "TensorSpec",
    "Topics",
    "TrustBundle",
    "TrustStore",
    "VerificationError",
    "WireError",
    "atomic_copy",
    "atomic_write_bytes",
    "atomic_write_json",
    "canonical_json",
    "check_device_id",
    "chunk_count",
    "chunk_hashes_file",
    "decode",
    "encode",
    "fsync_dir",
    "is_sha256",
    "key_id",
    "load_public_key",
    "one_line",
    "parse_json_object",
    "read_chunk",
    "sha256_bytes",
    "sha256_file",
    "sign_payload",
    "staged_file",
    "trust_topic",
    "verify_envelope",
]
