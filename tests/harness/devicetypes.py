"""A generated fleet of device types with distinct profiles and benchmark figures, for
selection tests and ``scripts/bench/selection.py``.

``device_types(n)`` makes ``n`` types (arch x CPU class x memory x accelerator x runtimes,
each with its own speed), ``VARIANTS`` is a version's variant set (ONNX FP32 / INT8 / FP16 for
CUDA, TFLite INT8) and ``type_figures(t, v)`` the latency and memory a type measures for a
variant: deterministic, so a brute-force check can recompute the best variant per type.
``fleet(types, devices)`` spreads devices over the types. No deltafleet imports beyond the
pure ``server.selection``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from deltafleet.server.selection import DeviceFacts, Figures, VariantFacts

MiB = 1 << 20

VARIANTS = (
    VariantFacts("onnx-fp32", "a" * 64, "onnx", "fp32", 40 * MiB, opset=17, accuracy=0.920),
    VariantFacts("onnx-int8", "b" * 64, "onnx", "int8", 10 * MiB, opset=17, accuracy=0.914),
    VariantFacts("onnx-fp16-cuda", "c" * 64, "onnx", "fp16", 20 * MiB, opset=17,
                 accelerator="cuda", accuracy=0.919),
    VariantFacts("tflite-int8", "d" * 64, "tflite", "int8", 11 * MiB, accuracy=0.905),
    VariantFacts("onnx-fp32-op21", "e" * 64, "onnx", "fp32", 38 * MiB, opset=21,
                 min_runtime_version="1.18", accuracy=0.921),
)

ARCHES = ("x86_64", "aarch64", "armv7l")
CPUS = ("atom", "core-i3", "core-i5", "core-i7", "xeon", "cortex-a53", "cortex-a72",
        "cortex-a76", "carmel", "ryzen")
MEMORY_MIB = (96, 256, 512, 1024, 2048, 4096, 8192, 16384)
ORT_VERSIONS = ("1.16.3", "1.17.1", "1.18.0", "1.20.1", "1.22.0")


@dataclass(frozen=True, slots=True)
class DeviceType:
    name: str
    arch: str
    cpu: str
    memory_bytes: int
    accelerator: str | None
    runtimes: dict[str, str]
    speed: float  # relative to 1.0; latency scales with 1/speed
    int8_gain: float  # how much faster INT8 runs than FP32 here (VNNI/dotprod: > 2)
    has_baseline: bool  # benchmarks exist for this type (else selection uses static figures)

    def facts(self, device_id: str, memory_free_fraction: float = 0.6) -> DeviceFacts:
        providers = frozenset({"cpu", *([self.accelerator] if self.accelerator else [])})
        return DeviceFacts(device_id, self.name, self.runtimes, providers,
                           int(self.memory_bytes * memory_free_fraction), 4096 * MiB)


def device_types(n: int = 240, seed: int = 16) -> list[DeviceType]:
    rng = random.Random(seed)
    out: list[DeviceType] = []
    seen: set[str] = set()
    while len(out) < n:
        arch, cpu = rng.choice(ARCHES), rng.choice(CPUS)
        mem = rng.choice(MEMORY_MIB) * MiB
        accel = rng.choice((None, None, None, "cuda", "npu"))
        runtimes: dict[str, str] = {}
        if rng.random() < 0.85:
            runtimes["onnxruntime"] = rng.choice(ORT_VERSIONS)
        if rng.random() < 0.4 or not runtimes:
            runtimes["tflite-runtime"] = "2.14.0"
        name = f"{arch}-{cpu}-{mem // MiB}m-{accel or 'cpu'}-{len(out)}"
        if name in seen:
            continue
        seen.add(name)
        out.append(DeviceType(name, arch, cpu, mem, accel, runtimes,
                              speed=round(rng.uniform(0.2, 4.0), 3),
                              int8_gain=round(rng.uniform(0.7, 3.5), 3),
                              has_baseline=rng.random() < 0.9))
    return out


def type_figures(t: DeviceType, v: VariantFacts) -> Figures:
    """What devices of type ``t`` measure for variant ``v`` (deterministic)."""
    base_us = v.size_bytes / MiB * 100 / t.speed  # 100 us per MiB of FP32 weights at speed 1
    if v.precision == "int8":
        base_us = base_us * 4 / t.int8_gain  # a quarter of the bytes, gain-dependent speed
    if v.accelerator and v.accelerator == t.accelerator:
        base_us /= 6
    if v.format == "tflite":
        base_us *= 1.1
    p50 = max(1, int(base_us))
    return Figures(p50_us=p50, p95_us=int(p50 * 1.3), load_ms=int(v.size_bytes / MiB * 3),
                   model_rss_bytes=int(v.size_bytes * 1.5 + 6 * MiB), devices=5)


def baselines(types: list[DeviceType]) -> dict[tuple[str, str], Figures]:
    return {(t.name, v.sha256): type_figures(t, v)
            for t in types if t.has_baseline for v in VARIANTS}


def fleet(types: list[DeviceType], devices: int) -> list[DeviceFacts]:
    """``devices`` devices spread round-robin over ``types``."""
    return [types[i % len(types)].facts(f"dev-{i:05d}") for i in range(devices)]
