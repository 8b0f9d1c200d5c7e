"""Agent configuration: a TOML file and/or FLEET_AGENT_* environment variables.

Example ``/etc/deltafleet/agent.toml``::

    device_id = "jetson-001"
    broker_url = "mqtt://fleet.example.com:1883"
    state_dir = "/var/lib/deltafleet"
    trusted_keys = ["/etc/deltafleet/signing.pub"]
    accelerator = "cuda"
    [labels]
    site = "berlin"
    hw = "jetson"

Environment variables override the file: FLEET_AGENT_DEVICE_ID, FLEET_AGENT_BROKER_URL,
FLEET_AGENT_STATE_DIR, FLEET_AGENT_TRUSTED_KEYS (comma-separated paths), FLEET_AGENT_LABELS
(``k=v,k=v``), FLEET_AGENT_ACCELERATOR, FLEET_AGENT_HARDWARE_ID, FLEET_TOPIC_PREFIX.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deltafleet.shared import DEFAULT_PREFIX, WireError, check_device_id

from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class AgentConfig:
    device_id: str
    broker_url: str = "mqtt://127.0.0.1:1883"
    state_dir: Path = Path("/var/lib/deltafleet")
    trusted_keys: tuple[Path, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    accelerator: str = "none"
    hardware_id: str | None = None
    topic_prefix: str = DEFAULT_PREFIX
    mqtt_protocol: str = "auto"
    keepalive_s: int = 30
    chunk_retry_s: float = 3.0  # re-request missing chunks after this long without progress
    download_timeout_s: float = 600.0
    max_artifact_bytes: int = 4 << 30

    def validate(self) -> AgentConfig:
        try:
            check_device_id(self.device_id)
        except WireError as e:
            raise ConfigError(str(e)) from e
        if not self.trusted_keys:
            raise ConfigError("no trusted key: set trusted_keys (the server's signing.pub)")
        for k in self.trusted_keys:
            if not Path(k).is_file():
                raise ConfigError(f"trusted key file {k} does not exist")
        return self


def parse_labels(text: str | list[str]) -> dict[str, str]:
    items = text.split(",") if isinstance(text, str) else text
    labels: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"label {item!r} is not KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels


def load_config(path: Path | None = None, **overrides: Any) -> AgentConfig:
    """File, then environment, then explicit overrides (CLI flags); None values are ignored."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values.update(tomllib.loads(Path(path).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
    env = os.environ
    for key, var in [
        ("device_id", "FLEET_AGENT_DEVICE_ID"),
        ("broker_url", "FLEET_AGENT_BROKER_URL"),
        ("state_dir", "FLEET_AGENT_STATE_DIR"),
        ("accelerator", "FLEET_AGENT_ACCELERATOR"),
        ("hardware_id", "FLEET_AGENT_HARDWARE_ID"),
        ("topic_prefix", "FLEET_TOPIC_PREFIX"),
    ]:
        if env.get(var):
            values[key] = env[var]
    if env.get("FLEET_AGENT_TRUSTED_KEYS"):
        values["trusted_keys"] = env["FLEET_AGENT_TRUSTED_KEYS"].split(",")
    if env.get("FLEET_AGENT_LABELS"):
        values["labels"] = parse_labels(env["FLEET_AGENT_LABELS"])
    values.update({k: v for k, v in overrides.items() if v not in (None, (), [], {})})
    if "device_id" not in values:
        raise ConfigError("device_id is required (config file, FLEET_AGENT_DEVICE_ID or --device-id)")
    known = set(AgentConfig.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    if isinstance(values.get("labels"), (str, list)):
        values["labels"] = parse_labels(values["labels"])
    values["state_dir"] = Path(values.get("state_dir", AgentConfig.state_dir))
    values["trusted_keys"] = tuple(Path(p) for p in values.get("trusted_keys", ()))
    try:
        cfg = AgentConfig(**values)
    except TypeError as e:
        raise ConfigError(f"invalid config: {e}") from e
    return replace(cfg).validate()
