"""deltafleet.shared: what server and agent agree on — wire formats, signatures, topics, errors."""

from .canonical import canonical_json, parse_json_object
from .durable import atomic_copy, atomic_write_bytes, atomic_write_json, fsync_dir
from .errors import DeltafleetError, KeyFileError, VerificationError, WireError
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
    Status,
    decode,
    encode,
)
from .signing import SigningKey, key_id, load_public_key, verify_envelope
from .topics import DEFAULT_PREFIX, Topics, check_device_id
from .trust import KeyList, RootMetadata, TrustBundle, TrustStore, sign_payload, trust_topic

__all__ = [
    "DEFAULT_CHUNK_SIZE_BYTES",
    "DEFAULT_PREFIX",
    "WIRE_VERSION",
    "Ack",
    "ArtifactRef",
    "ChunkRequest",
    "DeltafleetError",
    "Event",
    "Hello",
    "KeyFileError",
    "KeyList",
    "Manifest",
    "ModelState",
    "RootMetadata",
    "SigningKey",
    "Status",
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
    "parse_json_object",
    "read_chunk",
    "sha256_bytes",
    "sha256_file",
    "sign_payload",
    "trust_topic",
    "verify_envelope",
]
