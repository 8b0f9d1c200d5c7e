from datetime import UTC, datetime

import pytest

from deltafleet.server.planner import (
    DeltaOption,
    FullArtifact,
    PlanKind,
    RunningModel,
    VariantOption,
    choose_variant,
    delta_worth_it,
    full_artifact,
    plan_target,
)
from deltafleet.server.policy import RolloutPolicy
from deltafleet.server.rollout import engine
from deltafleet.server.rollout.states import RolloutState, TargetState

ONNX = VariantOption(1, "default", "onnx", "fp32", "a" * 64, 100)
TFL = VariantOption(2, "tflite-int8", "tflite", "int8", "b" * 64, 30)
PACKED = VariantOption(3, "default", "onnx", "fp32", "c" * 64, 100,
                       compressed=FullArtifact("zstd", "d" * 64, 80))


def test_device_gets_the_variant_its_runtime_can_load():
    assert choose_variant({"litert": "2.3"}, None, [ONNX, TFL]).variant == TFL
    assert choose_variant({"onnxruntime": "1.20"}, None, [ONNX, TFL]).variant == ONNX


def test_device_keeps_the_variant_it_already_runs():
    both = {"onnxruntime": "1", "litert": "2"}
    assert choose_variant(both, "tflite-int8", [ONNX, TFL]).variant == TFL
    assert choose_variant(both, None, [ONNX, TFL]).variant == ONNX


def test_device_without_a_fitting_runtime_is_told_why():
    choice = choose_variant({}, None, [ONNX])
    assert choice.variant is None and "no variant" in choice.reason


def test_delta_must_save_at_least_ten_percent():
    assert delta_worth_it(90, 100)
    assert not delta_worth_it(91, 100)
    assert not delta_worth_it(None, 100)


def test_full_artifact_is_the_compressed_model_when_the_catalog_has_one():
    assert PACKED.full == FullArtifact("zstd", "d" * 64, 80)
    assert ONNX.full == FullArtifact("identity", "a" * 64, 100)  # registered before, or no gain


def test_delta_is_weighed_against_the_compressed_model_not_the_file():
    assert delta_worth_it(85, PACKED.size_bytes)  # 15% under the model file ...
    assert not delta_worth_it(85, PACKED.full.size_bytes)  # ... but only 6% under what ships
    assert delta_worth_it(72, PACKED.full.size_bytes)


# -- one plan for dispatch and `fleetctl rollout plan` ----------------------------------------
BASE, MODEL, PACK, DELTA = "e" * 64, "c" * 64, "d" * 64, "f" * 64
RUNS = RunningModel(BASE, "default", "v1")
SMALL = {(BASE, MODEL): DeltaOption("bsdiff", DELTA, 20)}
BIG = {(BASE, MODEL): DeltaOption("bsdiff", DELTA, 75)}  # under the model, not under 80 * 0.9

# (case, what the device runs, stored deltas, failed pairs, blobs not intact) -> what ships
CASES = [
    ("delta worth it", RUNS, SMALL, {}, set(), (PlanKind.DELTA, "bsdiff", DELTA, 20)),
    ("delta not worth it", RUNS, BIG, {}, set(), (PlanKind.FULL, "zstd", PACK, 80)),
    ("delta blob bad", RUNS, SMALL, {}, {DELTA}, (PlanKind.FULL, "zstd", PACK, 80)),
    ("base blob missing", RUNS, SMALL, {}, {BASE}, (PlanKind.FULL, "zstd", PACK, 80)),
    ("delta failed", RUNS, {}, {(BASE, MODEL): "no gain"}, set(),
     (PlanKind.FULL, "zstd", PACK, 80)),
    ("delta not built", RUNS, {}, {}, set(), (PlanKind.BUILD, None, None, 80)),
    ("target file missing: no build", RUNS, {}, {}, {MODEL}, (PlanKind.FULL, "zstd", PACK, 80)),
    ("compressed missing", None, {}, {}, {PACK}, (PlanKind.FULL, "identity", MODEL, 100)),
    ("compressed missing, delta not worth it against the model", RUNS,
     {(BASE, MODEL): DeltaOption("bsdiff", DELTA, 95)}, {}, {PACK},
     (PlanKind.FULL, "identity", MODEL, 100)),
    ("compressed missing, delta worth it against the model", RUNS, BIG, {}, {PACK},
     (PlanKind.DELTA, "bsdiff", DELTA, 75)),
    ("nothing intact to send", None, {}, {}, {PACK, MODEL},
     (PlanKind.HOLD, "identity", MODEL, 100)),
    ("fresh device", None, SMALL, {}, set(), (PlanKind.FULL, "zstd", PACK, 80)),
]


def _plan(running, deltas, failed, bad):
    return plan_target({"onnxruntime": "1"}, running, [PACKED_TARGET], deltas=deltas,
                       failed_deltas=failed, blob_problem=lambda sha: "missing" if sha in bad
                       else None)


PACKED_TARGET = VariantOption(3, "default", "onnx", "fp32", MODEL, 100,
                              compressed=FullArtifact("zstd", PACK, 80))


@pytest.mark.parametrize(("case", "running", "deltas", "failed", "bad", "ships"), CASES,
                         ids=[c[0] for c in CASES])
def test_plan_shows_what_dispatch_sends(case, running, deltas, failed, bad, ships):
    plan = _plan(running, deltas, failed, bad)
    assert (plan.kind, plan.codec, plan.artifact_sha256, plan.bytes) == ships
    now = datetime(2026, 12, 1, tzinfo=UTC)
    snap = engine.Snapshot(
        engine.RolloutView(1, RolloutState.RUNNING, RolloutPolicy(), "v2"),
        (engine.TargetView("a", 0, TargetState.PENDING),),
        {"a": engine.DeviceView("a", True, {"onnxruntime": "1"}, running)},
        (PACKED_TARGET,), deltas, failed, {},
        lambda sha: "missing" if sha in bad else None)
    out = engine.step(snap, now)
    sent = [d for d in out if isinstance(d, engine.Dispatch)]
    builds = [d for d in out if isinstance(d, engine.BuildDelta)]
    if plan.sends:
        (d,) = sent
        assert (d.kind, d.codec, d.artifact_sha256, d.artifact_bytes) == (
            str(plan.kind), plan.codec, plan.artifact_sha256, plan.bytes)
        assert d.base_sha256 == (BASE if plan.kind == PlanKind.DELTA else None)
    else:
        assert not sent
    assert bool(builds) is plan.build_delta


def test_a_plan_never_promises_a_delta_it_would_not_send():
    for _case, running, deltas, failed, bad, _ships in CASES:
        plan = _plan(running, deltas, failed, bad)
        if plan.kind == PlanKind.DELTA:
            delta = deltas[(BASE, MODEL)]
            assert BASE not in bad and delta.sha256 not in bad
            assert delta_worth_it(delta.size_bytes, full_artifact(
                MODEL, 100, PACKED_TARGET.compressed,
                blob_problem=lambda sha, bad=bad: "missing" if sha in bad else None).size_bytes)


def test_the_one_full_artifact_rule():
    packed = FullArtifact("zstd", PACK, 80)
    assert full_artifact(MODEL, 100, packed) == packed
    assert full_artifact(MODEL, 100) == FullArtifact("identity", MODEL, 100)
    assert full_artifact(MODEL, 100, packed, blob_problem=lambda sha: "missing") == \
        FullArtifact("identity", MODEL, 100)
    assert full_artifact(MODEL, 70, packed) == FullArtifact("identity", MODEL, 70)  # no gain
    assert PACKED_TARGET.full == packed and PACKED_TARGET.identity.codec == "identity"


# -- deltas stay within a variant lineage -----------------------------------------------------
INT8_V2 = VariantOption(4, "int8", "onnx", "int8", "9" * 64, 40)
FP32_V2 = VariantOption(5, "default", "onnx", "fp32", "8" * 64, 100)


def test_a_delta_is_planned_within_the_variant_lineage():
    runs_int8 = RunningModel("7" * 64, "int8", "v1")
    plan = plan_target({"onnxruntime": "1"}, runs_int8, [FP32_V2, INT8_V2],
                       deltas={("7" * 64, INT8_V2.sha256): DeltaOption("bsdiff", DELTA, 5)},
                       failed_deltas={})
    assert (plan.kind, plan.variant, plan.base_sha256) == (PlanKind.DELTA, INT8_V2, "7" * 64)


def test_no_delta_across_variants_when_the_lineage_ends():
    runs_int8 = RunningModel("7" * 64, "int8", "v1")
    stored = {("7" * 64, FP32_V2.sha256): DeltaOption("bsdiff", DELTA, 5)}
    plan = plan_target({"onnxruntime": "1"}, runs_int8, [FP32_V2], deltas=stored,
                       failed_deltas={})
    assert plan.kind == PlanKind.FULL and plan.variant == FP32_V2 and not plan.build_delta
    assert "no delta across variants" in plan.reason
