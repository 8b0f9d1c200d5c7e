"""MQTT topic names. Per-device topics let broker ACLs confine each device to its own subtree.

    {prefix}/dev/{device_id}/hello      device -> server  profile + models it runs (each connect)
    {prefix}/dev/{device_id}/status     device -> server  retained online/offline (last will)
    {prefix}/dev/{device_id}/events     device -> server  update progress and results
    {prefix}/dev/{device_id}/chunkreq   device -> server  chunk indices it still needs
    {prefix}/dev/{device_id}/telemetry  device -> server  inference summary (outbox, periodic)
    {prefix}/dev/{device_id}/portrait   device -> server  what it can use (after each hello)
    {prefix}/dev/{device_id}/bench      device -> server  benchmark results (outbox, acked)
    {prefix}/dev/{device_id}/benchreq   server -> device  retained signed benchmark request
    {prefix}/dev/{device_id}/desired/{model}
                                        server -> device  retained signed manifest (desired state)
    {prefix}/dev/{device_id}/ack        server -> device  event ids committed to the database
    {prefix}/art/{sha256}/{index}       server -> devices artifact chunk, content-addressed
    {prefix}/server/status              server -> devices retained "online"/"offline"; devices
                                        send a fresh hello whenever it turns "online"
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import WireError

DEFAULT_PREFIX = "deltafleet/v1"
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
        raise WireError(
            f"invalid device id {device_id!r}: use 1-64 letters, digits, '.', '_' or '-'"
        )
    return device_id


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def dev(self, device_id: str, leaf: str) -> str:
        return f"{self.prefix}/dev/{check_device_id(device_id)}/{leaf}"

    def hello(self, device_id: str) -> str:
        return self.dev(device_id, "hello")

    def status(self, device_id: str) -> str:
        return self.dev(device_id, "status")

    def events(self, device_id: str) -> str:
        return self.dev(device_id, "events")

    def ack(self, device_id: str) -> str:
        return self.dev(device_id, "ack")

    def telemetry(self, device_id: str) -> str:
        return self.dev(device_id, "telemetry")

    def chunk_request(self, device_id: str) -> str:
        return self.dev(device_id, "chunkreq")

    def portrait(self, device_id: str) -> str:
        return self.dev(device_id, "portrait")

    def bench(self, device_id: str) -> str:
        return self.dev(device_id, "bench")

    def bench_request(self, device_id: str) -> str:
        return self.dev(device_id, "benchreq")

    def desired(self, device_id: str, model: str) -> str:
        return f"{self.dev(device_id, 'desired')}/{model}"

    def desired_filter(self, device_id: str) -> str:
        return f"{self.dev(device_id, 'desired')}/+"

    def chunk(self, artifact_sha256: str, index: int) -> str:
        return f"{self.prefix}/art/{artifact_sha256}/{index}"

    def chunk_filter(self, artifact_sha256: str) -> str:
        return f"{self.prefix}/art/{artifact_sha256}/+"

    def server_status(self) -> str:
        return f"{self.prefix}/server/status"

    def all_devices(self, leaf: str) -> str:
        return f"{self.prefix}/dev/+/{leaf}"

    def parse_dev(self, topic: str) -> tuple[str, str]:
        """Split ``{prefix}/dev/{id}/{leaf}`` into (device_id, leaf) or raise WireError."""
        head = f"{self.prefix}/dev/"
        if not topic.startswith(head):
            raise WireError(f"not a device topic: {topic}")
        parts = topic[len(head):].split("/")
        if len(parts) != 2:
            raise WireError(f"not a device topic: {topic}")
        return check_device_id(parts[0]), parts[1]

    def parse_chunk(self, topic: str) -> tuple[str, int]:
        head = f"{self.prefix}/art/"
        parts = topic[len(head):].split("/") if topic.startswith(head) else []
        # isdigit() alone admits "²" and 5000-digit strings, on which int() raises ValueError
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()
                                   and len(parts[1]) <= 12):
            raise WireError(f"not a chunk topic: {topic}")
        return parts[0], int(parts[1])
