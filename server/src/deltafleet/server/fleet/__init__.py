"""The fleet: devices as they report themselves (``devices``) and groups of them (``groups``).

Both modules work in the caller's SQLAlchemy session and never commit. Import either module,
or the names below from the package.
"""

from __future__ import annotations

from .devices import (
    Desired,
    desired_models,
    get_device,
    list_devices,
    record_device_model,
    set_device_online,
    set_devices_presence,
    upsert_devices_from_hellos,
)
from .groups import (
    GROUP_NAME_RE,
    PROFILE_SELECTOR_KEYS,
    SELECTOR_KEY_RE,
    check_selector,
    create_group,
    device_matches,
    devices_in_group,
    format_selector,
    get_group,
    list_groups,
    parse_match,
)

__all__ = [
    "GROUP_NAME_RE",
    "Desired",
    "PROFILE_SELECTOR_KEYS",
    "SELECTOR_KEY_RE",
    "check_selector",
    "create_group",
    "desired_models",
    "device_matches",
    "devices_in_group",
    "format_selector",
    "get_device",
    "get_group",
    "list_devices",
    "list_groups",
    "parse_match",
    "record_device_model",
    "set_device_online",
    "set_devices_presence",
    "upsert_devices_from_hellos",
]
