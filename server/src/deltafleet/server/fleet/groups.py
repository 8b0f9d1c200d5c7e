"""Groups: named selectors over the fleet, and the selector grammar they use.

A selector maps keys to string values. Keys ``arch``, ``os``, ``accelerator`` and ``cpu`` name
profile fields (``PROFILE_SELECTOR_KEYS``); any other key names a label. A device matches when
every entry equals its value, so the empty selector matches every device. Membership is
computed when asked (``devices_in_group``), never stored. Group names are unique and immutable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import ConflictError, NotFoundError, UsageError
from ..store.models import Device, Group
from .devices import list_devices

__all__ = [
    "GROUP_NAME_RE",
    "PROFILE_SELECTOR_KEYS",
    "SELECTOR_KEY_RE",
    "check_selector",
    "create_group",
    "device_matches",
    "devices_in_group",
    "get_group",
    "list_groups",
]

GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SELECTOR_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$")
PROFILE_SELECTOR_KEYS = ("arch", "os", "accelerator", "cpu")


def _selector_value(device: Device, key: str) -> str | None:
    profile = key in PROFILE_SELECTOR_KEYS
    value = getattr(device, key) if profile else (device.labels or {}).get(key)
    return None if value is None else str(value)


def device_matches(device: Device, selector: Mapping[str, Any]) -> bool:
    """True if every selector entry equals the device's value (an empty selector matches all).

    Keys arch, os, accelerator and cpu name profile fields; any other key names a label.
    """
    return all(_selector_value(device, k) == str(v) for k, v in selector.items())


def check_selector(selector: Mapping[str, Any]) -> dict[str, str]:
    """Validate a selector (label or profile key -> string value); UsageError otherwise."""
    out: dict[str, str] = {}
    for key, value in selector.items():
        if not isinstance(key, str) or not SELECTOR_KEY_RE.match(key):
            raise UsageError(f"invalid selector key {key!r}: use letters, digits, '.', '_', '-'")
        if not isinstance(value, str) or not value or len(value) > 256:
            raise UsageError(f"invalid value for selector key {key!r}: use 1-256 characters")
        out[key] = value
    return out


def create_group(session: Session, name: str, selector: Mapping[str, Any]) -> Group:
    if not GROUP_NAME_RE.match(name):
        raise UsageError(
            f"invalid group name {name!r}: use 1-64 letters, digits, '.', '_' or '-'"
        )
    selector = check_selector(selector)
    if session.scalars(select(Group).where(Group.name == name)).first() is not None:
        raise ConflictError(f"group {name!r} already exists")
    group = Group(name=name, selector=selector, created_at=datetime.now(UTC))
    session.add(group)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as e:
        raise ConflictError(f"group {name!r} already exists") from e
    return group


def list_groups(session: Session) -> list[Group]:
    return list(session.scalars(select(Group).order_by(Group.name)))


def get_group(session: Session, name: str) -> Group:
    group = session.scalars(select(Group).where(Group.name == name)).first()
    if group is None:
        raise NotFoundError(f"no group {name!r}")
    return group


def devices_in_group(session: Session, group_name: str) -> list[Device]:
    """The devices a group's selector matches now (models loaded), by id."""
    group = get_group(session, group_name)
    return [d for d in list_devices(session) if device_matches(d, group.selector)]
