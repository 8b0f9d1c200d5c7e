"""server.selection: constraints, objectives, figure sources and reasons (a table of device
types x variants x objectives), and the generated 240-type fleet against a brute force."""

from __future__ import annotations

import pytest

from deltafleet.server.selection import (
    DeviceFacts,
    Figures,
    Objective,
    VariantFacts,
    device_type_of,
    plan_fleet,
    select_variant,
)
from scripts.bench.selection import brute_force
from tests.harness.devicetypes import VARIANTS, baselines, device_types

MiB = 1 << 20
FP32 = VariantFacts("fp32", "a" * 64, "onnx", "fp32", 40 * MiB, opset=17, accuracy=0.92)
INT8 = VariantFacts("int8", "b" * 64, "onnx", "int8", 10 * MiB, opset=17, accuracy=0.91)
CUDA = VariantFacts("fp16-cuda", "c" * 64, "onnx", "fp16", 20 * MiB, opset=17,
                    accelerator="cuda", accuracy=0.918)
TFL = VariantFacts("tfl-int8", "d" * 64, "tflite", "int8", 11 * MiB, accuracy=0.90)
NEW_OPSET = VariantFacts("fp32-op22", "e" * 64, "onnx", "fp32", 39 * MiB, opset=22,
                         accuracy=0.925)
ALL = (FP32, INT8, CUDA, TFL, NEW_OPSET)

BIG = DeviceFacts("big", "x86-16g", {"onnxruntime": "1.22.0"}, frozenset({"cpu"}),
                  12 << 30, 64 << 30)
SMALL = DeviceFacts("small", "arm-128m", {"onnxruntime": "1.22.0"}, frozenset({"cpu"}),
                    60 * MiB, 1 << 30)
GPU = DeviceFacts("gpu", "jetson", {"onnxruntime": "1.18.0"}, frozenset({"cpu", "cuda"}),
                  4 << 30, 16 << 30)
TFLITE_ONLY = DeviceFacts("pi", "pi-zero", {"tflite-runtime": "2.14"}, frozenset({"cpu"}),
                          300 * MiB, 1 << 30)
OLD_ORT = DeviceFacts("old", "x86-old", {"onnxruntime": "1.16.3"}, frozenset({"cpu"}),
                      8 << 30, 8 << 30)
NOTHING = DeviceFacts("none", "bare", {}, frozenset({"cpu"}), 8 << 30, 8 << 30)

# Measured on BIG: FP32 is faster than INT8 there (no VNNI); on SMALL INT8 is faster.
FAST_FP32 = {FP32.sha256: Figures(900, 1200, model_rss_bytes=70 * MiB),
             INT8.sha256: Figures(1500, 1900, model_rss_bytes=22 * MiB),
             NEW_OPSET.sha256: Figures(950, 1300, model_rss_bytes=69 * MiB)}

TABLE = [
    # device, objective, own benchmarks, expected variant
    (BIG, "latency", FAST_FP32, "fp32"),  # measured: fp32 wins although larger
    (BIG, "latency", None, "int8"),  # static: the smaller file
    (BIG, "size", FAST_FP32, "int8"),
    (BIG, "accuracy", None, "fp32-op22"),
    (SMALL, "latency", None, "int8"),  # fp32 needs ~80 MiB, 45 MiB allowed
    (SMALL, "accuracy", None, "int8"),  # the most accurate that fits
    (GPU, "latency", None, "int8"),  # no figures: size estimate
    (GPU, "accuracy", None, "fp32"),  # opset 22 > 21 of ORT 1.18
    (TFLITE_ONLY, "latency", None, "tfl-int8"),
    (TFLITE_ONLY, "accuracy", None, "tfl-int8"),
    (OLD_ORT, "accuracy", None, "fp32"),
    (NOTHING, "latency", None, None),
]


@pytest.mark.parametrize(("device", "objective", "own", "expected"), TABLE,
                         ids=[f"{d.device_id}-{o}-{'own' if b else 'none'}"
                              for d, o, b, _ in TABLE])
def test_table_of_device_types_variants_and_objectives(device, objective, own, expected):
    choice = select_variant(device, ALL, Objective(objective), own, None)
    assert (choice.variant.name if choice.variant else None) == expected, choice.reason
    assert choice.reason


def test_an_accelerator_variant_goes_only_where_the_provider_opened():
    gpu_figs = {(GPU.device_type, v.sha256): Figures(p, p) for v, p in
                ((FP32, 4000), (INT8, 2500), (CUDA, 400), (TFL, 3000), (NEW_OPSET, 3900))}
    assert select_variant(GPU, ALL, Objective("latency"), None, gpu_figs).variant == CUDA
    cpu_only = DeviceFacts("gpu2", GPU.device_type, GPU.runtimes, frozenset({"cpu"}),
                           GPU.memory_available_bytes, GPU.disk_free_bytes)
    choice = select_variant(cpu_only, ALL, Objective("latency"), None, gpu_figs)
    assert choice.variant == INT8
    assert choice.rejected["fp16-cuda"] == "needs cuda"
    assert choice.figures["source"] == "type baseline"


def test_own_benchmark_wins_over_the_type_baseline():
    base = {(BIG.device_type, FP32.sha256): Figures(5000, 6000),
            (BIG.device_type, INT8.sha256): Figures(1000, 1200),
            (BIG.device_type, NEW_OPSET.sha256): Figures(5000, 6000)}
    choice = select_variant(BIG, (FP32, INT8, NEW_OPSET), Objective("latency"), FAST_FP32, base)
    assert choice.variant == FP32 and choice.figures["source"] == "device"
    assert "900 us" in choice.reason


def test_measured_memory_decides_fit_over_the_static_estimate():
    device = DeviceFacts("m", "mid", {"onnxruntime": "1.22"}, frozenset({"cpu"}),
                         100 * MiB, 1 << 30)  # 75 MiB allowed; static fp32 estimate 80 MiB
    assert select_variant(device, (FP32, INT8), Objective("accuracy")).variant == INT8
    measured = {FP32.sha256: Figures(900, 1000, model_rss_bytes=60 * MiB),
                INT8.sha256: Figures(800, 900, model_rss_bytes=20 * MiB)}
    assert select_variant(device, (FP32, INT8), Objective("accuracy"),
                          measured).variant == FP32


def test_accuracy_budget_keeps_a_lossy_variant_out():
    lossy = VariantFacts("int4", "f" * 64, "onnx", "int8", 5 * MiB, opset=17, accuracy=0.80)
    assert select_variant(BIG, (FP32, lossy), Objective("size")).variant == lossy
    choice = select_variant(BIG, (FP32, lossy), Objective("size", accuracy_budget=0.02))
    assert choice.variant == FP32
    assert "budget" in choice.rejected["int4"]


def test_disk_and_runtime_version_constraints():
    tight = DeviceFacts("d", "t", {"onnxruntime": "1.17.0"}, frozenset({"cpu"}),
                        8 << 30, 15 * MiB)
    pinned = VariantFacts("needs-1.18", "9" * 64, "onnx", "int8", 5 * MiB,
                          min_runtime_version="1.18")
    choice = select_variant(tight, (FP32, INT8, pinned), Objective("accuracy"))
    assert choice.variant == INT8
    assert choice.rejected["fp32"].startswith("disk")
    assert choice.rejected["needs-1.18"] == "onnxruntime 1.17.0 < 1.18"


def test_no_fitting_variant_is_incompatible_with_every_reason():
    choice = select_variant(NOTHING, (FP32, TFL), Objective("latency"))
    assert choice.variant is None
    assert choice.reason == "incompatible: fp32: no onnx runtime; tfl-int8: no tflite runtime"


def test_a_pytorch_mobile_variant_goes_to_a_device_that_reports_torch():
    """Every format the planner ships has a runtime here: a torch-only device gets the .ptl
    variant under every objective, and an ONNX-only device is told why not."""
    ptl = VariantFacts("mobile", "7" * 64, "ptl", "fp32", 30 * MiB, accuracy=0.92)
    torch_only = DeviceFacts("app", "phone", {"torch": "2.13.0+cpu"}, frozenset({"cpu"}),
                             8 << 30, 8 << 30)
    for objective in ("latency", "size", "accuracy"):
        choice = select_variant(torch_only, (FP32, INT8, ptl), Objective(objective))
        assert choice.variant == ptl, (objective, choice)
        assert choice.rejected["int8"] == "no onnx runtime"
    assert select_variant(BIG, (ptl,), Objective("size")).reason == \
        "incompatible: mobile: no ptl runtime"


def test_the_planner_and_selection_know_the_same_formats():
    from deltafleet.server import planner, selection  # noqa: PLC0415

    assert planner.FORMAT_RUNTIMES is selection.FORMAT_RUNTIMES
    assert set(selection.FORMAT_RUNTIMES) == {"onnx", "tflite", "ptl"}


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="unknown objective"):
        Objective("speed")


def test_device_type_is_the_label_or_a_hardware_class():
    assert device_type_of({"device-type": "jetson-orin"}, "aarch64", "x", 8 << 30, None) \
        == "jetson-orin"
    assert device_type_of({}, "x86_64", "Intel(R) Core i5", 8 << 30, None) \
        == "x86_64/intel-r-core-i5/8GiB"
    assert device_type_of({}, "aarch64", "", 6 << 30, "NPU") == "aarch64/cpu/4GiB/npu"
    assert device_type_of({}, "armv7l", "cortex", 512 << 20, None) == "armv7l/cortex/512MiB"


def test_every_generated_type_gets_the_brute_force_best():
    types = device_types(240)
    assert len({t.name for t in types}) == 240
    assert len({(t.arch, t.cpu, t.memory_bytes, t.accelerator, t.speed) for t in types}) == 240
    by_name = {t.name: t for t in types}
    devices = [types[i % len(types)].facts(f"d{i}") for i in range(480)]
    base = baselines(types)
    for objective in (Objective("latency"), Objective("size"), Objective("accuracy"),
                      Objective("latency", accuracy_budget=0.01)):
        _, plans = plan_fleet(devices, VARIANTS, objective, None, base)
        assert len(plans) == 240
        for tp in plans:
            assert tp.variant == brute_force(by_name[tp.device_type], objective), tp
            assert tp.devices == 2


def test_prefer_text_carries_an_accuracy_budget_in_points():
    assert Objective.parse("latency") == Objective("latency")
    assert Objective.parse(" size@0.5 ") == Objective("size", 0.005)
    assert Objective.parse("latency@1").text() == "latency@1"
    assert Objective.parse("accuracy@0").accuracy_budget == 0
    for bad in ("latency@", "latency@x", "latency@-1", "latency@nan", "latency@101",
                "speed@1", "latency@1@2"):
        with pytest.raises(ValueError):
            Objective.parse(bad)


def test_parse_prefer_is_one_line_and_normal_form():
    from deltafleet.server.errors import UsageError  # noqa: PLC0415
    from deltafleet.server.policy import parse_prefer  # noqa: PLC0415

    assert parse_prefer("latency@1.0") == "latency@1"
    assert parse_prefer(None) is None and parse_prefer("  ") is None
    for bad in ("fast", "latency@lots", "size@\ud800"):
        with pytest.raises(UsageError) as info:
            parse_prefer(bad)
        assert "\n" not in str(info.value)


def test_the_accuracy_model_optimize_measured_is_what_selection_ranks_by():
    """``model optimize --eval`` records the variant's accuracy and its parent's (same eval
    set): --prefer accuracy ranks by those, not by the precision label, and a budget keeps
    out the variant that lost too much."""
    from types import SimpleNamespace  # noqa: PLC0415

    from deltafleet.server.selection import variant_facts, with_parent_accuracy  # noqa: PLC0415

    def option(name, sha, precision, size):
        return SimpleNamespace(name=name, sha256=sha, format="onnx", precision=precision,
                               size_bytes=size)

    infos = {
        1: {"opset": {"ai.onnx": 17}},  # the parent: no accuracy of its own
        2: {"optimize": {"parent": {"variant": "default", "sha256": "p" * 64},
                         "accuracy": {"parent": 0.95, "variant": 0.962, "drop_points": -1.2}}},
        3: {"optimize": {"parent": {"variant": "default", "sha256": "p" * 64},
                         "accuracy": {"parent": 0.95, "variant": 0.90, "drop_points": 5.0}}},
    }
    facts = with_parent_accuracy({
        1: variant_facts(option("default", "p" * 64, "fp32", 40 * MiB), infos[1]),
        2: variant_facts(option("int8", "q" * 64, "int8", 10 * MiB), infos[2]),
        3: variant_facts(option("int8-pruned50", "r" * 64, "int8", 6 * MiB), infos[3]),
    }, infos)
    assert [facts[i].accuracy for i in (1, 2, 3)] == [0.95, 0.962, 0.90]
    variants = tuple(facts.values())
    assert select_variant(BIG, variants, Objective("accuracy")).variant.name == "int8"
    assert select_variant(BIG, variants, Objective("size")).variant.name == "int8-pruned50"
    choice = select_variant(BIG, variants, Objective.parse("size@2"))
    assert choice.variant.name == "int8"
    assert "budget" in choice.rejected["int8-pruned50"]
