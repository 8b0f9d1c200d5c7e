"""Groups: named selectors over the fleet, and the selector grammar they use.

A selector maps keys to a string value, or to a list of them ("any of": ``hw in (jetson,
xavier)`` is stored as ``{"hw": ["jetson", "xavier"]}``; a plain string is the one-value case, so
selectors stored before lists existed mean what they meant). Keys ``arch``, ``os``,
``accelerator`` and ``cpu`` name profile fields (``PROFILE_SELECTOR_KEYS``); any other key names
a label. A device matches when, for every entry, its value is the entry's value or one of its
values, so the empty selector matches every device. Membership is
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
from ..reads import PROFILE_SELECTOR_KEYS, device_matches
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
    "format_selector",
    "get_group",
    "list_groups",
    "parse_match",
]

GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SELECTOR_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$")
MAX_ANY_OF = 64
_IN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._/-]*)\s+in\s*\((.*)\)\s*$")


def _check_value(key: str, value: Any) -> None:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise UsageError(f"invalid value for selector key {key!r}: use 1-256 characters")


def check_selector(selector: Mapping[str, Any]) -> dict[str, str | list[str]]:
    """Validate a selector (label or profile key -> string value, or a list of 1-64 distinct
    values for "any of"); UsageError otherwise. A one-value list becomes the plain string."""
    out: dict[str, str | list[str]] = {}
    for key, value in selector.items():
        if not isinstance(key, str) or not SELECTOR_KEY_RE.match(key):
            raise UsageError(f"invalid selector key {key!r}: use letters, digits, '.', '_', '-'")
        if isinstance(value, list):
            if not value or len(value) > MAX_ANY_OF:
                raise UsageError(f"selector key {key!r}: give 1-{MAX_ANY_OF} values")
            for v in value:
                _check_value(key, v)
            if len(set(value)) != len(value):
                raise UsageError(f"selector key {key!r}: a value is given twice")
            out[key] = value[0] if len(value) == 1 else list(value)
        else:
            _check_value(key, value)
            out[key] = value
    return out


def parse_match(text: str) -> tuple[str, str | list[str]]:
    """One ``--match``: ``KEY=VALUE``, or ``KEY in (A, B, ...)`` for any of the values."""
    m = _IN.match(text)
    if m is not None:
        values = [v.strip() for v in m.group(2).split(",")]
        if not all(values):
            raise UsageError(f"invalid --match {text!r}: use KEY in (A, B, ...)")
        return m.group(1), values
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value:
        raise UsageError(f"invalid --match {text!r}: use KEY=VALUE or KEY in (A, B, ...)")
    return key, value


def format_selector(selector: Mapping[str, Any]) -> str:
    """A selector as the operator writes it: ``arch=aarch64, hw in (jetson, xavier)``."""
    return ", ".join(f"{k} in ({', '.join(v)})" if isinstance(v, list) else f"{k}={v}"
                     for k, v in selector.items())


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


def devices_in_group(session: Session, group_name: str, *, models: bool = True) -> list[Device]:
    """The devices a group's selector matches now (with their models unless ``models`` is
    False: a plan over a large fleet reads what they run with one query of its own), by id."""
    group = get_group(session, group_name)
    return [d for d in list_devices(session, models=models) if device_matches(d, group.selector)]
