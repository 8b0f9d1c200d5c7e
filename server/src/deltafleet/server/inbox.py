"""Device messages in: take a batch from the MQTT inbox, parse each one, apply the batch.

The server's loop (``daemon.FleetServer``) drains a batch (``drain``), parses and checks every
message alone (``parse_device_message``: the topic's device, the wire shape, what the store can
hold), applies the valid ones in one transaction (``apply_resilient``), and after the commit
acks what it recorded (``publish_acks``). ``first_delivery`` drops events already applied. No
function here holds state between batches.
"""

from __future__ import annotations

import logging
import queue
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from deltafleet.shared import (
    Ack,
    ChunkRequest,
    Event,
    Hello,
    Status,
    Telemetry,
    Topics,
    WireError,
    decode,
    encode,
)
from deltafleet.shared.messages import MAX_ACK_IDS, MAX_TELEMETRY_BYTES, BenchResult, Portrait

from .guard import check_bench_result, check_portrait
from .ingest import fits_store
from .store import StoreError
from .store.models import DeviceEvent

__all__ = ["BATCH_MAX", "LEAVES", "Applied", "Batch", "apply_resilient", "drain", "first_delivery",
           "parse_device_message", "publish_acks"]

log = logging.getLogger(__name__)

BATCH_MAX = 500  # device messages applied in one transaction
MAX_MESSAGE_BYTES = 256 * 1024  # any device message but telemetry
LEAVES = {"hello": Hello, "status": Status, "events": Event, "chunkreq": ChunkRequest,
          "telemetry": Telemetry, "portrait": Portrait, "bench": BenchResult}
Applied: TypeAlias = Hello | Status | Event | Telemetry | Portrait | BenchResult
Item = TypeVar("Item", bound=tuple[str, Any])


@dataclass(frozen=True, slots=True)
class Batch:
    """Validated device messages by kind, each list in arrival order."""

    hellos: list[Hello]
    events: list[Event]
    telemetry: list[Telemetry]
    presence: dict[str, bool]  # device -> online, the last status of the batch
    portraits: list[Portrait]
    benches: list[BenchResult]

    @classmethod
    def of(cls, items: Iterable[tuple[str, Applied]]) -> Batch:
        messages = [m for _, m in items]
        return cls([m for m in messages if isinstance(m, Hello)],
                   [m for m in messages if isinstance(m, Event)],
                   [m for m in messages if isinstance(m, Telemetry)],
                   {m.device_id: m.online for m in messages if isinstance(m, Status)},
                   [m for m in messages if isinstance(m, Portrait)],
                   [m for m in messages if isinstance(m, BenchResult)])


def drain(inbox: queue.Queue[Any], timeout_s: float, linger_s: float = 0.0) -> list[Any]:
    """Up to BATCH_MAX inbox items: wait for the first, then take what arrives within
    ``linger_s`` of it."""
    try:
        batch = [inbox.get(timeout=timeout_s)]
    except queue.Empty:
        return []
    until = time.monotonic() + linger_s
    while len(batch) < BATCH_MAX:
        try:
            batch.append(inbox.get_nowait())
            continue
        except queue.Empty:
            pass
        left = until - time.monotonic()
        if left <= 0:
            break
        try:
            batch.append(inbox.get(timeout=left))
        except queue.Empty:
            break
    return batch


def parse_device_message(topics: Topics, topic: str, payload: bytes) -> ChunkRequest | Applied:
    """The message on a device topic, checked whole: its leaf, its wire shape, that it speaks
    for the topic's device and that the store can hold it. WireError (one line) otherwise."""
    device_id, leaf = topics.parse_dev(topic)
    kind = LEAVES.get(leaf)
    if kind is None:
        raise WireError(f"unknown device topic {leaf!r}")
    message = decode(kind, payload, max_bytes=(
        MAX_TELEMETRY_BYTES if kind is Telemetry else MAX_MESSAGE_BYTES))
    if device_id != message.device_id:
        raise WireError(f"device {message.device_id} spoke on the topic of {device_id}")
    if isinstance(message, Portrait):
        check_portrait(message.portrait)
    elif isinstance(message, BenchResult):
        check_bench_result(message)
    else:
        fits_store(message)
    return message


def apply_resilient(apply: Callable[[list[Item]], None], items: list[Item], *,
                    refuse: Callable[[str, str, str, str], None],
                    database_errors: dict[str, int]) -> None:
    """Apply validated ``(device_id, message)`` items in one transaction. A transient database
    failure (a deadlock or serialization failure with another replica, a dropped connection:
    StoreError) retries after a short random pause, so two replicas do not collide again;
    after three failures the batch is logged and dropped: the server keeps serving. Any other
    failure means a message the database will not take: the batch is then applied message by
    message, so only that message is dropped (``refuse(device_id, where, reason, kind)``) and
    every other message lands once."""
    for attempt in (1, 2, 3):
        try:
            apply(items)
            return
        except StoreError as e:
            database_errors["transient"] += 1
            level = logging.WARNING if attempt < 3 else logging.ERROR
            log.log(level, "a batch of %d device messages failed (attempt %d): %s",
                    len(items), attempt, str(e).splitlines()[0])
            time.sleep(random.uniform(0.05, 0.25) * attempt)
        except Exception as e:  # the database or a bug refused one message: find it, drop it
            cause = getattr(e, "orig", None) or e  # the database's own words
            reason = (str(cause).splitlines() or [type(e).__name__])[0][:200]
            if len(items) == 1:
                device_id, message = items[0]
                kind = "store_refused" if isinstance(e, SQLAlchemyError) else "error"
                database_errors["refused"] += kind == "store_refused"
                log.error("device %s: dropped its %s, which could not be applied: %s",
                          device_id, type(message).__name__.lower(), reason,
                          exc_info=kind == "error")
                refuse(device_id, type(message).__name__.lower(),
                       f"the store refused it: {reason}", kind)
                return
            log.warning("a batch of %d device messages failed (%s); applying them one by "
                        "one", len(items), reason)
            for item in items:
                apply_resilient(apply, [item], refuse=refuse, database_errors=database_errors)
            return
    log.error("dropped %d device messages (from %s) after three database failures",
              len(items), ", ".join(sorted({d for d, _ in items}))[:300])


def first_delivery(s: Session, events: list[Event], now: datetime) -> list[Event]:
    """Drop events already applied (by event_id, durable in device_events) and record
    the others in the same transaction that applies them. Ids are stored whole:
    ``fits_store`` refused any longer than the column."""
    if not events:
        return []
    ids = {ev.event_id for ev in events}
    seen = set(s.scalars(select(DeviceEvent.event_id).where(DeviceEvent.event_id.in_(ids))))
    fresh: dict[str, Event] = {}
    for ev in events:
        if ev.event_id not in seen and ev.event_id not in fresh:
            fresh[ev.event_id] = ev
    s.add_all(DeviceEvent(event_id=ev.event_id, device_id=ev.device_id,
                          state=ev.state, at=now) for ev in fresh.values())
    return list(fresh.values())


def ids_by_device(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """``(device_id, message_id)`` pairs grouped by device, in order, each id once."""
    out: dict[str, dict[str, None]] = defaultdict(dict)
    for device_id, message_id in pairs:
        out[device_id][message_id] = None
    return {d: list(ids) for d, ids in out.items()}


def publish_acks(publish: Callable[..., Any], topics: Topics,
                 by_device: Mapping[str, Sequence[str]]) -> int:
    """One ack per device and MAX_ACK_IDS ids (QoS 1); returns how many were published."""
    sent = 0
    for device_id, ids in by_device.items():
        for i in range(0, len(ids), MAX_ACK_IDS):
            publish(topics.ack(device_id), encode(Ack(device_id, tuple(ids[i:i + MAX_ACK_IDS]))),
                    qos=1)
            sent += 1
    return sent
