"""The device portrait: what the device can actually use, beside its static profile.

- **ONNX Runtime providers**: ``get_available_providers()`` lists what the build has; each is
  then tried on a tiny model made here (an Identity graph encoded by hand, so the agent needs
  no ``onnx`` package). A provider that fails to open a session (a missing CUDA library, a
  plugin that does not load) is reported ``ok: false`` with the one-line error: CPU is then
  what the runtime falls back to. Devices of ONNX Runtime >= 1.22 also list their EP devices.
- **LiteRT / tflite delegates**: the runtime's built-in CPU (XNNPACK) path, then each known
  external delegate library the device has (Edge TPU, GPU, VX, QNN), loaded to see if it works.
- **Runtime versions**, **memory** (total, available: MemAvailable, or less when the
  process's cgroup v2 ``memory.max`` leaves less), **disk** (free and total of the
  state directory), **CPU** (count, model, the few flags that decide INT8 speed).
- **Power**, where the device exposes it: RAPL package energy counters
  (``class/powercap/intel-rapl:*/energy_uj``) and hwmon power sensors
  (``class/hwmon/hwmon*/power*_input``, microwatts) under ``sysfs_root`` (``/sys``; tests pass
  a fixture tree).

Every list is bounded (``MAX_ITEMS``) and every string clipped (``MAX_TEXT``): the server
refuses a portrait over its limits (``server.guard.PORTRAIT_LIMITS``). The provider probe is
done once per process (``probe_accelerators``); memory, disk and power are read each time.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import struct
from pathlib import Path
from typing import Any

from deltafleet.shared.errors import one_line

from .runtime import available_runtimes

__all__ = ["MAX_ITEMS", "MAX_TEXT", "cgroup_memory_headroom", "device_portrait", "power_readings",
           "probe_accelerators", "rapl_energy_uj", "tiny_onnx_model"]

MAX_ITEMS = 16
MAX_TEXT = 120
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "f16c", "fma",
             "asimd", "asimddp", "asimdhp", "sve", "i8mm", "neon")
TFLITE_DELEGATES = {  # name -> shared libraries that provide it
    "edgetpu": ("libedgetpu.so.1",),
    "gpu": ("libtensorflowlite_gpu_delegate.so",),
    "vx": ("libvx_delegate.so",),
    "qnn": ("libQnnTFLiteDelegate.so",),
}
ACCELERATOR_OF_PROVIDER = {
    "CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "tensorrt", "OpenVINOExecutionProvider": "openvino",
    "DmlExecutionProvider": "directml", "CoreMLExecutionProvider": "coreml",
    "QNNExecutionProvider": "npu", "VitisAIExecutionProvider": "npu",
    "ROCMExecutionProvider": "rocm", "MIGraphXExecutionProvider": "rocm",
    "XnnpackExecutionProvider": "cpu", "NnapiExecutionProvider": "npu",
    "ACLExecutionProvider": "cpu", "ArmNNExecutionProvider": "cpu",
    "AzureExecutionProvider": None,  # a remote endpoint, not an accelerator of the device
}


def _clip(text: Any) -> str:
    return str(text)[:MAX_TEXT]


# -- a tiny ONNX model without the onnx package -----------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, value: bytes | int) -> bytes:
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _value_info(name: str) -> bytes:
    dim = _field(1, _field(1, 4))  # TensorShapeProto.dim { dim_value: 4 }
    tensor = _field(1, 1) + _field(2, dim)  # elem_type FLOAT, shape
    return _field(1, name.encode()) + _field(2, _field(1, tensor))


def tiny_onnx_model() -> bytes:
    """A valid ModelProto: y = Identity(x), float[4], IR 8, opset 13."""
    node = _field(1, b"x") + _field(2, b"y") + _field(3, b"id") + _field(4, b"Identity")
    graph = (_field(1, node) + _field(2, b"portrait") + _field(11, _value_info("x"))
             + _field(12, _value_info("y")))
    opset = _field(1, b"") + _field(2, 13)
    return _field(1, 8) + _field(8, opset) + _field(7, graph)


# -- accelerators -----------------------------------------------------------------------------
def _onnx_providers() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        return [], []
    model = tiny_onnx_model()
    out: list[dict[str, Any]] = []
    for name in ort.get_available_providers()[:MAX_ITEMS]:
        entry: dict[str, Any] = {"runtime": "onnxruntime", "name": _clip(name)}
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 4
            sess = ort.InferenceSession(model, opts, providers=[name])
            sess.run(None, {"x": np.zeros(4, np.float32)})
            used = sess.get_providers()
            entry["ok"] = name in used
            if not entry["ok"]:
                entry["error"] = _clip(f"fell back to {', '.join(used)}")
        except Exception as e:  # noqa: BLE001 - any plugin failure means: not usable
            entry.update(ok=False, error=_clip(one_line(e)))
        out.append(entry)
    devices: list[dict[str, Any]] = []
    get_ep_devices = getattr(ort, "get_ep_devices", None)
    if get_ep_devices is not None:
        try:
            for d in list(get_ep_devices())[:MAX_ITEMS]:
                hw = getattr(d, "device", None)
                devices.append({"ep": _clip(getattr(d, "ep_name", "?")),
                                "type": _clip(getattr(getattr(hw, "type", None), "name", "?")),
                                "vendor": _clip(getattr(hw, "vendor", "") or "")})
        except Exception:  # noqa: BLE001 - an optional listing
            devices = []
    return out, devices


def _tflite_delegates() -> list[dict[str, Any]]:
    load_delegate = None
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            mod = __import__(module, fromlist=["load_delegate"])
        except ImportError:
            continue
        load_delegate = getattr(mod, "load_delegate", None)
        runtime = "litert" if module.startswith("ai_edge") else "tflite-runtime"
        break
    if load_delegate is None:
        return []
    out = [{"runtime": runtime, "name": "xnnpack", "ok": True}]  # built into the CPU path
    for name, libs in TFLITE_DELEGATES.items():
        for lib in libs:
            try:
                ctypes.CDLL(lib)
            except OSError:
                continue  # not on this device: not listed
            try:
                load_delegate(lib)
            except (ValueError, OSError, RuntimeError) as e:
                out.append({"runtime": runtime, "name": name, "ok": False,
                            "error": _clip(one_line(e))})
            else:
                out.append({"runtime": runtime, "name": name, "ok": True})
            break
    return out[:MAX_ITEMS]


_PROBED: dict[str, Any] | None = None


def probe_accelerators(*, refresh: bool = False) -> dict[str, Any]:
    """Providers, EP devices, delegates and the accelerators that work (once per process)."""
    global _PROBED
    if _PROBED is None or refresh:
        providers, ep_devices = _onnx_providers()
        delegates = _tflite_delegates()
        usable = {"cpu"}
        for p in providers:
            accel = ACCELERATOR_OF_PROVIDER.get(p["name"], p["name"].lower()[:32])
            if p.get("ok") and accel:
                usable.add(accel)
        usable |= {d["name"] for d in delegates if d.get("ok") and d["name"] != "xnnpack"}
        _PROBED = {"providers": providers, "ep_devices": ep_devices, "delegates": delegates,
                   "accelerators": sorted(usable)[:MAX_ITEMS]}
    return _PROBED


# -- power ------------------------------------------------------------------------------------
def rapl_energy_uj(sysfs_root: Path | str = "/sys") -> int | None:
    """The sum of the RAPL package counters (microjoules), None when none is readable."""
    total = None
    for zone in sorted(Path(sysfs_root, "class/powercap").glob("intel-rapl:*")):
        if zone.name.count(":") != 1:  # packages only; sub-zones are inside them
            continue
        try:
            value = int((zone / "energy_uj").read_text().strip())
        except (OSError, ValueError):
            continue
        total = (total or 0) + value
    return total


def power_readings(sysfs_root: Path | str = "/sys") -> list[dict[str, Any]]:
    """RAPL zones (energy counter, uJ) and hwmon power sensors (uW) that can be read."""
    root = Path(sysfs_root)
    out: list[dict[str, Any]] = []
    for zone in sorted(root.glob("class/powercap/intel-rapl:*")):
        try:
            value = int((zone / "energy_uj").read_text().strip())
        except (OSError, ValueError):
            continue
        name = _read(zone / "name") or zone.name
        out.append({"kind": "rapl", "name": _clip(f"{zone.name}:{name}"), "energy_uj": value})
    for sensor in sorted(root.glob("class/hwmon/hwmon*/power*_input")):
        try:
            value = int(sensor.read_text().strip())
        except (OSError, ValueError):
            continue
        chip = _read(sensor.parent / "name") or sensor.parent.name
        label = _read(sensor.with_name(sensor.name.replace("_input", "_label"))) or sensor.name
        out.append({"kind": "hwmon", "name": _clip(f"{chip}:{label}"), "power_uw": value})
    return out[:MAX_ITEMS]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


# -- cpu and memory ---------------------------------------------------------------------------
def _cpu(proc_root: Path) -> dict[str, Any]:
    model, flags = None, set()
    try:
        for line in (proc_root / "cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and model is None:
                model = value.strip()
            elif key in ("flags", "features"):
                flags |= set(value.split())
    except OSError:
        pass
    return {"count": os.cpu_count() or 1, "model": _clip(model or platform.processor() or "?"),
            "flags": sorted(f for f in CPU_FLAGS if f in flags)}


def _memory(proc_root: Path) -> dict[str, int | None]:
    found: dict[str, int | None] = {"total_bytes": None, "available_bytes": None}
    try:
        for line in (proc_root / "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                kb = int(rest.split()[0])
                found["total_bytes" if key == "MemTotal" else "available_bytes"] = kb * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found


def cgroup_memory_headroom(sysfs_root: Path | str = "/sys",
                           proc_root: Path | str = "/proc") -> int | None:
    """``memory.max - memory.current`` of this process's cgroup (v2), None without a limit:
    in a container the limit, not the host's MemAvailable, is what a model may use."""
    base = Path(sysfs_root, "fs/cgroup")
    candidates = []
    own = _read(Path(proc_root, "self/cgroup"))
    for line in (own or "").splitlines():
        if line.startswith("0::"):
            candidates.append(base / line[3:].lstrip("/"))
    candidates.append(base)
    for d in candidates:
        limit = _read(d / "memory.max")
        if limit is None:
            continue
        if limit == "max":
            return None
        try:
            return max(0, int(limit) - int(_read(d / "memory.current") or 0))
        except ValueError:
            return None
    return None


def device_portrait(state_dir: Path | str, *, sysfs_root: Path | str = "/sys",
                    proc_root: Path | str = "/proc") -> dict[str, Any]:
    """The portrait as sent in a ``Portrait`` message (bounded; see the module docstring)."""
    usage = shutil.disk_usage(state_dir)
    memory = _memory(Path(proc_root))
    headroom = cgroup_memory_headroom(sysfs_root, proc_root)
    if headroom is not None:
        memory["cgroup_headroom_bytes"] = headroom
        avail = memory["available_bytes"]
        memory["available_bytes"] = headroom if avail is None else min(avail, headroom)
    return {
        "runtimes": {k: _clip(v) for k, v in available_runtimes().items()},
        **probe_accelerators(),
        "cpu": _cpu(Path(proc_root)),
        "memory": memory,
        "disk": {"free_bytes": int(usage.free), "total_bytes": int(usage.total)},
        "power": power_readings(sysfs_root),
        "python": _clip(platform.python_version()),
        "pointer_bits": struct.calcsize("P") * 8,
    }
