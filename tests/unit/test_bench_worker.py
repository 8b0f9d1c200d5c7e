"""The benchmark child (agent.bench.worker) on a real ONNX Runtime: figures it reports, energy
only where a RAPL counter is readable, errors as one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness.modelgen import make_onnx_model


def run_worker(tmp_path: Path, **spec) -> dict:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    res = subprocess.run([sys.executable, "-m", "deltafleet.agent.bench.worker", str(path)],
                         capture_output=True, text=True, timeout=120)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_worker_reports_latency_memory_and_energy_from_rapl(tmp_path):
    import onnxruntime  # noqa: F401 - the workspace installs it: a missing runtime fails
    model = make_onnx_model(tmp_path / "m.onnx", size_mb=0.5)
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text("1000\n")  # a counter that does not move: 0 per inference
    doc = run_worker(tmp_path, path=str(model), format="onnx", runs=20, warmup=2,
                     sysfs_root=str(tmp_path / "sys"))
    assert doc["ok"], doc
    f = doc["figures"]
    assert f["runs"] == 20 and 0 < f["p50_us"] <= f["p95_us"]
    assert f["peak_rss_bytes"] >= f["model_rss_bytes"] > 0
    assert f["energy_uj_per_inference"] == 0


def test_worker_without_rapl_reports_no_energy_and_a_bad_file_as_an_error(tmp_path):
    import onnxruntime  # noqa: F401 - the workspace installs it: a missing runtime fails
    model = make_onnx_model(tmp_path / "m.onnx", size_mb=0.2)
    doc = run_worker(tmp_path, path=str(model), format="onnx", runs=5, warmup=0,
                     sysfs_root=str(tmp_path / "none"))
    assert doc["ok"] and "energy_uj_per_inference" not in doc["figures"]
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    bad = run_worker(tmp_path, path=str(tmp_path / "bad.onnx"), format="onnx", runs=5)
    assert bad["ok"] is False and "\n" not in bad["error"]
