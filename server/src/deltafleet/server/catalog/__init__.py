"""The model catalog: what a model file is (``inspect``) and what is registered (``models``).

``inspect`` reads ONNX and TFLite files without running them and never touches the database;
``models`` keeps models, versions and variants in it, with each variant's full form. Import
either module, or the names below from the package.
"""

from __future__ import annotations

from .inspect import (
    GOLDEN_MAX_BYTES,
    GOLDEN_MAX_FILES,
    ModelInfo,
    TensorSpec,
    detect_format,
    golden_input,
    inspect_model,
    io_signature,
    load_golden,
    signature,
)
from .models import (
    COMPRESSED_KIND,
    MODEL_NAME_RE,
    NEW_BLOBS_KEY,
    PRECISIONS,
    VARIANT_RE,
    VERSION_RE,
    add_model_version,
    backfill_compressed,
    best_delta,
    compressed_artifact,
    full_artifact,
    get_model,
    list_models,
    resolve_version,
    variant_needs,
    variant_option,
    variant_options,
)

__all__ = [
    "COMPRESSED_KIND",
    "GOLDEN_MAX_BYTES",
    "GOLDEN_MAX_FILES",
    "MODEL_NAME_RE",
    "NEW_BLOBS_KEY",
    "PRECISIONS",
    "VARIANT_RE",
    "VERSION_RE",
    "ModelInfo",
    "TensorSpec",
    "add_model_version",
    "backfill_compressed",
    "best_delta",
    "compressed_artifact",
    "detect_format",
    "full_artifact",
    "get_model",
    "golden_input",
    "inspect_model",
    "io_signature",
    "list_models",
    "load_golden",
    "resolve_version",
    "signature",
    "variant_needs",
    "variant_option",
    "variant_options",
]
