"""Agent configuration: a TOML file and/or FLEET_AGENT_* environment variables.

Example ``/etc/deltafleet/agent.toml``::

    device_id = "jetson-001"
    broker_url = "mqtt://fleet.example.com:1883"
    state_dir = "/var/lib/deltafleet"
    accelerator = "cuda"
    # Enrollment bundle (``fleetctl device enroll``): TLS identity and the root of trust.
    broker_url = "mqtts://fleet.example.com:8883"
    mqtt_ca_file = "/etc/deltafleet/ca.crt"
    mqtt_cert_file = "/etc/deltafleet/client.crt"
    mqtt_key_file = "/etc/deltafleet/client.key"
    root_of_trust = "/etc/deltafleet/root.json"     # pinned at first start
    trust_bundle = "/etc/deltafleet/trust.json"     # key list at enrollment
    # Legacy / simple mode instead of root_of_trust: pin the online key itself.
    # trusted_keys = ["/etc/deltafleet/signing.pub"]
    [labels]
    site = "berlin"
    hw = "jetson"

    api_port = 8470                    # local inference API on 127.0.0.1; 0 disables it
    [fallback_models]
    detector = "/opt/models/detector-tiny.onnx"

Environment variables override the file: FLEET_AGENT_DEVICE_ID, FLEET_AGENT_BROKER_URL,
FLEET_AGENT_STATE_DIR, FLEET_AGENT_TRUSTED_KEYS (comma-separated paths), FLEET_AGENT_LABELS
(``k=v,k=v``), FLEET_AGENT_ACCELERATOR, FLEET_AGENT_HARDWARE_ID, FLEET_AGENT_SYSFS_ROOT, FLEET_TOPIC_PREFIX,
FLEET_AGENT_API_PORT, FLEET_AGENT_SWAP_MODE, FLEET_AGENT_FALLBACK (``model=path,...``),
FLEET_AGENT_MQTT_CA_FILE, FLEET_AGENT_MQTT_CERT_FILE, FLEET_AGENT_MQTT_KEY_FILE,
FLEET_AGENT_ROOT_OF_TRUST, FLEET_AGENT_TRUST_BUNDLE, FLEET_AGENT_HEARTBEAT_S,
FLEET_AGENT_TELEMETRY_S,
FLEET_AGENT_DISK_MARGIN_BYTES, FLEET_AGENT_DISK_RETRY_S, FLEET_AGENT_DOWNLOAD_TIMEOUT_S; for
tests, FLEET_AGENT_CRASH_AT and FLEET_AGENT_CRASH_AFTER_CHUNKS (``FaultPlan``).
See docs/agent.md for every key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deltafleet.shared import DEFAULT_PREFIX, HealthPolicy, WireError, check_device_id

from .errors import ConfigError

_TRIAL_DEFAULTS = HealthPolicy()

CRASH_STEPS = ("download", "patch", "stage", "activate", "trial", "commit", "rollback")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Fault injection for tests (FLEET_AGENT_CRASH_AT, FLEET_AGENT_CRASH_AFTER_CHUNKS):
    SIGKILL at the step ``crash_at`` (one of ``CRASH_STEPS``), or exit after
    ``crash_after_chunks`` accepted chunks (0 = never). The default plan injects nothing."""
    crash_at: str = ""
    crash_after_chunks: int = 0


@dataclass(frozen=True, slots=True)
class AgentConfig:
    device_id: str
    broker_url: str = "mqtt://127.0.0.1:1883"
    state_dir: Path = Path("/var/lib/deltafleet")
    trusted_keys: tuple[Path, ...] = ()  # legacy: pinned online keys (no rotation)
    # Root of trust (TUF-style): root.json pinned at first start, trust.json the key list.
    root_of_trust: Path | None = None
    trust_bundle: Path | None = None
    # TLS identity for mqtts:// (the enrollment bundle's ca.crt, client.crt, client.key).
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)
    accelerator: str = "none"
    hardware_id: str | None = None
    sysfs_root: str = "/sys"  # where the portrait reads power sensors (RAPL, hwmon)
    topic_prefix: str = DEFAULT_PREFIX
    mqtt_protocol: str = "auto"
    keepalive_s: int = 30
    heartbeat_s: float = 30.0  # re-publish the retained online status this often; 0 = off
    # Send an inference telemetry summary (``telemetry``) through the outbox this often; 0 = off.
    telemetry_interval_s: float = 60.0
    chunk_retry_s: float = 3.0  # re-request missing chunks after this long without progress
    download_timeout_s: float = 600.0
    max_artifact_bytes: int = 4 << 30
    # Free space: a download starts only if artifact + target + this margin fit the state
    # directory's filesystem (the margin keeps room for the journal, state.json, the outbox).
    # Too little space, or ENOSPC/EDQUOT on any write, is retried every disk_retry_s.
    disk_margin_bytes: int = 16 << 20
    disk_retry_s: float = 30.0
    # bspatch runs in a child process with this address-space cap (default: half the
    # machine's memory) and wall-clock timeout.
    patch_memory_bytes: int | None = None
    patch_timeout_s: float = 600.0
    # Local inference API (HTTP on api_host:api_port; api_port = 0 disables it).
    api_host: str = "127.0.0.1"
    api_port: int = 8470
    results_cache_size: int = 100  # last-N inference results kept for the API
    fallback_models: dict[str, str] = field(default_factory=dict)  # model name -> model file
    # Hot swap: "auto" loads the new model beside the old one when MemAvailable holds
    # swap_memory_factor x its file size, else unloads first ("cold") and holds requests.
    swap_mode: str = "auto"  # "auto" | "warm" | "cold"
    swap_memory_factor: float = 3.0
    hold_timeout_s: float = 30.0  # longest a request waits for a cold swap
    warmup_runs: int = 3
    # Trial defaults for keys the manifest's health_policy leaves out (HealthPolicy's own).
    trial_max_error_rate_ppm: int = _TRIAL_DEFAULTS.max_error_rate_ppm
    trial_max_p95_ratio_pct: int = _TRIAL_DEFAULTS.max_p95_ratio_pct
    trial_min_requests: int = _TRIAL_DEFAULTS.min_requests
    trial_p95_slack_us: int = _TRIAL_DEFAULTS.p95_slack_us
    max_trial_restarts: int = 1  # agent restarts during one trial before it rolls back
    # Outbox: exponential backoff with full jitter between delivery attempts.
    outbox_backoff_min_s: float = 0.5
    outbox_backoff_max_s: float = 30.0
    outbox_max_messages: int = 10_000
    # An entry sent but not acked by the server (after its database commit) is sent again
    # after outbox_resend_after_s, doubled per try up to outbox_resend_max_s (jittered).
    outbox_resend_after_s: float = 5.0
    outbox_resend_max_s: float = 300.0
    faults: FaultPlan = field(default_factory=FaultPlan)

    def validate(self) -> AgentConfig:
        try:
            check_device_id(self.device_id)
        except WireError as e:
            raise ConfigError(str(e)) from e
        if self.swap_mode not in ("auto", "warm", "cold"):
            raise ConfigError(f"swap_mode {self.swap_mode!r}: use auto, warm or cold")
        if not 0 <= self.api_port <= 65535:
            raise ConfigError(f"api_port {self.api_port} is not a TCP port (0 disables the API)")
        for name, path in self.fallback_models.items():
            if not Path(path).is_file():
                raise ConfigError(f"fallback model for {name}: {path} does not exist")
        if self.root_of_trust is not None and self.trusted_keys:
            raise ConfigError("set either root_of_trust (enrollment) or trusted_keys (legacy "
                              "pinned online key), not both")
        if self.root_of_trust is None and not self.trusted_keys:
            raise ConfigError("no root of trust: set root_of_trust (root.json from `fleetctl "
                              "device enroll`) or trusted_keys (the server's signing.pub)")
        for what, f in [("trusted key file", k) for k in self.trusted_keys] + [
                ("root_of_trust", self.root_of_trust), ("trust_bundle", self.trust_bundle),
                ("mqtt_ca_file", self.mqtt_ca_file), ("mqtt_cert_file", self.mqtt_cert_file),
                ("mqtt_key_file", self.mqtt_key_file)]:
            if f is not None and not Path(f).is_file():
                raise ConfigError(f"{what} {f} does not exist")
        if (self.mqtt_cert_file is None) != (self.mqtt_key_file is None):
            raise ConfigError("mqtt_cert_file and mqtt_key_file go together")
        if self.disk_margin_bytes < 0 or self.disk_retry_s <= 0:
            raise ConfigError("disk_margin_bytes must be >= 0 and disk_retry_s > 0")
        if self.telemetry_interval_s < 0:
            raise ConfigError("telemetry_interval_s must be >= 0 (0 turns telemetry off)")
        if self.heartbeat_s < 0 or self.patch_timeout_s <= 0:
            raise ConfigError("heartbeat_s must be >= 0 and patch_timeout_s > 0")
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
        ("sysfs_root", "FLEET_AGENT_SYSFS_ROOT"),
        ("topic_prefix", "FLEET_TOPIC_PREFIX"),
        ("mqtt_ca_file", "FLEET_AGENT_MQTT_CA_FILE"),
        ("mqtt_cert_file", "FLEET_AGENT_MQTT_CERT_FILE"),
        ("mqtt_key_file", "FLEET_AGENT_MQTT_KEY_FILE"),
        ("root_of_trust", "FLEET_AGENT_ROOT_OF_TRUST"),
        ("trust_bundle", "FLEET_AGENT_TRUST_BUNDLE"),
    ]:
        if env.get(var):
            values[key] = env[var]
    if env.get("FLEET_AGENT_TRUSTED_KEYS"):
        values["trusted_keys"] = env["FLEET_AGENT_TRUSTED_KEYS"].split(",")
    if env.get("FLEET_AGENT_API_PORT"):
        try:
            values["api_port"] = int(env["FLEET_AGENT_API_PORT"])
        except ValueError as e:
            raise ConfigError("FLEET_AGENT_API_PORT must be an integer") from e
    if env.get("FLEET_AGENT_HEARTBEAT_S"):
        try:
            values["heartbeat_s"] = float(env["FLEET_AGENT_HEARTBEAT_S"])
        except ValueError as e:
            raise ConfigError("FLEET_AGENT_HEARTBEAT_S must be a number of seconds") from e
    for key, var, kind in (("telemetry_interval_s", "FLEET_AGENT_TELEMETRY_S", float),
                           ("disk_margin_bytes", "FLEET_AGENT_DISK_MARGIN_BYTES", int),
                           ("disk_retry_s", "FLEET_AGENT_DISK_RETRY_S", float),
                           ("download_timeout_s", "FLEET_AGENT_DOWNLOAD_TIMEOUT_S", float)):
        if env.get(var):
            try:
                values[key] = kind(env[var])
            except ValueError as e:
                raise ConfigError(f"{var} must be a number") from e
    if env.get("FLEET_AGENT_SWAP_MODE"):
        values["swap_mode"] = env["FLEET_AGENT_SWAP_MODE"]
    if env.get("FLEET_AGENT_FALLBACK"):
        values["fallback_models"] = parse_labels(env["FLEET_AGENT_FALLBACK"])
    if env.get("FLEET_AGENT_LABELS"):
        values["labels"] = parse_labels(env["FLEET_AGENT_LABELS"])
    if env.get("FLEET_AGENT_CRASH_AT") or env.get("FLEET_AGENT_CRASH_AFTER_CHUNKS"):
        try:
            values["faults"] = FaultPlan(env.get("FLEET_AGENT_CRASH_AT", ""),
                                         int(env.get("FLEET_AGENT_CRASH_AFTER_CHUNKS") or 0))
        except ValueError as e:
            raise ConfigError("FLEET_AGENT_CRASH_AFTER_CHUNKS must be an integer") from e
    values.update({k: v for k, v in overrides.items() if v not in (None, (), [], {})})
    if "device_id" not in values:
        raise ConfigError("device_id is required (config file, FLEET_AGENT_DEVICE_ID or --device-id)")
    known = set(AgentConfig.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    if isinstance(values.get("fallback_models"), (str, list)):
        values["fallback_models"] = parse_labels(values["fallback_models"])
    if isinstance(values.get("labels"), (str, list)):
        values["labels"] = parse_labels(values["labels"])
    values["state_dir"] = Path(values.get("state_dir", "/var/lib/deltafleet"))
    values["trusted_keys"] = tuple(Path(p) for p in values.get("trusted_keys", ()))
    for key in ("root_of_trust", "trust_bundle", "mqtt_ca_file", "mqtt_cert_file",
                "mqtt_key_file"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    try:
        cfg = AgentConfig(**values)
    except TypeError as e:
        raise ConfigError(f"invalid config: {e}") from e
    return replace(cfg).validate()
