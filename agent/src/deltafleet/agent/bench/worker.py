"""The benchmark child: ``python -m deltafleet.agent.bench.worker SPEC.json`` loads one model
file, warms it up, times ``runs`` inferences and prints one JSON line of figures.

It runs niced (the parent sets ``os.nice`` before exec) in its own process, so the serving
process's latency, memory and GIL are untouched, and peak RSS is this model's alone:
``peak_rss_bytes`` is the child's high-water mark, ``model_rss_bytes`` what loading and
running the model added above the runtime already imported. Energy per inference is the RAPL
package counter's increase over the timed runs divided by ``runs`` (the whole package: other
load on the device counts too), only where the counter is readable.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path


def _status_bytes(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status (0 where unreadable).
    VmHWM, not ``ru_maxrss``: Linux keeps ru_maxrss across exec, so a child would report its
    parent's high-water mark."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if key == "VmHWM":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return 0


def measure(spec: dict) -> dict:
    import numpy as np

    from ..portrait import rapl_energy_uj
    from ..runtime import load_model, zero_feeds
    from ..serving import decode_golden

    fmt = spec["format"]
    if fmt == "onnx":
        import onnxruntime  # noqa: F401 - the runtime's own memory is not the model's
    else:
        with contextlib.suppress(ImportError):
            import ai_edge_litert.interpreter  # noqa: F401
    before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    model = load_model(Path(spec["path"]), fmt)
    load_ms = int((time.perf_counter() - t0) * 1000)
    feeds_list = decode_golden(tuple(spec.get("golden_inputs") or ()))
    if not feeds_list:  # generated inputs: seeded noise of each input's shape and dtype
        rng = np.random.default_rng(16)
        feeds_list = [{k: (rng.standard_normal(v.shape).astype(v.dtype)
                           if np.issubdtype(v.dtype, np.floating) else v)
                       for k, v in zero_feeds(model).items()} for _ in range(4)]
    for i in range(int(spec.get("warmup", 5))):
        model.run(feeds_list[i % len(feeds_list)])
    runs = int(spec["runs"])
    lat = []
    e0 = rapl_energy_uj(spec.get("sysfs_root", "/sys"))
    for i in range(runs):
        t = time.perf_counter_ns()
        model.run(feeds_list[i % len(feeds_list)])
        lat.append((time.perf_counter_ns() - t) // 1000)
    e1 = rapl_energy_uj(spec.get("sysfs_root", "/sys"))
    arr = np.array(lat)
    peak = _status_bytes("VmHWM")
    out = {"load_ms": load_ms, "p50_us": int(np.percentile(arr, 50)),
           "p95_us": int(np.percentile(arr, 95)), "peak_rss_bytes": int(peak),
           "model_rss_bytes": max(0, int(peak) - before), "runs": runs}
    if e0 is not None and e1 is not None and e1 >= e0:
        out["energy_uj_per_inference"] = (e1 - e0) // runs
    return out


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        print(json.dumps({"ok": True, "figures": measure(spec)}))
    except Exception as e:  # noqa: BLE001 - reported to the server as the result's error
        from deltafleet.shared.errors import one_line

        print(json.dumps({"ok": False, "error": one_line(e)[:400]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
