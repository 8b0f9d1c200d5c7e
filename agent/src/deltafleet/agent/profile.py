"""What the device is: agent version, hardware id and the profile sent in the hello."""

from __future__ import annotations

import os
import platform
import shutil
from importlib.metadata import PackageNotFoundError, version

from deltafleet.shared.messages import MAX_HARDWARE_ID_CHARS

from .config import AgentConfig
from .runtime import available_runtimes


def agent_version() -> str:
    try:
        return version("deltafleet-agent")
    except PackageNotFoundError:
        return "0+unknown"


def hardware_id(cfg: AgentConfig) -> str | None:
    """``cfg.hardware_id`` or /etc/machine-id, as reported in the hello and bound in manifests
    (at most the characters the server stores)."""
    hw = cfg.hardware_id
    if hw is None:
        try:
            hw = open("/etc/machine-id").read().strip() or None  # noqa: SIM115
        except OSError:
            hw = None
    return hw[:MAX_HARDWARE_ID_CHARS] if hw else None


def device_profile(cfg: AgentConfig) -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    hw = hardware_id(cfg)
    return {
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": platform.processor() or platform.machine(),
        "memory_bytes": int(mem),
        "accelerator": cfg.accelerator,
        "runtimes": available_runtimes(),
        "disk_free_bytes": int(shutil.disk_usage(cfg.state_dir).free),
        "hardware_id": hw,
    }


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
