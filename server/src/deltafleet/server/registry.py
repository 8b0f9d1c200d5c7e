"""Transitional shim: the registry was split by noun, and this module only re-exports.

New code imports the new homes: ``fleet`` (devices, groups), ``catalog`` (models, versions,
variants), ``audit`` and ``views`` (the ``--json`` rendering). The modules still importing
``registry`` move to those homes when their rooms are rewritten; then this module goes away.
"""

from __future__ import annotations

from .audit import audit, list_audit
from .catalog.models import (
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
    variant_option,
    variant_options,
)
from .fleet.devices import (
    get_device,
    list_devices,
    record_device_model,
    set_device_online,
    set_devices_presence,
    upsert_devices_from_hellos,
)
from .fleet.groups import (
    GROUP_NAME_RE,
    PROFILE_SELECTOR_KEYS,
    SELECTOR_KEY_RE,
    check_selector,
    create_group,
    device_matches,
    devices_in_group,
    get_group,
    list_groups,
)
from .views import audit_to_json, device_to_json, group_to_json, model_to_json, variant_to_json

__all__ = [
    "COMPRESSED_KIND",
    "GROUP_NAME_RE",
    "MODEL_NAME_RE",
    "NEW_BLOBS_KEY",
    "PRECISIONS",
    "PROFILE_SELECTOR_KEYS",
    "SELECTOR_KEY_RE",
    "VARIANT_RE",
    "VERSION_RE",
    "add_model_version",
    "audit",
    "audit_to_json",
    "backfill_compressed",
    "best_delta",
    "check_selector",
    "compressed_artifact",
    "create_group",
    "device_matches",
    "device_to_json",
    "devices_in_group",
    "full_artifact",
    "get_device",
    "get_group",
    "get_model",
    "group_to_json",
    "list_audit",
    "list_devices",
    "list_groups",
    "list_models",
    "model_to_json",
    "record_device_model",
    "resolve_version",
    "set_device_online",
    "set_devices_presence",
    "upsert_devices_from_hellos",
    "variant_option",
    "variant_options",
    "variant_to_json",
]
