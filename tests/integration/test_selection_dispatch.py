"""Selection in dispatch: `fleetctl rollout model --prefer latency` sends each device the
variant its own measurements say is best, and a device no variant fits is skipped and never
sent a manifest.

A mixed fleet with the same labels on a real broker and a live (in-process) server, devices
simulated with the agent's own update machine. Portraits and benchmarks are stored as the
server stores what agents report (``fleet.portraits.record_*``): on the large devices FP32
measured faster than INT8 (no fast INT8 path), on the small ones only INT8's measured memory
fits, on the tiny one neither does. fleetctl runs as a user runs it (console script,
subprocess)."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deltafleet.server import catalog
from deltafleet.server.fleet import portraits as fp
from deltafleet.shared.messages import BenchResult, Portrait
from tests.harness.modelgen import make_int8_variant, make_onnx_model
from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker

FAST = ("--health-window", "1s", "--retry-backoff", "1s", "--state-timeout", "60s")
LABELS = {"site": "lab"}  # the same for every device: labels decide nothing here
MiB = 1 << 20
# measured on the device (model_rss_bytes) and p50 in us, per device kind and precision
MEASURED = {"big": {"fp32": (40 * MiB, 200), "int8": (12 * MiB, 320)},
            "small": {"fp32": (40 * MiB, 900), "int8": (12 * MiB, 700)},
            "tiny": {"fp32": (40 * MiB, 5000), "int8": (12 * MiB, 4000)}}
AVAILABLE = {"big": 8 << 30, "small": 32 * MiB, "tiny": 8 * MiB}  # 75% must hold the model
ORT = "1.20.1"


def fleetctl(lab: RolloutLab, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.fleetctl(*args, columns=100, actor="alice")


@pytest.fixture
def lab(rollout_lab, tmp_path: Path) -> RolloutLab:
    v1 = make_onnx_model(tmp_path / "m" / "v1.onnx", size_mb=0.3)
    v2 = make_onnx_model(tmp_path / "m" / "v2.onnx", size_mb=0.3, retrain_last_layer=True)
    lab = rollout_lab({"v1": v1, "v2": v2})
    int8 = make_int8_variant(v2, tmp_path / "m" / "v2-int8.onnx")
    with lab.store.session() as s:
        catalog.add_model_version(s, lab.blobs, "detector", "v2", int8, variant="int8",
                                  precision="int8")
    return lab


def _measure(lab: RolloutLab, kinds: dict[str, str]) -> None:
    """Store each device's portrait and its benchmarks of both v2 variants."""
    now = datetime.now(UTC)
    with lab.store.session() as s:
        version = catalog.resolve_version(s, "detector:v2")
        shas = {o.precision: (o.name, o.sha256) for o in catalog.variant_options(s, version.id)}
        fp.record_portraits(s, [Portrait(d, {
            "runtimes": {"onnxruntime": ORT}, "accelerators": ["cpu"],
            "memory": {"total_bytes": AVAILABLE[k], "available_bytes": AVAILABLE[k]},
            "disk": {"free_bytes": 1 << 34, "total_bytes": 1 << 35}}) for d, k in kinds.items()],
            now)
        fp.record_bench_results(s, [
            BenchResult(f"b-{d}-{p}", d, "bench-1", name, sha, "onnxruntime", ORT,
                        {"p50_us": MEASURED[k][p][1], "p95_us": MEASURED[k][p][1] * 2,
                         "load_ms": 3, "model_rss_bytes": MEASURED[k][p][0], "runs": 30})
            for d, k in kinds.items() for p, (name, sha) in shas.items()], now)


def _measured_fleet(lab: RolloutLab, kinds: dict[str, str]) -> None:
    """Devices named ``<kind>-NNN`` reporting a real ONNX Runtime version (selection checks
    opsets), measured (``_measure``), in group ``lab``."""
    for prefix in dict.fromkeys(kinds.values()):
        lab.add_devices(sum(1 for k in kinds.values() if k == prefix), LABELS, prefix=prefix)
    for dev in lab.fleet.devices.values():
        dev.runtimes = {"onnxruntime": ORT}
        dev.send_hello()
    lab.wait_for(lambda: all(lab.status_runtimes(d) == {"onnxruntime": ORT} for d in kinds),
                 30, "runtimes recorded")
    _measure(lab, kinds)
    lab.group("lab", site="lab")


def test_rollout_model_prefer_latency_sends_each_device_its_measured_best(lab: RolloutLab):
    kinds = {"big-000": "big", "big-001": "big", "small-000": "small", "small-001": "small",
             "tiny-000": "tiny"}
    _measured_fleet(lab, kinds)

    res = fleetctl(lab, "rollout", "model", "v2", "--group", "lab", "--prefer", "latency",
                   *FAST)
    assert res.returncode == 0, (res.stdout, res.stderr)
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("1 device(s) incompatible (no variant fits)"), res.stdout
    rid = int(lines[-1].split()[1])

    done = lab.wait_state(rid, {"completed"}, 90)
    by = {t["device"]: t for t in done["targets"]}
    assert {d: by[d]["variant"] for d in kinds if d != "tiny-000"} == {
        "big-000": "default", "big-001": "default", "small-000": "int8", "small-001": "int8"}
    assert all(by[d]["state"] == "healthy" for d in kinds if d != "tiny-000"), by
    tiny = by["tiny-000"]
    assert tiny["state"] == "skipped" and tiny["reason"].startswith("incompatible:"), tiny
    assert "memory" in tiny["reason"], tiny["reason"]
    # what the devices were sent: the chosen variant, and nothing at all to the tiny device
    sent = {d: [r.manifest.variant for r in dev.manifests]
            for d, dev in lab.fleet.devices.items()}
    assert sent == {"big-000": ["default"], "big-001": ["default"], "small-000": ["int8"],
                    "small-001": ["int8"], "tiny-000": []}, sent
    policy = json.loads(fleetctl(lab, "rollout", "status", str(rid), "--json").stdout)["policy"]
    assert policy["prefer"] == "latency"


def test_without_prefer_the_rollout_chooses_by_format_as_before(lab: RolloutLab):
    ids = lab.add_devices(2, LABELS, prefix="dev")
    lab.group("lab", site="lab")
    rid = lab.rollout("v2", "lab", health_window_s=1)
    done = lab.wait_state(rid, {"completed"}, 60)
    assert {t["variant"] for t in done["targets"]} == {"default"}
    assert "prefer" not in done["policy"]
    assert {t["device"] for t in done["targets"]} == set(ids)


def test_prefer_takes_one_of_the_objectives(lab: RolloutLab):
    lab.add_devices(1, LABELS, prefix="dev")
    lab.group("lab", site="lab")
    res = fleetctl(lab, "rollout", "model", "v2", "--group", "lab", "--prefer", "speed")
    assert res.returncode == 2 and "--prefer" in res.stderr, (res.stdout, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1


def test_an_accuracy_budget_keeps_out_the_variant_optimize_measured_too_lossy(lab: RolloutLab):
    """The int8 variant's accuracy as `model optimize --eval` records it (2 points below its
    parent): --prefer size sends it, --prefer size@1 does not, and the rollout keeps the
    budget in its policy."""
    from deltafleet.server.store.models import Variant  # noqa: PLC0415

    kinds = {"big-000": "big", "big-001": "big"}
    _measured_fleet(lab, kinds)
    with lab.store.session() as s:
        version = catalog.resolve_version(s, "detector:v2")
        by_name = {v.name: v for v in s.query(Variant).filter_by(version_id=version.id)}
        parent = by_name["default"]
        by_name["int8"].info = {**by_name["int8"].info, "optimize": {
            "parent": {"variant": "default", "sha256": parent.artifact_sha256},
            "accuracy": {"parent": 0.95, "variant": 0.93, "drop_points": 2.0}}}

    def plan(prefer: str) -> dict:
        res = fleetctl(lab, "rollout", "plan", "v2", "--group", "lab", "--prefer", prefer,
                       "--json")
        assert res.returncode == 0, (res.stdout, res.stderr)
        return json.loads(res.stdout)

    assert {d["variant"] for d in plan("size")["devices"]} == {"int8"}
    kept = plan("size@1")
    assert {d["variant"] for d in kept["devices"]} == {"default"}
    assert kept["prefer"] == "size@1"
    assert {d["variant"] for d in plan("accuracy")["devices"]} == {"default"}
    res = fleetctl(lab, "rollout", "model", "v2", "--group", "lab", "--prefer", "size@1",
                   *FAST)
    assert res.returncode == 0, (res.stdout, res.stderr)
    rid = int(res.stdout.strip().splitlines()[-1].split()[1])
    done = lab.wait_state(rid, {"completed"}, 90)
    assert {t["variant"] for t in done["targets"]} == {"default"}
    assert done["policy"]["prefer"] == "size@1"
    bad = fleetctl(lab, "rollout", "plan", "v2", "--group", "lab", "--prefer", "size@lots")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_model_add_records_what_a_variant_needs_and_selection_applies_it(lab: RolloutLab,
                                                                        tmp_path: Path):
    """`model add --accelerator cuda --min-runtime-version 1.18`: kept in the variant's info,
    shown by `model show`, and a device without CUDA or with an older runtime is told why
    not; a malformed value is one line, exit 2, and registers nothing."""
    from types import SimpleNamespace  # noqa: PLC0415

    from deltafleet.server.selection import DeviceFacts, variant_facts, why_not  # noqa: PLC0415
    from deltafleet.server.store.models import Variant  # noqa: PLC0415

    int8 = tmp_path / "m" / "v2-int8.onnx"
    res = fleetctl(lab, "model", "add", "detector", "v2", str(int8), "--variant", "int8-cuda",
                   "--precision", "int8", "--accelerator", "CUDA",
                   "--min-runtime-version", "1.18")
    assert res.returncode == 0, (res.stdout, res.stderr)
    for bad in (("--accelerator", "cu da"), ("--min-runtime-version", "1.x"),
                ("--accelerator", "\udced\udca0\udc80"), ("--accelerator", "x" * 33)):
        res = fleetctl(lab, "model", "add", "detector", "v2", str(int8), "--variant", "bad",
                       *bad)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    shown = fleetctl(lab, "model", "show", "detector").stdout
    assert "cuda, runtime >= 1.18" in shown and "variant bad" not in shown
    with lab.store.read() as s:
        row = s.query(Variant).filter_by(name="int8-cuda").one()
        facts = variant_facts(SimpleNamespace(name=row.name, sha256=row.artifact_sha256,
                                              format=row.format, precision=row.precision,
                                              size_bytes=1 << 20), row.info)
    cpu = DeviceFacts("a", "t", {"onnxruntime": "1.20.1"}, frozenset({"cpu"}), 8 << 30, 8 << 30)
    cuda_old = DeviceFacts("b", "t", {"onnxruntime": "1.17.0"}, frozenset({"cpu", "cuda"}),
                           8 << 30, 8 << 30)
    cuda = DeviceFacts("c", "t", {"onnxruntime": "1.20.1"}, frozenset({"cpu", "cuda"}),
                       8 << 30, 8 << 30)
    assert why_not(cpu, facts) == "needs cuda"
    assert why_not(cuda_old, facts) == "onnxruntime 1.17.0 < 1.18"
    assert why_not(cuda, facts) is None
